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

    def score(self, images: dict) -> tuple[torch.Tensor, float]:
        """``images``: the rollout actor's image pack; returns (scores [B], busy seconds)."""
        t0 = time.perf_counter()
        refs = images.get("references") if self.model.needs_reference else None
        out = self.model.score(images["images"], images["prompts"], refs)
        return out, time.perf_counter() - t0

    def ping(self) -> bool:
        return True
