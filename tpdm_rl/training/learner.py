"""The learner: recomputes per-step log-probs from stored features and applies PPO-clip updates.

The batch is a packed table of steps (``tpdm_rl.algorithm.messages.LearnBatch``). The same TPM code that the
rollout used turns the stored (pooled, storage-dtype) features into its action's log-probs, so on the first
epoch ratio = 1 and clipfrac = 0 up to float rounding.

Memory is bounded: rows stay on the host in their storage dtype, and one minibatch at a time is
moved to the learner's device and up-cast to float32.
"""

from __future__ import annotations

import math

import torch

from tpdm_rl.algorithm.messages import LearnBatch
from tpdm_rl.algorithm.objective import ppo_clip_loss
from tpdm_rl.algorithm.policy import TimePredictionModule
from tpdm_rl.core.config import AlgorithmConfig, OptimConfig
from tpdm_rl.core.rng import derive_key


def policy_terms(policy: TimePredictionModule, batch: LearnBatch
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(log-prob of the stored actions, entropy, the distribution's parameters) under ``policy``."""
    params = policy(batch.features, batch.temb, batch.sigma)
    return policy.log_prob(params, batch.action), policy.entropy(params), params


def minibatch_indices(n: int, minibatches: int, seed: int, iteration: int, epoch: int) -> list[torch.Tensor]:
    """A seeded permutation of the rows split into ``minibatches`` nearly equal parts."""
    g = torch.Generator().manual_seed(derive_key(seed, 0x1EA, iteration, epoch))
    perm = torch.randperm(n, generator=g)
    k = max(1, min(minibatches, n))
    return [p for p in torch.tensor_split(perm, k) if p.numel()]


class Learner:
    """Single-process PPO learner over the TPM (AdamW, grad clipping, optional KL to a reference TPM).

    ``reference``: the frozen policy of the KL term, the run's *initial* TPM (rebuilt from the seed
    by the caller, so a resumed run uses the same reference as the uninterrupted one).
    """

    def __init__(self, policy: TimePredictionModule, optim: OptimConfig, algorithm: AlgorithmConfig, seed: int,
                 device: str | torch.device = "cpu", reference: TimePredictionModule | None = None) -> None:
        self.device = torch.device(device)
        self.policy = policy.to(self.device)
        self.algorithm, self.seed = algorithm, seed
        self.optimizer = self._make_optimizer(optim)
        self.reference = None
        if algorithm.kl_coef > 0:
            if reference is None:
                raise ValueError("algorithm.kl_coef > 0 needs the reference TPM")
            self.reference = reference.to(self.device).requires_grad_(False).eval()

    def _make_optimizer(self, optim: OptimConfig) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.policy.parameters(), lr=optim.lr, weight_decay=optim.weight_decay,
                                 betas=tuple(optim.betas), eps=optim.eps)

    @torch.no_grad()
    def behaviour_logp_error(self, batch: LearnBatch, chunk: int) -> float:
        """Max |recomputed - stored| log-prob over valid rows, one chunk at a time on the device."""
        err = 0.0
        for lo in range(0, len(batch), max(1, chunk)):
            mb = batch.rows(torch.arange(lo, min(lo + chunk, len(batch)))).to(self.device)
            if mb.mask.any():
                logp = policy_terms(self.policy, mb)[0]
                err = max(err, float((logp - mb.old_logp).abs()[mb.mask].max()))
        return err

    def update(self, batch: LearnBatch, iteration: int) -> dict[str, float]:
        """Several epochs of minibatch PPO on one rollout batch; returns averaged metrics.

        A non-finite loss or gradient skips that optimiser step (counted in ``health/skipped_steps``).
        """
        alg = self.algorithm
        self.policy.train()
        sums: dict[str, float] = {}
        count, skipped, first_clipfrac = 0, 0, 0.0
        chunk = -(-max(len(batch), 1) // alg.minibatches)
        logp_err = self.behaviour_logp_error(batch, chunk)  # before any step the ratio must be 1
        for epoch in range(alg.epochs):
            for idx in self._minibatches(len(batch), iteration, epoch):
                mb = batch.rows(idx).to(self.device)
                logp, ent, params = policy_terms(self.policy, mb)
                kl = None
                if self.reference is not None:
                    with torch.no_grad():
                        ref = self.reference(mb.features, mb.temb, mb.sigma)
                    kl = self.policy.kl(params, ref)
                stats = ppo_clip_loss(logp, mb.old_logp, mb.advantage, mb.mask, alg.clip_eps, kl, alg.kl_coef, ent,
                                      alg.entropy_coef)
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
        return minibatch_indices(n, self.algorithm.minibatches, self.seed, iteration, epoch)

    def _apply(self, loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Backward + clipped optimiser step; None (and no step) when loss or gradients are not finite.

        ``mask`` (the minibatch's valid steps) lets a sharded learner reweight its part of the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return None
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.algorithm.max_grad_norm)
        if not torch.isfinite(gnorm):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        return gnorm

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
