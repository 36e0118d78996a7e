"""The single-process training controller: plan -> rollout -> rewards -> advantages -> update -> log.

All randomness is counter-based and keyed by (seed, iteration, index): the prompts of an iteration,
every trajectory's initial noise and Beta draws, and the learner's minibatch order. A run therefore
needs no generator state to resume, and the same seed gives the same run bit for bit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rewards.composition import RewardSet
from rollout.rng import derive_key
from rollout.trajectory import Trajectories
from rollout.worker import RolloutWorker, resolve_backbone_path

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, config_to_yaml
from .learner import LearnBatch, Learner
from .metrics import MetricsLogger
from .objective import compose_reward, grpo_advantages
from .policy import TimePredictionModule, TPMSpec
from .prompts import PromptSampler, load_prompts


class FatalRoleError(RuntimeError):
    """A role keeps failing (e.g. an actor died more often than allowed); the run must stop."""


@dataclass
class IterationPlan:
    """What one iteration generates: N = prompts_per_iteration * group_size trajectories."""

    iteration: int
    prompt_indices: list[int]
    prompts: list[str]  # per trajectory
    group: torch.Tensor  # [N] group id (0..P-1)
    noise_seeds: list[int]  # per trajectory
    sample_keys: torch.Tensor  # [N] int64 keys of the per-trajectory Beta streams


def plan_iteration(cfg: Config, sampler: PromptSampler, prompts: list[str], iteration: int) -> IterationPlan:
    p, g = cfg.rollout.prompts_per_iteration, cfg.rollout.group_size
    idx = sampler.sample(iteration, p)
    traj_prompts = [prompts[i] for i in idx for _ in range(g)]
    group = torch.arange(p).repeat_interleave(g)
    if cfg.rollout.same_noise_per_group:
        seeds = [derive_key(cfg.seed, 0xA015E, iteration, gi) for gi in range(p) for _ in range(g)]
    else:
        seeds = [derive_key(cfg.seed, 0xA015E, iteration, gi, j) for gi in range(p) for j in range(g)]
    keys = torch.tensor([derive_key(cfg.seed, 0xBE7A, iteration, t) for t in range(p * g)], dtype=torch.int64)
    return IterationPlan(iteration, list(idx), traj_prompts, group, seeds, keys)


def build_policy(cfg: Config, feature_channels: int, temb_dim: int) -> TimePredictionModule:
    spec = TPMSpec(in_channels=feature_channels, temb_dim=temb_dim, grid=cfg.backbone.feature_grid,
                   hidden=cfg.policy.hidden, feature_blocks=tuple(cfg.backbone.feature_blocks),
                   init_ratio=cfg.policy.init_ratio, init_concentration=cfg.policy.init_concentration)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(derive_key(cfg.seed, 0x7B3) % (2**63))
    try:
        return TimePredictionModule(spec)
    finally:
        torch.random.set_rng_state(gen_state)


def inference_meta(cfg: Config, backbone, backbone_path: str) -> dict:
    """What a TPM file must carry to be used without its training config (checked at load time)."""
    return {
        "backbone_path": backbone_path, "backbone_blocks": len(backbone.transformer.transformer_blocks),
        "hidden_size": backbone.hidden_size, "feature_blocks": list(backbone.feature_blocks),
        "feature_grid": backbone.feature_grid, "feature_dtype": cfg.backbone.feature_dtype,
        "resolution": cfg.backbone.resolution, "guidance_scale": cfg.backbone.guidance_scale,
        "max_sequence_length": cfg.backbone.max_sequence_length, "negative_prompt": cfg.backbone.negative_prompt,
        "sigma_max": cfg.rollout.sigma_max, "sigma_min": cfg.rollout.sigma_min, "max_steps": cfg.rollout.max_steps,
    }


def learn_batch(trajs: Trajectories, advantages: torch.Tensor) -> LearnBatch:
    """Broadcast each trajectory's advantage to its steps."""
    return LearnBatch(features=trajs.features.float(), temb=trajs.temb.float(), sigma=trajs.sigma,
                      action=trajs.action, old_logp=trajs.logp, advantage=advantages[trajs.traj].float(),
                      mask=trajs.valid)


def score_iteration(cfg: Config, rewards: RewardSet, raw: dict[str, torch.Tensor], steps: torch.Tensor,
                    group: torch.Tensor) -> tuple[dict, torch.Tensor | None]:
    """Reward metrics and GRPO advantages from raw component scores (None when a score is not finite)."""
    metrics: dict = {f"reward/{name}": float(x.mean()) for name, x in raw.items()}
    metrics.update(step_metrics(steps))
    bad = rewards.first_nonfinite(raw)
    if bad is not None:
        metrics["reward/total"] = float("nan")
        metrics["health/nonfinite_reward"] = bad
        return metrics, None
    normed = rewards.normalize(raw, group)
    sp, alg = cfg.step_penalty, cfg.algorithm
    total = compose_reward(normed, rewards.weights, steps, sp.mode, sp.coef, sp.gamma)
    metrics["reward/total"] = float(total.mean())
    metrics["reward/step_penalty"] = float(sp.coef * steps.float().mean()) if sp.mode == "additive" else 0.0
    adv = grpo_advantages(normed, rewards.weights, steps, group, sp.mode, sp.coef, sp.gamma, alg.adv_std,
                          alg.per_reward_norm, alg.adv_eps)
    return metrics, adv


def step_metrics(steps: torch.Tensor) -> dict[str, float]:
    s = steps.float()
    return {"steps/mean": float(s.mean()), "steps/min": float(s.min()), "steps/max": float(s.max()),
            "steps/std": float(s.std()) if s.numel() > 1 else 0.0}


class Trainer:
    """Runs ``cfg.train.iterations`` iterations in one process.

    The Ray trainer (``tpdm_rl.ray_trainer``) subclasses this and replaces only the roles
    (``_setup_roles``, ``run_iteration``, optimiser state); the loop, checkpoints and metrics are shared.
    """

    def __init__(self, cfg: Config, output: str | Path | None = None, resume: str | None = None) -> None:
        self.cfg = cfg
        self.output = Path(output or cfg.output)
        self.output.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.output / "checkpoints"
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # start-up checks that must fail before any rollout: prompts, rewards, checkpoint
        self.prompts = load_prompts(cfg.rollout.prompts)
        self.sampler = PromptSampler(self.prompts, cfg.seed)
        ckpt = self._find_resume(resume)
        tiny_dir = cfg.backbone.tiny_dir or str(self.output / "tiny_backbone")
        self.backbone_path = resolve_backbone_path(cfg.backbone.path, str(Path(tiny_dir).resolve()),
                                                   cfg.backbone.tiny_seed, cfg.backbone.resolution)
        self.start_iteration = 0
        self.policy_version = 0
        self.skipped_updates = 0
        self.actor_restarts = 0
        self._setup_roles(ckpt)
        if ckpt is not None:
            st = ckpt["state"]
            self.start_iteration = int(st["iteration"])
            self.policy_version = int(st.get("policy_version", self.start_iteration))
            self.rewards.load_state_dict(st.get("reward_norm", {}))
            self.skipped_updates = int(st.get("skipped_updates", 0))
            self.actor_restarts = int(st.get("actor_restarts", 0))
        self.resumed_from = ckpt["path"] if ckpt is not None else None
        self.metrics = MetricsLogger(self.output, tensorboard=cfg.logging.tensorboard,
                                     wandb_project=cfg.logging.wandb_project, config=cfg.model_dump(mode="json"),
                                     resume_from_iteration=self.start_iteration if ckpt is not None else None)
        (self.output / "config.yaml").write_text(config_to_yaml(cfg))

    def _check_spec(self, ckpt: dict, policy: TimePredictionModule) -> None:
        loaded = ckpt["policy"]
        if loaded.spec != policy.spec:
            raise CheckpointError(f"checkpoint {str(ckpt['path'])!r} has TPM spec {loaded.spec}, but this config "
                                  f"and backbone need {policy.spec}")

    def _setup_roles(self, ckpt: dict | None) -> None:
        """Local roles: reward models, the rollout worker (backbone) and the learner."""
        cfg = self.cfg
        self.rewards = RewardSet(cfg.rewards)
        self.worker = RolloutWorker(cfg.backbone, cfg.rollout, self.backbone_path)
        bb = self.worker.backbone
        policy = build_policy(cfg, bb.feature_channels, bb.temb_dim)
        if ckpt is not None:
            self._check_spec(ckpt, policy)
            policy.load_state_dict(ckpt["policy"].state_dict())
        device = cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.learner = Learner(policy, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                               betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, clip_eps=cfg.algorithm.clip_eps,
                               epochs=cfg.algorithm.epochs, minibatches=cfg.algorithm.minibatches,
                               max_grad_norm=cfg.algorithm.max_grad_norm, kl_coef=cfg.algorithm.kl_coef,
                               seed=cfg.seed, device=device)
        if ckpt is not None and ckpt["optimizer"] is not None:
            if "zero" in ckpt["optimizer"]:
                z = ckpt["optimizer"]["zero"]
                raise CheckpointError(f"checkpoint {str(ckpt['path'])!r} holds ZeRO-{z['stage']} optimizer state "
                                      f"partitioned over {len(z['ranks'])} learner ranks; resume it with "
                                      "distributed.enabled=true and the same distributed.learner settings")
            self.learner.load_state_dict(ckpt["optimizer"])

    def _optimizer_state(self) -> dict | None:
        return self.learner.state_dict()

    def _inference_backbone(self):
        return self.worker.backbone

    def close(self) -> None:
        """Release roles (nothing to do in one process)."""

    @property
    def policy(self) -> TimePredictionModule:
        return self.learner.policy

    def _find_resume(self, resume: str | None) -> dict | None:
        if not resume:
            return None
        if resume == "auto":
            path = latest_checkpoint(self.ckpt_root)
            return load_checkpoint(path) if path is not None else None
        return load_checkpoint(Path(resume))

    # ------------------------------------------------------------------ one iteration
    def run_iteration(self, it: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        plan = plan_iteration(cfg, self.sampler, self.prompts, it)
        self.policy.eval()
        trajs = self.worker.generate(self.policy, plan.prompts, plan.noise_seeds, plan.sample_keys,
                                     policy_version=self.policy_version)
        t1 = time.perf_counter()
        refs = self.worker.references(plan.prompts, plan.noise_seeds) if self.rewards.needs_reference else None
        t2 = time.perf_counter()
        raw = self.rewards.score(trajs.images, plan.prompts, refs)
        t3 = time.perf_counter()
        metrics, adv = score_iteration(cfg, self.rewards, raw, trajs.steps, plan.group)
        metrics = {"iteration": it, **metrics}
        learn = {}
        if adv is None:
            self.skipped_updates += 1
        else:
            learn = self.learner.update(learn_batch(trajs, adv), it)
            if learn.get("health/skipped_steps", 0):
                self.skipped_updates += 1
            self.policy_version += 1
        t4 = time.perf_counter()
        metrics.update(learn)
        metrics.update({
            "time/rollout_s": t1 - t0, "time/reference_s": t2 - t1, "time/reward_s": t3 - t2,
            "time/learn_s": t4 - t3, "time/iteration_s": t4 - t0,
            "throughput/images_per_s": trajs.num_trajectories / max(t1 - t0, 1e-9),
            "policy/version": self.policy_version, "health/skipped_updates": self.skipped_updates,
            "rollout/backbone_calls": self.worker.engine.stats["backbone_calls"],
        })
        return metrics

    def checkpoint(self, next_iteration: int) -> Path:
        state = {"iteration": next_iteration, "policy_version": self.policy_version,
                 "reward_norm": self.rewards.state_dict(), "skipped_updates": self.skipped_updates,
                 "actor_restarts": self.actor_restarts, "seed": self.cfg.seed, "backbone_path": self.backbone_path,
                 "rng": "none: every random draw is keyed by (seed, iteration, index)"}
        return save_checkpoint(self.ckpt_root, next_iteration, self.policy, self._optimizer_state(), state,
                               config_to_yaml(self.cfg), keep_last=self.cfg.checkpoint.keep_last,
                               tpm_meta={"inference": self._inference_meta()})

    def _inference_meta(self) -> dict:
        return inference_meta(self.cfg, self._inference_backbone(), self.backbone_path)

    def train(self) -> list[dict]:
        """Run the remaining iterations; returns this call's metrics records."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        records = []
        bar = tqdm(range(self.start_iteration, cfg.train.iterations), total=cfg.train.iterations,
                   initial=self.start_iteration, desc="train", disable=not cfg.logging.progress, dynamic_ncols=True)
        it = self.start_iteration
        try:
            for it in bar:
                try:
                    m = self.run_iteration(it)
                except FatalRoleError:
                    self.checkpoint(it)  # the state after the last completed iteration
                    raise
                self.metrics.log(m)
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


def summarize(metrics_path: Path) -> str:
    """Start vs end (mean of the last 3 iterations) of the headline metrics, as a few lines."""
    from .metrics import read_metrics

    recs = read_metrics(metrics_path)
    if not recs:
        return "no iterations recorded"
    first, last = recs[0], recs[-3:]
    keys = ["reward/total"] + sorted(k for k in first if k.startswith("reward/") and k != "reward/total") + [
        "steps/mean"]
    lines = [f"{'metric':<22}{'first iter':>12}{'last 3 iters':>14}{'change':>10}"]
    for k in keys:
        vals = [r.get(k) for r in last if isinstance(r.get(k), (int, float))]
        if not isinstance(first.get(k), (int, float)) or not vals:
            continue
        end = sum(vals) / len(vals)
        lines.append(f"{k:<22}{first[k]:>12.4f}{end:>14.4f}{end - first[k]:>+10.4f}")
    return "\n".join(lines)


def write_summary(output: Path) -> str:
    text = summarize(output / "metrics.jsonl")
    (output / "summary.txt").write_text(text + "\n")
    return text


def metrics_tail(output: Path) -> dict:
    recs = (output / "metrics.jsonl").read_text().splitlines()
    return json.loads(recs[-1]) if recs else {}
