"""The one batched interface every reward model implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from tpdm_rl.core.devices import resolve_device, resolve_dtype
from tpdm_rl.core.reward_registry import RewardError


class RewardModel(ABC):
    """Scores a batch of images (float [B, 3, H, W] in [0, 1]) against their prompts.

    Subclasses implement ``_score_batch`` on at most ``batch_size`` images already moved to
    ``self.device``; ``score`` handles validation, chunking and returns float32 [B] on the CPU.
    """

    name: str = "reward"
    needs_reference: bool = False  # True: score() also needs reference images (same shape)
    nonnegative: bool = False  # True: scores can never be negative (allows the gamma^k discount)
    unit: str = ""  # what a score is measured in, for summaries

    def __init__(self, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
                 batch_size: int = 32) -> None:
        if int(batch_size) < 1:
            raise RewardError(f"{self.name}: batch_size must be >= 1, got {batch_size!r}")
        self.device = resolve_device(device)
        try:
            self.dtype = resolve_dtype(dtype, self.device)
        except ValueError as exc:
            raise RewardError(f"{self.name}: {exc}") from None
        self.batch_size = int(batch_size)

    @abstractmethod
    def _score_batch(self, images: torch.Tensor, prompts: Sequence[str],
                     references: torch.Tensor | None) -> torch.Tensor:
        """Scores for one chunk; ``images`` is float32 on ``self.device``."""

    def _score_batch_details(self, images: torch.Tensor, prompts: Sequence[str],
                             references: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores plus extra per-image metrics for logging (none by default)."""
        return self._score_batch(images, prompts, references), {}

    def score(self, images: torch.Tensor, prompts: Sequence[str],
              references: torch.Tensor | None = None) -> torch.Tensor:
        """Score a batch; returns a float32 tensor of shape [B] on the CPU."""
        return self.score_details(images, prompts, references)[0]

    @torch.no_grad()
    def score_details(self, images: torch.Tensor, prompts: Sequence[str], references: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores (float32 [B], CPU) and extra per-image metrics (e.g. ``exact`` for ``shapes``), not rewarded."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise RewardError(f"{self.name}: images must be a float tensor [B, 3, H, W], got {shape}")
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise RewardError(f"{self.name}: got {images.shape[0]} images but {len(prompts)} prompts")
        if self.needs_reference:
            if references is None or references.shape != images.shape:
                got = None if references is None else tuple(references.shape)
                raise RewardError(f"{self.name}: needs reference images of shape {tuple(images.shape)}, got {got}")
        out: list[torch.Tensor] = []
        extra: dict[str, list[torch.Tensor]] = {}
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start:start + self.batch_size].to(self.device, torch.float32)
            ref = None
            if references is not None:
                ref = references[start:start + self.batch_size].to(self.device, torch.float32)
            scores, metrics = self._score_batch_details(chunk, prompts[start:start + self.batch_size], ref)
            out.append(scores.float().cpu().reshape(-1))
            for k, v in metrics.items():
                extra.setdefault(k, []).append(v.float().cpu().reshape(-1))
        if not out:
            return torch.zeros(0), {}
        return torch.cat(out), {k: torch.cat(v) for k, v in extra.items()}
