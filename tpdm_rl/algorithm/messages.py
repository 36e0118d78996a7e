"""Typed messages between the roles: rollout task -> (summary, learner rows, images) -> learn batch.

The same classes cross a function call in one process and an object-store reference under Ray, so
the two executors cannot disagree about a field. ``LearnBatch.from_rows`` is the one place where
rollout rows become learner input.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class RolloutTask:
    """A slice ``[lo, hi)`` of an iteration's trajectories for one rollout worker."""

    task: int
    lo: int
    hi: int
    prompts: list[str]
    noise_seeds: list[int]
    sample_keys: torch.Tensor  # [n] int64 keys of the per-trajectory Beta streams
    need_reference: bool
    version: int  # policy version the task must run with

    def __len__(self) -> int:
        return self.hi - self.lo


@dataclass
class StepRows:
    """The learner's rows of one task: one per trajectory step, sorted by (trajectory, step).

    Features stay in the storage dtype (e.g. bf16); the learner up-casts one minibatch at a time.
    """

    traj: torch.Tensor  # [R] int64 trajectory index within the task
    step: torch.Tensor  # [R] int64
    sigma: torch.Tensor  # [R] float32
    action: torch.Tensor  # [R] float32 sampled ratio
    logp: torch.Tensor  # [R] float32 behaviour log-prob
    valid: torch.Tensor  # [R] bool: counts in the loss
    features: torch.Tensor  # [R, F, g, g] storage dtype
    temb: torch.Tensor  # [R, D] storage dtype

    def __len__(self) -> int:
        return int(self.sigma.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).element_size() * getattr(self, f.name).numel() for f in fields(self))


@dataclass
class ImageBatch:
    """What a reward worker needs from one task."""

    images: torch.Tensor  # [n, 3, H, W] in [0, 1]
    prompts: list[str]
    references: torch.Tensor | None = None  # [n, 3, H, W] fidelity references, when a reward needs them


@dataclass
class RolloutSummary:
    """The small part of a task's result that the controller reads."""

    task: int
    steps: torch.Tensor  # [n] int64 denoising steps (= NFE) per trajectory
    rows: int
    policy_version: int
    busy_s: float  # generation (+ references) wall time on the worker
    reference_s: float  # of which the fidelity references (their share of the slot-steps)
    backbone_calls: int
    slot_steps: int = 0  # trajectory-steps computed (policy + references)
    reference_slot_steps: int = 0  # of which for fidelity references
    reference_hits: int = 0  # the worker's reference cache so far
    reference_misses: int = 0


@dataclass
class ScoreResult:
    """One reward component's scores for several tasks (in the order they were asked)."""

    scores: list[torch.Tensor]  # per task [n] float32
    metrics: list[dict[str, torch.Tensor]]  # per task: extra per-trajectory metrics (e.g. exact match)
    busy_s: float


_BATCH_FIELDS = ("features", "temb", "sigma", "action", "old_logp", "advantage", "mask")


@dataclass
class LearnBatch:
    """Rollout steps ready for the learner (CPU, features in their storage dtype; R rows)."""

    features: torch.Tensor  # [R, F, g, g]
    temb: torch.Tensor  # [R, D]
    sigma: torch.Tensor  # [R]
    action: torch.Tensor  # [R]
    old_logp: torch.Tensor  # [R]
    advantage: torch.Tensor  # [R] trajectory advantage broadcast to its steps
    mask: torch.Tensor  # [R] bool, steps that count in the loss

    def __len__(self) -> int:
        return int(self.sigma.shape[0])

    @classmethod
    def from_rows(cls, pieces: list[tuple[StepRows, int, int, torch.Tensor]]) -> LearnBatch:
        """Rows ``[start, end)`` of each task's ``StepRows``, each with that task's per-trajectory advantages."""
        parts = []
        for rows, start, end, adv in pieces:
            sl = slice(start, end)
            parts.append((rows.features[sl], rows.temb[sl], rows.sigma[sl], rows.action[sl], rows.logp[sl],
                          adv[rows.traj[sl]].float(), rows.valid[sl]))
        return cls(*(torch.cat([p[i] for p in parts]) for i in range(len(_BATCH_FIELDS))))

    def rows(self, idx: torch.Tensor) -> LearnBatch:
        return LearnBatch(*(getattr(self, f)[idx] for f in _BATCH_FIELDS))

    def to(self, device: torch.device) -> LearnBatch:
        """On ``device``, features and temb up-cast to float32 (call per minibatch: bounded memory)."""
        out = {f: getattr(self, f).to(device) for f in _BATCH_FIELDS}
        out["features"] = out["features"].float()
        out["temb"] = out["temb"].float()
        return LearnBatch(**out)
