"""Step-penalised GRPO with a PPO-clipped per-step objective.

Reward of a trajectory: R = sum_c w_c * norm_c(r_c), then the step penalty (``tpdm_rl/core/step_penalty.py``:
- lambda * steps by default; the multiplying modes only when every component is non-negative).
Advantage of a trajectory: (R - mean of its group) / (std + eps); every step of the trajectory gets
its advantage, and the PPO-clip loss is averaged over the valid steps of a minibatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpdm_rl.core.step_penalty import StepPenalty

__all__ = ["NO_PENALTY", "PPOStats", "RunningMeanStd", "StepPenalty", "compose_reward", "group_normalize",
           "grpo_advantages", "ppo_clip_loss"]

NO_PENALTY = StepPenalty("additive", 0.0)


@dataclass
class RunningMeanStd:
    """Running mean/variance (Chan et al. parallel update) for the 'running' reward normalisation."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.double().reshape(-1)
        if x.numel() == 0:
            return
        bm, bv, bc = float(x.mean()), float(x.var(unbiased=False)), float(x.numel())
        if self.count == 0:
            self.mean, self.var, self.count = bm, bv, bc
            return
        tot = self.count + bc
        delta = bm - self.mean
        self.mean += delta * bc / tot
        self.var = (self.var * self.count + bv * bc + delta * delta * self.count * bc / tot) / tot
        self.count = tot

    def normalize(self, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        return (x - self.mean) / (self.var**0.5 + eps)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, d: dict) -> None:
        self.mean, self.var, self.count = float(d["mean"]), float(d["var"]), float(d["count"])


def group_normalize(x: torch.Tensor, group: torch.Tensor, std: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """(x - group mean) / (std + eps), vectorised over groups.

    ``std``: "group" (each group's own std), "global" (the std of the whole batch, Dr.GRPO-style,
    avoids blowing up near-constant groups), or "none" (centre only).
    """
    x = x.double()
    g = torch.unique(group, return_inverse=True)[1]
    ng = int(g.max().item()) + 1 if g.numel() else 0
    cnt = torch.zeros(ng, dtype=torch.float64).index_add_(0, g, torch.ones_like(x))
    mean = torch.zeros(ng, dtype=torch.float64).index_add_(0, g, x) / cnt
    centred = x - mean[g]
    if std == "group":
        var = torch.zeros(ng, dtype=torch.float64).index_add_(0, g, centred**2) / (cnt - 1).clamp_min(1)
        out = centred / (var.sqrt()[g] + eps)
    elif std == "global":
        out = centred / (x.std() + eps) if x.numel() > 1 else centred
    elif std == "none":
        out = centred
    else:
        raise ValueError(f"advantage std must be 'group', 'global' or 'none', got {std!r}")
    return out.float()


def compose_reward(components: dict[str, torch.Tensor], weights: dict[str, float], steps: torch.Tensor,
                   penalty: StepPenalty = NO_PENALTY) -> torch.Tensor:
    """Weighted sum of (already normalised) reward components with the step penalty."""
    steps = steps.double()
    total = torch.zeros_like(steps)
    for name, value in components.items():
        total = total + float(weights[name]) * value.double()
    return penalty.apply(total, steps).float()


def grpo_advantages(components: dict[str, torch.Tensor], weights: dict[str, float], steps: torch.Tensor,
                    group: torch.Tensor, penalty: StepPenalty = NO_PENALTY, std: str = "group",
                    per_reward_norm: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Per-trajectory advantages.

    Default: normalise the composed reward within each group. With ``per_reward_norm`` each
    component (and the step count, as a component of weight -lambda) is normalised within its group
    first, so a component with a large raw scale cannot drown the others; then the weighted sum is
    normalised again.
    """
    if per_reward_norm:
        step_weight = penalty.step_weight()
        parts = {k: group_normalize(v, group, std, eps) for k, v in components.items()}
        total = compose_reward(parts, weights, torch.zeros_like(steps))
        if step_weight:
            total = total + step_weight * group_normalize(steps.float(), group, std, eps)
        return group_normalize(total, group, std, eps)
    total = compose_reward(components, weights, steps, penalty)
    return group_normalize(total, group, std, eps)


@dataclass
class PPOStats:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl_ref: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    entropy: torch.Tensor


def ppo_clip_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                  mask: torch.Tensor, clip_eps: float = 0.2, kl_ref: torch.Tensor | None = None,
                  kl_coef: float = 0.0, entropy: torch.Tensor | None = None, entropy_coef: float = 0.0
                  ) -> PPOStats:
    """PPO-clip on per-step log-probs with the trajectory's advantage, masked mean over valid steps.

    loss = mean_valid(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))) + kl_coef * mean_valid(KL_ref)
           - entropy_coef * mean_valid(entropy)
    The entropy bonus keeps a policy from turning deterministic before GRPO has seen the alternatives: once every
    trajectory of a group stops at the same step, the group has no contrast left to learn from.
    ``approx_kl`` is the low-variance estimator mean((ratio - 1) - log ratio).
    """
    m = mask.float()
    denom = m.sum().clamp_min(1.0)
    log_ratio = new_logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_step = torch.maximum(unclipped, clipped)
    policy_loss = (per_step * m).sum() / denom
    kl = (kl_ref * m).sum() / denom if kl_ref is not None else torch.zeros((), device=new_logp.device)
    loss = policy_loss + kl_coef * kl if kl_ref is not None and kl_coef else policy_loss
    if entropy_coef:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the entropy of the action distribution")
        loss = loss - entropy_coef * (entropy * m).sum() / denom
    with torch.no_grad():
        clipfrac = (((ratio - 1.0).abs() > clip_eps).float() * m).sum() / denom
        approx_kl = (((ratio - 1.0) - log_ratio) * m).sum() / denom
        ratio_mean = (ratio * m).sum() / denom
        ent = (entropy * m).sum() / denom if entropy is not None else torch.zeros(())
    return PPOStats(loss, policy_loss.detach(), kl.detach(), clipfrac, approx_kl, ratio_mean, ent.detach())
