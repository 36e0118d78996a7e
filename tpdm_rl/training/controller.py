"""The training controller: one loop for one process and for Ray.

    plan -> rollout and score -> advantages -> update -> weight sync -> metrics -> checkpoint

``Controller.run_iteration`` is that loop, written once; where the roles run is the executor's
business (``executors.local.LocalExecutor`` in this process, ``executors.ray_executor.RayExecutor``
as Ray actors). Every phase is timed with the same ``PhaseTimer`` keys in both modes.

All randomness is counter-based and keyed by (seed, iteration, index): the prompts of an iteration,
every trajectory's initial noise and Beta draws, and the learner's minibatch order. A run therefore
needs no generator state to resume, and the same seed gives the same run bit for bit.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tpdm_rl.algorithm.messages import RolloutTask
from tpdm_rl.algorithm.objective import StepPenalty, compose_reward, grpo_advantages
from tpdm_rl.algorithm.policy import TimePredictionModule, build_policy
from tpdm_rl.core.config import Config, ConfigError
from tpdm_rl.core.config_io import config_to_yaml
from tpdm_rl.core.console import warn
from tpdm_rl.core.devices import check_device
from tpdm_rl.core.prompts import PromptSampler, load_prompts
from tpdm_rl.core.rng import derive_key
from tpdm_rl.core.threads import apply_threads
from tpdm_rl.core.timing import PhaseTimer
from tpdm_rl.executors.base import Executor, FatalRoleError
from tpdm_rl.executors.local import LocalExecutor
from tpdm_rl.executors.ray_executor import RayExecutor  # imports Ray lazily, only for distributed runs
from tpdm_rl.rewards.composition import RewardSet
from tpdm_rl.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    resume_consent,
    save_checkpoint,
)
from tpdm_rl.training.metrics_logger import MetricsLogger
from tpdm_rl.training.runfolder import RunFolder


@dataclass
class IterationPlan:
    """What one iteration generates: N = prompts_per_iteration * group_size trajectories."""
    iteration: int
    prompt_indices: list[int]
    prompts: list[str]  # per trajectory
    group: torch.Tensor  # [N] group id (0..P-1)
    noise_seeds: list[int]  # per trajectory
    sample_keys: torch.Tensor  # [N] int64 keys of the per-trajectory Beta streams

    def tasks(self, group_size: int, groups_per_task: int, need_reference: bool, version: int) -> list[RolloutTask]:
        """Whole prompt groups per task (``groups_per_task`` of them; the last task may hold fewer)."""
        p = len(self.prompt_indices)
        out = []
        for t, g0 in enumerate(range(0, p, groups_per_task)):
            lo, hi = g0 * group_size, min(p, g0 + groups_per_task) * group_size
            out.append(RolloutTask(t, lo, hi, self.prompts[lo:hi], self.noise_seeds[lo:hi], self.sample_keys[lo:hi],
                                   need_reference, version))
        return out


def plan_iteration(cfg: Config, sampler: PromptSampler, prompts: list[str], iteration: int) -> IterationPlan:
    p, g = cfg.rollout.prompts_per_iteration, cfg.rollout.group_size
    idx = sampler.sample(iteration, p)
    traj_prompts = [prompts[i] for i in idx for _ in range(g)]
    group = torch.arange(p).repeat_interleave(g)
    if cfg.rollout.same_noise_per_group:
        seeds = [derive_key(cfg.seed, 0xA015E, iteration, gi) for gi in range(p) for _ in range(g)]
    else:
        seeds = [derive_key(cfg.seed, 0xA015E, iteration, gi, j) for gi in range(p) for j in range(g)]
    bank = cfg.rollout.noise_bank
    if bank:  # the noise repeats per prompt: seed k of prompt i's bank, k chosen by the draw above
        seeds = [derive_key(cfg.seed, 0xBA2C, idx[t // g], s % bank) for t, s in enumerate(seeds)]
    keys = torch.tensor([derive_key(cfg.seed, 0xBE7A, iteration, t) for t in range(p * g)], dtype=torch.int64)
    return IterationPlan(iteration, list(idx), traj_prompts, group, seeds, keys)


def score_iteration(cfg: Config, rewards: RewardSet, raw: dict[str, torch.Tensor], steps: torch.Tensor,
                    group: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """Reward metrics and GRPO advantages from raw component scores (None when a score is not finite)."""
    metrics: dict = {f"reward/{name}": float(x.mean()) for name, x in raw.items()}
    metrics.update(step_metrics(steps, group))
    bad = rewards.first_nonfinite(raw)
    if bad is not None:
        metrics["reward/total"] = float("nan")
        metrics["health/nonfinite_reward"] = bad
        return metrics, None
    normed = rewards.normalize(raw, group)
    penalty, alg = StepPenalty.from_config(cfg.step_penalty), cfg.algorithm
    total = compose_reward(normed, rewards.weights, steps, penalty)
    metrics["reward/total"] = float(total.mean())
    metrics["reward/step_penalty"] = penalty.charged(steps.float().mean())
    adv = grpo_advantages(normed, rewards.weights, steps, group, penalty, alg.adv_std, alg.per_reward_norm,
                          alg.adv_eps)
    return metrics, adv


def step_metrics(steps: torch.Tensor, group: torch.Tensor | None = None) -> dict[str, float]:
    """Step counts of an iteration. With the prompt groups: ``steps/prompt_spread``, the std over prompts of each
    prompt's mean steps (a policy that adapts per prompt raises it above its sampling floor, about
    ``steps/group_std`` / sqrt(group size)), and ``steps/group_std``, the mean std within a prompt's group (what
    is left to explore)."""
    s = steps.double()
    out = {"steps/mean": float(s.mean()), "steps/min": float(s.min()), "steps/max": float(s.max()),
           "steps/std": float(s.std()) if s.numel() > 1 else 0.0}
    if group is not None and s.numel():
        g = torch.unique(group, return_inverse=True)[1]
        n = int(g.max()) + 1
        cnt = torch.zeros(n, dtype=torch.float64).index_add_(0, g, torch.ones_like(s))
        mean = torch.zeros(n, dtype=torch.float64).index_add_(0, g, s) / cnt
        var = torch.zeros(n, dtype=torch.float64).index_add_(0, g, (s - mean[g]) ** 2) / (cnt - 1).clamp_min(1)
        out["steps/prompt_spread"] = float(mean.std()) if n > 1 else 0.0
        out["steps/group_std"] = float(var.sqrt().mean())
    return out


def make_executor(cfg: Config, backbone_path: str, address: str | None = None) -> Executor:
    """Ray when ``distributed.enabled`` or an address is given, else everything in this process."""
    if cfg.distributed.enabled or address:
        return RayExecutor(cfg, backbone_path, address if address is not None else cfg.distributed.address)

    return LocalExecutor(cfg, backbone_path)


def _check_backbone_path(path: str) -> str:
    if not path:
        raise ConfigError("config error: backbone.path is empty and no backbone_path was given: the tiny backbone "
                          "is built by the application (tpdm-rl train, or "
                          "tpdm_rl.builders.tiny_backbone.run_backbone_path(cfg, output))")
    return path


class Controller:
    """Runs ``cfg.train.iterations`` iterations of the loop on an executor, with checkpoints and metrics."""
    def __init__(self, cfg: Config, output: str | Path | None = None, resume: str | None = None,
                 address: str | None = None, executor: Executor | None = None, overwrite: bool = False,
                 allow_config_change: list[str] | tuple[str, ...] = (), fresh_optimizer: bool = False,
                 thread_role: str = "train", backbone_path: str | Callable[[], str] | None = None) -> None:
        """``backbone_path``: the backbone to load, resolved by the application (``cfg.backbone.path`` when not
        given, which must then name one). A callable is called once the start-up checks have passed and the run
        folder is taken: ``tpdm-rl train`` and the sweep trials build the tiny backbone (an empty ``backbone.path``)
        only when the run goes ahead (``tpdm_rl.builders.tiny_backbone.run_backbone_path``)."""
        self.cfg = cfg
        if backbone_path is None:
            backbone_path = _check_backbone_path(cfg.backbone.path)
        self.output = Path(output or cfg.output)
        self.ckpt_root = self.output / "checkpoints"
        self.threads = apply_threads(cfg.train.threads, thread_role)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # start-up checks that must fail before anything is written: prompts, device, checkpoint, config changes
        self.prompts = load_prompts(cfg.rollout.prompts, toy="shapes" in cfg.rewards)  # before any model loads
        self.sampler = PromptSampler(self.prompts, cfg.seed)
        for key in ("train.device", "backbone.device"):
            check_device(key, cfg.train.device if key == "train.device" else cfg.backbone.device)
        if allow_config_change and not resume:
            raise ConfigError(f"config error: --allow-config-change {' '.join(allow_config_change)} needs --resume "
                              "(it accepts changes against the checkpoint being resumed)")
        if cfg.logging.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ConfigError("config error: logging.wandb_project is set but wandb is not installed; "
                              "pip install 'tpdm-rl[wandb]' or leave logging.wandb_project empty")
        ckpt = self._find_resume(resume)
        changes = resume_consent(ckpt, cfg, allow_config_change, fresh_optimizer)
        self.folder = RunFolder(self.output).acquire(resume=bool(resume), overwrite=overwrite)
        self.backbone_path = _check_backbone_path(backbone_path() if callable(backbone_path) else backbone_path)
        self.rewards = RewardSet(cfg.rewards)
        self.start_iteration = 0
        self.policy_version = 0
        self.skipped_updates = 0
        self.restarts_before = 0
        self.executor = executor or make_executor(cfg, self.backbone_path, address)
        try:
            self._start(ckpt)
        except BaseException:
            self.executor.close()
            self.folder.release()
            raise
        self.resumed_from = ckpt["path"] if ckpt is not None else None
        self.metrics = MetricsLogger(self.output, tensorboard=cfg.logging.tensorboard,
                                     wandb_project=cfg.logging.wandb_project, config=cfg.model_dump(mode="json"),
                                     resume_from_iteration=self.start_iteration if ckpt is not None else None,
                                     wandb_id=ckpt["state"].get("wandb_run_id") if ckpt is not None else None)
        (self.output / "config.yaml").write_text(config_to_yaml(cfg))
        if ckpt is None and self.folder.retried:
            warn(f"{self.output}: the previous start failed before its first iteration; starting over in the same "
                 "folder")
        if ckpt is None:
            self.folder.record("start", iterations=cfg.train.iterations, moved_previous_run_to=str(
                self.folder.moved_to) if self.folder.moved_to else None)
        else:
            self.folder.record("resume", checkpoint=str(ckpt["path"]), iteration=self.start_iteration,
                               config_changes={k: list(v) for k, v in changes.items()})

    def _start(self, ckpt: dict | None) -> None:
        cfg = self.cfg
        spec = self.executor.start_workers()
        self.policy: TimePredictionModule = build_policy(cfg, spec.in_channels, spec.temb_dim).eval()
        if self.policy.spec != spec:
            raise CheckpointError(f"rollout worker TPM spec {spec} differs from the controller's {self.policy.spec}")
        optimizer_state = None
        if ckpt is not None:
            if ckpt["policy"].spec != spec:
                raise CheckpointError(f"checkpoint {str(ckpt['path'])!r} has TPM spec {ckpt['policy'].spec}, but "
                                      f"this config and backbone need {spec}")
            self.policy.load_state_dict(ckpt["policy"].state_dict())
            optimizer_state = ckpt["optimizer"]
            st = ckpt["state"]
            self.start_iteration = int(st["iteration"])
            self.policy_version = int(st.get("policy_version", self.start_iteration))
            self.rewards.load_state_dict(st.get("reward_norm", {}))
            self.skipped_updates = int(st.get("skipped_updates", 0))
            self.restarts_before = int(st.get("actor_restarts", 0))
        try:
            self.executor.start_learner(self.policy, optimizer_state)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {str(ckpt['path'])!r} cannot resume this learner: {exc}") from None
        self.executor.publish(self.policy_version, self.policy.state_dict())

    def _find_resume(self, resume: str | None) -> dict | None:
        if not resume:
            return None
        if resume == "auto":
            path = latest_checkpoint(self.ckpt_root)
            return load_checkpoint(path) if path is not None else None
        return load_checkpoint(Path(resume))

    @property
    def actor_restarts(self) -> int:
        return self.restarts_before + self.executor.restarts()

    # ------------------------------------------------------------------ one iteration
    def run_iteration(self, it: int) -> dict:
        cfg, ex = self.cfg, self.executor
        timer = PhaseTimer()
        learn: dict = {}
        with timer("iteration"):
            plan = plan_iteration(cfg, self.sampler, self.prompts, it)
            groups = cfg.distributed.groups_per_task or -(-cfg.rollout.prompts_per_iteration // ex.rollout_workers)
            tasks = plan.tasks(cfg.rollout.group_size, groups, self.rewards.needs_reference, self.policy_version)
            with timer("rollout_and_score"):
                phase = ex.rollout_and_score(tasks)
            metrics, advantages = score_iteration(cfg, self.rewards, phase.raw, phase.steps, plan.group)
            if advantages is None:
                self.skipped_updates += 1
            else:
                with timer("learn"):
                    learn = ex.update(phase, advantages, it)
                if learn.get("health/skipped_steps", 0):
                    self.skipped_updates += 1
                self.policy_version += 1
                with timer("sync"):
                    self.policy.load_state_dict(ex.weights())
                    ex.publish(self.policy_version, self.policy.state_dict())
        times = {"time/learn_s": 0.0, "time/sync_s": 0.0, **timer.metrics()}
        return {"iteration": it, **metrics, **learn, **times,
                **phase.metrics(timer.seconds["rollout_and_score"], ex.rollout_workers),
                "policy/version": self.policy_version, "health/skipped_updates": self.skipped_updates,
                "health/actor_restarts": self.actor_restarts}

    # ------------------------------------------------------------------ the run
    def checkpoint(self, next_iteration: int) -> Path:
        state = {"iteration": next_iteration, "policy_version": self.policy_version,
                 "reward_norm": self.rewards.state_dict(), "skipped_updates": self.skipped_updates,
                 "actor_restarts": self.actor_restarts, "seed": self.cfg.seed, "backbone_path": self.backbone_path,
                 "wandb_run_id": self.metrics.wandb_id,
                 "rng": "none: every random draw is keyed by (seed, iteration, index)"}
        return save_checkpoint(self.ckpt_root, next_iteration, self.policy, self.executor.optimizer_state(), state,
                               config_to_yaml(self.cfg), keep_last=self.cfg.checkpoint.keep_last,
                               tpm_meta={"inference": self.executor.inference_settings()})

    def train(self, on_iteration: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Run the remaining iterations; returns this call's metrics records.

        ``on_iteration(iteration, metrics)`` is called after each iteration's metrics are logged and before its
        checkpoint (sweeps report to Ray Tune and record progress through it)."""
        cfg = self.cfg
        records = []
        bar = tqdm(range(self.start_iteration, cfg.train.iterations), total=cfg.train.iterations,
                   initial=self.start_iteration, desc="train", disable=not cfg.logging.progress, dynamic_ncols=True)
        try:
            for it in bar:
                try:
                    m = self.run_iteration(it)
                except FatalRoleError as exc:
                    exc.checkpointed = self.checkpoint(it)  # the state after the last completed iteration
                    raise
                self.metrics.log(m)
                if on_iteration is not None:
                    on_iteration(it, m)
                records.append(m)
                bar.set_postfix(reward=f"{m['reward/total']:.3f}", steps=f"{m['steps/mean']:.1f}")
                last = it + 1 == cfg.train.iterations
                if (it + 1) % cfg.checkpoint.every == 0 or last:
                    self.checkpoint(it + 1)
        finally:
            bar.close()
            self.metrics.close()
            self.close()
        return records

    def close(self) -> None:
        try:
            self.executor.close()
        finally:
            self.folder.release()
