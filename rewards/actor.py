"""The reward Ray actor: one reward model, scoring batches of images as they arrive."""

from __future__ import annotations

import time

import torch


class RewardActor:
    """Wrapped with ``ray.remote`` by the Ray trainer; one pool of these per reward component."""

    def __init__(self, name: str, options: dict, threads: int = 1) -> None:
        from .base import build_reward

        torch.set_num_threads(threads)
        self.name = name
        self.model = build_reward(name, **options)

    def score_many(self, *packs: dict) -> tuple[list[torch.Tensor], float]:
        """Score the images of several rollout tasks as ONE batch (requests that queued up while this
        actor was busy arrive together); returns per-task scores and busy seconds."""
        t0 = time.perf_counter()
        sizes = [int(p["images"].shape[0]) for p in packs]
        images = torch.cat([p["images"] for p in packs])
        prompts = [s for p in packs for s in p["prompts"]]
        refs = None
        if self.model.needs_reference:
            refs = torch.cat([p["references"] for p in packs])
        out = self.model.score(images, prompts, refs)
        return list(out.split(sizes)), time.perf_counter() - t0

    def ping(self) -> bool:
        return True
