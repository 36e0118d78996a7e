"""The executor interface: where the roles run (one process, or Ray actors) behind one small API.

The controller (``tpdm_rl.training.controller``) owns the loop and calls, per iteration:
``rollout_and_score(tasks)`` -> ``update(phase, advantages, iteration)`` -> ``weights()`` ->
``publish(version, weights)``. Both executors return the same typed :class:`RolloutPhase`, so every
metric is computed once, in one place, with the same keys in both modes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from tpdm_rl.algorithm.messages import RolloutSummary, RolloutTask, ScoreResult
from tpdm_rl.algorithm.policy import TimePredictionModule, TPMSpec


class FatalRoleError(RuntimeError):
    """A role keeps failing (e.g. an actor died more often than allowed); the run must stop."""


@dataclass
class RolloutPhase:
    """One iteration's rollouts and their scores, in trajectory order."""

    tasks: list[RolloutTask]
    summaries: list[RolloutSummary]  # per task
    rows: list[Any]  # per task: the learner rows (StepRows in one process, an object reference under Ray)
    raw: dict[str, torch.Tensor]  # component -> [N] raw scores
    extra: dict[str, torch.Tensor]  # "<component>_<metric>" -> [N] logged, not rewarded (e.g. shapes_exact)
    generated_s: float  # from the phase start until the last trajectory was generated
    reward_busy_s: dict[str, float] = field(default_factory=dict)
    reward_calls: dict[str, int] = field(default_factory=dict)

    @property
    def steps(self) -> torch.Tensor:
        return torch.cat([s.steps for s in self.summaries])

    @classmethod
    def assemble(cls, tasks: list[RolloutTask], summaries: dict[int, RolloutSummary], rows: dict[int, Any],
                 scores: dict[str, dict[int, ScoreResult | tuple]], generated_s: float,
                 reward_busy_s: dict[str, float], reward_calls: dict[str, int]) -> RolloutPhase:
        """Put per-task results (keyed by task index) in trajectory order.

        ``scores[component][task]`` is (scores [n], metrics {name: [n]}) for that task."""
        order = sorted(summaries)
        if order != list(range(len(tasks))):
            raise FatalRoleError(f"rollout tasks {order} returned, expected {len(tasks)}")
        raw = {n: torch.cat([per[t][0] for t in order]) for n, per in scores.items()}
        extra: dict[str, torch.Tensor] = {}
        for n, per in scores.items():
            for key in per[order[0]][1]:
                extra[f"{n}_{key}"] = torch.cat([per[t][1][key] for t in order])
        return cls(tasks, [summaries[t] for t in order], [rows[t] for t in order], raw, extra, generated_s,
                   reward_busy_s, reward_calls)

    def metrics(self, phase_s: float, rollout_workers: int) -> dict[str, float]:
        """The phase's ``time/*``, ``rollout/*`` and ``rewards/*`` metrics (identical keys in every mode)."""
        n = int(self.steps.numel())
        out = {
            "time/rollout_s": self.generated_s,
            "time/reference_s": sum(s.reference_s for s in self.summaries),
            "time/reward_s": sum(self.reward_busy_s.values()),
            "time/reward_wait_s": max(0.0, phase_s - self.generated_s),
            "time/rollout_worker_busy_s": sum(s.busy_s for s in self.summaries) / max(rollout_workers, 1),
            "throughput/images_per_s": n / max(self.generated_s, 1e-9),
            "rollout/trajectories": n,
            "rollout/backbone_calls": sum(s.backbone_calls for s in self.summaries),
            "rollout/reference_share": sum(s.reference_slot_steps for s in self.summaries)
            / max(sum(s.slot_steps for s in self.summaries), 1),
        }
        for name, busy in self.reward_busy_s.items():
            out[f"time/reward_{name}_s"] = busy
            out[f"rewards/{name}_calls"] = self.reward_calls.get(name, 0)
        for key, x in self.extra.items():
            out[f"reward/{key}"] = float(x.float().mean())
        return out


def task_advantages(phase: RolloutPhase, advantages: torch.Tensor) -> list[torch.Tensor]:
    """Each task's slice of the per-trajectory advantages."""
    return [advantages[t.lo:t.hi] for t in phase.tasks]


class Executor(ABC):
    """Runs the roles: rollout workers, reward workers and the learner."""

    rollout_workers: int = 1

    @abstractmethod
    def start_workers(self) -> TPMSpec:
        """Start the rollout and reward workers; return the TPM spec the backbone calls for."""

    @abstractmethod
    def start_learner(self, policy: TimePredictionModule, optimizer_state: dict | None) -> None:
        """Start the learner on ``policy``'s weights (and a checkpoint's optimiser state)."""

    @abstractmethod
    def rollout_and_score(self, tasks: list[RolloutTask]) -> RolloutPhase:
        """Generate every task's trajectories and score them with every reward component."""

    @abstractmethod
    def update(self, phase: RolloutPhase, advantages: torch.Tensor, iteration: int) -> dict[str, float]:
        """One PPO update on the phase's rows; returns the learner's metrics."""

    @abstractmethod
    def weights(self) -> dict[str, torch.Tensor]:
        """The learner's current TPM weights (CPU)."""

    @abstractmethod
    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        """Weight sync: every rollout worker loads ``weights`` as policy ``version``."""

    @abstractmethod
    def optimizer_state(self) -> dict | None:
        """The learner's optimiser state for a checkpoint."""

    @abstractmethod
    def inference_settings(self) -> dict:
        """The TPM file's inference metadata (backbone geometry, hooks, stopping rule)."""

    def restarts(self) -> int:
        """Actors replaced since the executor started (0 in one process)."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook: nothing to release in one process
        """Release the roles."""
