"""Schedules: what decides sigma_next for each active trajectory at its current step.

``FixedSchedule`` follows a sigma table (the backbone scheduler's own, or any other);
``TPMSchedule`` asks the TPM policy (a draw from each trajectory's own random stream when training; the
``policy.inference`` rule at inference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Proposal:
    """A schedule's decision for a batch of active trajectories at their current step."""

    sigma_next: torch.Tensor  # [B] proposed next sigma (before the terminal rule)
    action: torch.Tensor  # [B] the action taken (ratio r for the TPM; 0 = stop for the stop-ratio TPM)
    logp: torch.Tensor  # [B] behaviour log-prob of the action (0 for deterministic schedules)


class Schedule:
    """Decides sigma_next for each active trajectory. ``sigma_min``: finish below this sigma."""

    sigma_min: float = 0.0
    uses_features: bool = False

    def propose(self, features: torch.Tensor, temb: torch.Tensor, sigma: torch.Tensor, step: torch.Tensor,
                keys: torch.Tensor) -> Proposal:
        raise NotImplementedError


class FixedSchedule(Schedule):
    """A fixed sigma table (e.g. the backbone's shifted flow-matching schedule), ending with 0."""

    def __init__(self, sigmas: torch.Tensor) -> None:
        self.sigmas = sigmas.float().cpu()
        if self.sigmas[-1] != 0:
            self.sigmas = torch.cat([self.sigmas, torch.zeros(1)])
        self.num_steps = int(self.sigmas.numel() - 1)

    def propose(self, features, temb, sigma, step, keys) -> Proposal:
        nxt = self.sigmas.to(sigma.device)[(step + 1).clamp(max=self.num_steps)]
        return Proposal(nxt, nxt / sigma.clamp_min(1e-12), torch.zeros_like(sigma))


#: how a trained TPM picks its ratio at inference (``policy.inference``)
INFERENCE_MODES = ("mode", "mean", "sample")


class TPMSchedule(Schedule):
    """The TPM policy: a draw of its action (``mode='sample'``) or a deterministic one (``mode='mode'``: the Beta
    mode, the paper's inference / stop when p_stop > 1/2, else the median ratio; ``mode='mean'``: the mean
    ratio), see :meth:`tpdm_rl.algorithm.policy.TimePredictionModule.deterministic`."""

    uses_features = True

    def __init__(self, policy: torch.nn.Module, sigma_min: float, mode: str = "sample",
                 feature_dtype: torch.dtype = torch.float32) -> None:
        if mode not in INFERENCE_MODES:
            raise ValueError(f"TPM schedule mode must be one of {INFERENCE_MODES}, got {mode!r}")
        self.policy = policy
        self.sigma_min = float(sigma_min)
        self.mode = mode
        self.feature_dtype = feature_dtype

    @torch.no_grad()
    def propose(self, features, temb, sigma, step, keys) -> Proposal:
        # the policy sees exactly what is stored for the learner (features and temb in the storage dtype)
        dev = next(self.policy.parameters()).device
        feats = features.to(self.feature_dtype).to(dev)
        params = self.policy(feats, temb.to(self.feature_dtype).to(dev), sigma.to(dev))
        if self.mode == "sample":
            r = self.policy.sample(params, keys.to(dev), step.to(dev))
        else:
            r = self.policy.deterministic(params, self.mode)
        logp = self.policy.log_prob(params, r)
        r, logp = r.to(sigma.device), logp.to(sigma.device)
        return Proposal(r * sigma, r, logp)


def mean_schedule(schedules: list[torch.Tensor], num_steps: int, grid: int = 1001) -> torch.Tensor:
    """The average of several schedules, resampled to one ``num_steps``-step table ending with 0.

    Each schedule (its sigmas from the first step down to 0) is read as sigma over the fraction of its
    own steps, u = k / steps in [0, 1], linearly interpolated on a common grid; the curves are
    averaged over schedules and the mean curve is read at u = k / num_steps. Averages of decreasing
    curves decrease, so the table is a valid schedule."""
    if not schedules or num_steps < 1:
        raise ValueError("mean_schedule needs at least one schedule and num_steps >= 1")
    u = torch.linspace(0.0, 1.0, grid, dtype=torch.float64)
    curves = []
    for s in schedules:
        s = s.double().reshape(-1)
        x = torch.linspace(0.0, 1.0, s.numel(), dtype=torch.float64)
        idx = torch.searchsorted(x, u, right=True).clamp(1, s.numel() - 1)
        x0, x1, y0, y1 = x[idx - 1], x[idx], s[idx - 1], s[idx]
        curves.append(y0 + (y1 - y0) * (u - x0) / (x1 - x0))
    mean = torch.stack(curves).mean(0)
    at = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    pos = (at * (grid - 1)).round().long()
    table = mean[pos].float()
    table[-1] = 0.0
    return table
