"""Model-free fidelity reward: PSNR of the final image against a many-step reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import RewardModel
from .registry import register_reward


def psnr(images: torch.Tensor, references: torch.Tensor, max_psnr: float = 100.0) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1] (capped at ``max_psnr`` for identical images)."""
    mse = (images.float() - references.float()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(1.0 / mse.clamp_min(10 ** (-max_psnr / 10)))).clamp(max=max_psnr)


@register_reward("fidelity")
class FidelityReward(RewardModel):
    """PSNR (dB) against the reference made from the same prompt and noise with the default schedule.

    It needs no weights, so it gives the tiny offline backbone a real learning signal: reach the
    28-step image with fewer steps. Non-negative (MSE of [0, 1] images is at most 1).
    """

    unit = "dB"

    needs_reference = True
    nonnegative = True

    def __init__(self, device="cpu", dtype="float32", batch_size: int = 256, max_psnr: float = 100.0) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        self.max_psnr = float(max_psnr)

    def _score_batch(self, images: torch.Tensor, prompts: Sequence[str],
                     references: torch.Tensor | None) -> torch.Tensor:
        assert references is not None
        return psnr(images, references, self.max_psnr)
