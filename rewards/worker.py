"""A reward worker: one reward model scoring the images of several rollout tasks as one batch.

The local executor calls it directly; the Ray executor runs it as an actor (``ray.remote``) with
no wrapper, so both modes score through the same code.
"""

from __future__ import annotations

import time

import torch

from tpdm_rl.algorithm.messages import ImageBatch, ScoreResult
from tpdm_rl.core.reward_registry import RewardError, build_reward
from tpdm_rl.core.threads import apply_threads


class RewardWorker:
    """One reward component (``name`` + its options) behind the batched scoring call."""

    def __init__(self, name: str, options: dict, threads: int | None = None) -> None:
        if threads:  # a Ray actor (distributed.threads_per_actor); in one process the controller's setting holds
            apply_threads(threads, "actor")
        self.name = name
        try:
            self.model = build_reward(name, **options)
        except RewardError as exc:
            raise RewardError(f"rewards.{name}: {exc}") from None

    def score_many(self, *packs: ImageBatch) -> ScoreResult:
        """Score the images of several tasks as ONE batch (requests that queued up while this worker
        was busy arrive together); returns per-task scores and extra metrics."""
        t0 = time.perf_counter()
        sizes = [int(p.images.shape[0]) for p in packs]
        refs = torch.cat([p.references for p in packs]) if self.model.needs_reference else None
        scores, extra = self.model.score_details(torch.cat([p.images for p in packs]),
                                                 [s for p in packs for s in p.prompts], refs)
        split = {k: v.split(sizes) for k, v in extra.items()}
        per_task = [{k: parts[i] for k, parts in split.items()} for i in range(len(sizes))]
        return ScoreResult(list(scores.split(sizes)), per_task, time.perf_counter() - t0)

    def ping(self) -> bool:
        return True
