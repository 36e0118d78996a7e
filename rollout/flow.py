"""The flow-matching step and the terminal rule, shared by the sampling engine and every baseline.

Flow matching: x_t = sigma * noise + (1 - sigma) * x0; the backbone predicts the velocity v and one
Euler step moves x from sigma to sigma_next: x_next = x + (sigma_next - sigma) * v.

Terminal rule (the same for the TPM, fixed schedules and AdaptiveDiffusion): when the proposed
sigma_next falls below ``sigma_min`` (or is 0), or the step budget is spent, the trajectory finishes
with the Euler step to sigma 0 from the velocity at hand, x0 = x - sigma * v. That step needs no
extra backbone call, so NFE (transformer calls, CFG counted once) = number of steps.
"""

from __future__ import annotations

import torch


def terminal(sigma_next: torch.Tensor, sigma_min: float, at_budget: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(done, below, target): which trajectories finish now, which of them because the proposal fell below
    ``sigma_min``, and the sigma each one steps to (0 for the finishing ones)."""
    below = (sigma_next < sigma_min) | (sigma_next <= 0)
    done = below | at_budget
    return done, below, torch.where(done, torch.zeros_like(sigma_next), sigma_next)


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """x + (target - sigma) * v, per sample (``sigma``/``target`` are [B] on any device)."""
    return x + (target - sigma).to(x.device).reshape(-1, *([1] * (x.dim() - 1))) * velocity
