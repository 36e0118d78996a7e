"""The learner: recomputes per-step log-probs from stored features and applies PPO-clip updates.

The batch is a packed table of steps (see ``rollout.trajectory``). The same TPM code that the
rollout used turns the stored (pooled, storage-dtype) features into Beta log-probs, so on the first
epoch ratio = 1 and clipfrac = 0 up to float rounding.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from rollout.rng import derive_key

from .objective import ppo_clip_loss
from .policy import TimePredictionModule, beta_entropy, beta_log_prob


@dataclass
class LearnBatch:
    """One rollout's steps, ready for the learner (all on CPU; R rows)."""

    features: torch.Tensor  # [R, F, g, g]
    temb: torch.Tensor  # [R, D]
    sigma: torch.Tensor  # [R]
    action: torch.Tensor  # [R]
    old_logp: torch.Tensor  # [R]
    advantage: torch.Tensor  # [R] trajectory advantage broadcast to its steps
    mask: torch.Tensor  # [R] bool, steps that count in the loss

    def __len__(self) -> int:
        return int(self.sigma.shape[0])

    def rows(self, idx: torch.Tensor) -> LearnBatch:
        return LearnBatch(*(t[idx] for t in (self.features, self.temb, self.sigma, self.action, self.old_logp,
                                               self.advantage, self.mask)))

    def to(self, device: torch.device) -> LearnBatch:
        return LearnBatch(*(t.to(device) for t in (self.features, self.temb, self.sigma, self.action, self.old_logp,
                                                    self.advantage, self.mask)))


def policy_terms(policy: torch.nn.Module, batch: LearnBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]:
    """(log-prob of the stored actions, entropy, alpha, beta) under ``policy``."""
    alpha, beta = policy(batch.features, batch.temb, batch.sigma)
    return beta_log_prob(alpha, beta, batch.action), beta_entropy(alpha, beta), alpha, beta


def minibatch_indices(n: int, minibatches: int, seed: int, iteration: int, epoch: int) -> list[torch.Tensor]:
    """A seeded permutation of the rows split into ``minibatches`` nearly equal parts."""
    g = torch.Generator().manual_seed(derive_key(seed, 0x1EA, iteration, epoch))
    perm = torch.randperm(n, generator=g)
    k = max(1, min(minibatches, n))
    return [p for p in torch.tensor_split(perm, k) if p.numel()]


class Learner:
    """Single-process PPO learner over the TPM (AdamW, grad clipping, optional KL to a reference)."""

    def __init__(self, policy: TimePredictionModule, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, clip_eps: float = 0.2,
                 epochs: int = 2, minibatches: int = 2, max_grad_norm: float = 1.0, kl_coef: float = 0.0,
                 seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.policy = policy.to(self.device)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=lr, weight_decay=weight_decay, betas=betas,
                                           eps=eps)
        self.clip_eps, self.epochs, self.minibatches = clip_eps, epochs, minibatches
        self.max_grad_norm, self.kl_coef, self.seed = max_grad_norm, kl_coef, seed
        self.reference = None
        if kl_coef > 0:
            self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()

    def update(self, batch: LearnBatch, iteration: int) -> dict[str, float]:
        """Several epochs of minibatch PPO on one rollout batch; returns averaged metrics.

        A non-finite loss or gradient skips that optimiser step (counted in ``health/skipped_steps``).
        """
        self.policy.train()
        batch = batch.to(self.device)
        sums: dict[str, float] = {}
        count, skipped, first_clipfrac = 0, 0, 0.0
        with torch.no_grad():  # before any step the learner must reproduce the behaviour log-probs
            logp0 = policy_terms(self.policy, batch)[0]
            m0 = batch.mask
            logp_err = float((logp0 - batch.old_logp).abs()[m0].max()) if m0.any() else 0.0
        for epoch in range(self.epochs):
            for idx in self._minibatches(len(batch), iteration, epoch):
                mb = batch.rows(idx)
                logp, ent, alpha, beta = policy_terms(self.policy, mb)
                kl = None
                if self.reference is not None:
                    with torch.no_grad():
                        ra, rb = self.reference(mb.features, mb.temb, mb.sigma)
                    kl = torch.distributions.kl_divergence(
                        torch.distributions.Beta(alpha, beta), torch.distributions.Beta(ra, rb))
                stats = ppo_clip_loss(logp, mb.old_logp, mb.advantage, mb.mask, self.clip_eps, kl, self.kl_coef, ent)
                if epoch == 0 and count == 0:
                    first_clipfrac = float(stats.clipfrac)
                gnorm = self._apply(stats.loss, mb.mask)
                if gnorm is None:
                    skipped += 1
                    continue
                for k, v in (("loss/policy", stats.policy_loss), ("loss/kl_ref", stats.kl_ref),
                             ("policy/clipfrac", stats.clipfrac), ("policy/approx_kl", stats.approx_kl),
                             ("policy/ratio_mean", stats.ratio_mean), ("policy/entropy", stats.entropy),
                             ("policy/grad_norm", gnorm)):
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
        self.policy.eval()
        out = {k: v / max(count, 1) for k, v in sums.items()}
        out["policy/first_step_clipfrac"] = first_clipfrac
        out["policy/behaviour_logp_err"] = logp_err
        out["health/skipped_steps"] = skipped
        for k in ("loss/policy", "policy/clipfrac", "policy/approx_kl"):
            out.setdefault(k, math.nan)
        return out

    def _minibatches(self, n: int, iteration: int, epoch: int) -> list[torch.Tensor]:
        return minibatch_indices(n, self.minibatches, self.seed, iteration, epoch)

    def _apply(self, loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Backward + clipped optimiser step; None (and no step) when loss or gradients are not finite.

        ``mask`` (the minibatch's valid steps) lets a sharded learner reweight its part of the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return None
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        if not torch.isfinite(gnorm):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        return gnorm

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
