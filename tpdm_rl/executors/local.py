"""The local executor: every role in this process, called directly, one after the other."""

from __future__ import annotations

import copy
import time

import torch

from tpdm_rl.algorithm.messages import LearnBatch, RolloutTask
from tpdm_rl.algorithm.policy import TimePredictionModule, TPMSpec, build_policy
from tpdm_rl.core.config import Config
from tpdm_rl.core.devices import resolve_device
from tpdm_rl.executors.base import Executor, RolloutPhase, task_advantages
from tpdm_rl.rewards.worker import RewardWorker
from tpdm_rl.rollout.worker import RolloutWorker
from tpdm_rl.training.checkpoint import CheckpointError
from tpdm_rl.training.learner import Learner


class LocalExecutor(Executor):
    """One rollout worker, one reward worker per component and a single-process learner."""

    rollout_workers = 1

    def __init__(self, cfg: Config, backbone_path: str) -> None:
        self.cfg = cfg
        self.backbone_path = backbone_path

    def start_workers(self) -> TPMSpec:
        self.worker = RolloutWorker(self.cfg, self.backbone_path)
        self.reward_workers = {name: RewardWorker(name, self.cfg.reward_options(name)) for name in self.cfg.rewards}
        return self.worker.policy.spec

    def start_learner(self, policy: TimePredictionModule, optimizer_state: dict | None) -> None:
        cfg = self.cfg
        if optimizer_state is not None and "zero" in optimizer_state:
            z = optimizer_state["zero"]
            raise CheckpointError(f"its optimizer state is ZeRO-{z['stage']} partitioned over {len(z['ranks'])} "
                                     "learner ranks; resume it with distributed.enabled=true and the same "
                                     "distributed.learner settings")
        spec = policy.spec
        reference = build_policy(cfg, spec.in_channels, spec.temb_dim) if cfg.algorithm.kl_coef > 0 else None
        self.learner = Learner(copy.deepcopy(policy), cfg.optim, cfg.algorithm, cfg.seed,
                               resolve_device(cfg.train.device), reference)
        if optimizer_state is not None:
            self.learner.load_state_dict(optimizer_state)

    def rollout_and_score(self, tasks: list[RolloutTask]) -> RolloutPhase:
        t0 = time.perf_counter()
        results = [self.worker.run_task(task) for task in tasks]
        generated_s = time.perf_counter() - t0
        scores, busy, calls = {}, {}, {}
        for name, rw in self.reward_workers.items():
            res = rw.score_many(*[r[2] for r in results])
            scores[name] = {t: (s, m) for t, (s, m) in enumerate(zip(res.scores, res.metrics))}
            busy[name], calls[name] = res.busy_s, 1
        return RolloutPhase.assemble(tasks, {t: r[0] for t, r in enumerate(results)},
                                     {t: r[1] for t, r in enumerate(results)}, scores, generated_s, busy, calls)

    def update(self, phase: RolloutPhase, advantages: torch.Tensor, iteration: int) -> dict[str, float]:
        batch = LearnBatch.from_rows([(rows, 0, len(rows), adv)
                                      for rows, adv in zip(phase.rows, task_advantages(phase, advantages))])
        out = self.learner.update(batch, iteration)
        out["learner/ranks"] = 1
        out["learner/rows"] = len(batch)
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        return self.learner.weights()

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> None:
        self.worker.set_weights(version, weights)

    def optimizer_state(self) -> dict | None:
        return self.learner.state_dict()

    def inference_settings(self) -> dict:
        return self.worker.inference_settings()
