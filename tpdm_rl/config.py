"""Validated configuration: YAML file + ``--set key=value`` overrides -> a frozen pydantic model.

Every error is reported as one line naming the key path (``config error: rollout.group_size: ...``)
so a typo in a 40-key file is found at once, before any model is loaded.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tpdm_rl.rewards.registry import RewardError, reward_class, reward_options


class ConfigError(ValueError):
    """A configuration problem; the message is one line and names the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DType = Literal["float32", "bfloat16", "float16"]


class BackboneConfig(_Strict):
    path: str = Field("", description="diffusers SD3 folder or hub id; empty = build the tiny offline backbone")
    tiny_seed: int = 0
    tiny_dir: str = Field("", description="where the tiny backbone is built (default: <output>/tiny_backbone)")
    resolution: int = Field(128, ge=16, le=4096)
    device: str = "auto"
    dtype: DType = "float32"
    guidance_scale: float = Field(4.5, ge=0.0)
    negative_prompt: str = ""
    max_sequence_length: int = Field(32, ge=1, le=512)
    feature_blocks: list[int] = Field(default_factory=lambda: [0, -1], min_length=1)
    feature_grid: int = Field(8, ge=1, le=128)
    feature_dtype: DType = "float32"


class PolicyConfig(_Strict):
    hidden: int = Field(64, ge=8)
    init_ratio: float = Field(0.8, gt=0.0, lt=1.0)
    init_concentration: float = Field(20.0, gt=2.0)

    @model_validator(mode="after")
    def _alpha_beta_above_one(self) -> PolicyConfig:
        a, b = self.init_ratio * self.init_concentration, (1 - self.init_ratio) * self.init_concentration
        if a <= 1 or b <= 1:
            raise ValueError(f"init_ratio {self.init_ratio} x init_concentration {self.init_concentration} gives "
                             f"Beta({a:.3g}, {b:.3g}); both parameters must exceed 1")
        return self


class RolloutConfig(_Strict):
    prompts: str = Field("builtin:train", description=".txt/.jsonl file or builtin:train")
    prompts_per_iteration: int = Field(4, ge=1)
    group_size: int = Field(8, ge=2)
    same_noise_per_group: bool = True
    batch_size: int = Field(16, ge=1, description="concurrent trajectory slots per backbone call")
    continuous_batching: bool = True
    sigma_max: float = Field(1.0, gt=0.0, le=1.0)
    sigma_min: float = Field(0.01, gt=0.0, lt=1.0)
    max_steps: int = Field(28, ge=1, le=1000)
    reference_steps: int = Field(28, ge=1, le=1000)
    decode_batch_size: int = Field(16, ge=1)


class RewardSpec(BaseModel):
    """One reward component; keys other than these are passed to ``build_reward``.

    ``num_workers`` / ``num_cpus`` / ``num_gpus`` size this component's Ray actor pool (default:
    ``distributed.reward``).
    """

    model_config = ConfigDict(extra="allow")
    weight: float = 1.0
    normalize: Literal["none", "running", "group"] = "none"
    num_workers: int | None = Field(None, ge=1)
    num_cpus: float | None = Field(None, ge=0.0)
    num_gpus: float | None = Field(None, ge=0.0)


class PoolConfig(_Strict):
    """A Ray actor pool: how many actors and the resources of each (fractions allowed)."""

    num_workers: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)


class RolloutPoolConfig(PoolConfig):
    num_workers: int = Field(2, ge=1)
    num_cpus: float = Field(0.5, ge=0.0)


class RewardPoolConfig(PoolConfig):
    num_workers: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0.0)


class LearnerGroupConfig(_Strict):
    num_ranks: int = Field(2, ge=1)
    num_cpus: float = Field(0.25, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    zero_stage: int = Field(0, ge=0, le=3)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    optimizer: Literal["AdamW", "Adam"] = "AdamW"


class DistributedConfig(_Strict):
    """Ray layout. ``enabled: false`` runs the same algorithm in one process (no Ray, no DeepSpeed)."""

    enabled: bool = False
    address: str = Field("", description="Ray cluster address; empty = RAY_ADDRESS or a new local instance")
    rollout: RolloutPoolConfig = Field(default_factory=RolloutPoolConfig)
    reward: RewardPoolConfig = Field(default_factory=RewardPoolConfig)
    learner: LearnerGroupConfig = Field(default_factory=LearnerGroupConfig)
    groups_per_task: int = Field(0, ge=0, description="prompt groups per rollout task; 0 = split evenly")
    threads_per_actor: int = Field(1, ge=1, description="torch threads in each actor process")
    max_actor_restarts: int = Field(3, ge=0, description="restarts per actor slot before the run stops")
    startup_timeout_s: float = Field(900.0, gt=0.0, description="how long actors may wait for resources")


class StepPenaltyConfig(_Strict):
    mode: Literal["additive", "discount"] = "additive"
    coef: float = Field(1.0, ge=0.0, description="lambda in R - lambda * steps (1.0 suits fidelity in dB)")
    gamma: float = Field(0.97, gt=0.0, le=1.0, description="discount per step (mode: discount)")


class AlgorithmConfig(_Strict):
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0)
    epochs: int = Field(2, ge=1)
    minibatches: int = Field(2, ge=1)
    adv_std: Literal["group", "global", "none"] = "group"
    per_reward_norm: bool = False
    adv_eps: float = Field(1e-6, gt=0.0)
    kl_coef: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)


class TrainConfig(_Strict):
    iterations: int = Field(30, ge=1)
    device: str = "auto"
    threads: int = Field(0, ge=0, description="torch threads in the controller process (0: the CPUs available)")


class CheckpointConfig(_Strict):
    every: int = Field(5, ge=1)
    keep_last: int = Field(3, ge=1)


class LoggingConfig(_Strict):
    tensorboard: bool = True
    progress: bool = True
    wandb_project: str = ""


class Config(_Strict):
    seed: int = 0
    deterministic: bool = True
    output: str = "runs/tiny"
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: dict[str, RewardSpec] = Field(default_factory=lambda: {"fidelity": RewardSpec()})
    step_penalty: StepPenaltyConfig = Field(default_factory=StepPenaltyConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if not self.rewards:
            raise ValueError("rewards: at least one reward component is needed")
        for name, spec in self.rewards.items():
            try:
                reward_class(name)
            except RewardError as exc:
                raise ValueError(f"rewards.{name}: {exc}") from None
            for key in spec.model_extra or {}:
                if key not in reward_options(name):
                    raise ValueError(f"rewards.{name}.{key}: unknown option for reward {name!r}; expected one of "
                                     f"{sorted(reward_options(name) | {'weight', 'normalize'})}")
        if self.rollout.sigma_min >= self.rollout.sigma_max:
            raise ValueError("rollout.sigma_min must be below rollout.sigma_max")
        if self.step_penalty.mode == "discount":
            for name, spec in self.rewards.items():
                if spec.normalize != "none" or spec.weight < 0 or not reward_class(name).nonnegative:
                    raise ValueError(
                        f"step_penalty.mode 'discount' multiplies the reward by gamma^steps, which rewards MORE steps "
                        f"when the reward is negative; reward {name!r} (normalize={spec.normalize}, weight={spec.weight}) "
                        "can be negative: use mode 'additive'")
            if self.algorithm.per_reward_norm:
                raise ValueError("algorithm.per_reward_norm needs step_penalty.mode 'additive'")
        return self

    def reward_options(self, name: str) -> dict[str, Any]:
        spec = self.rewards[name]
        return dict(spec.model_extra or {})

    def reward_pool(self, name: str) -> PoolConfig:
        spec, base = self.rewards[name], self.distributed.reward
        return PoolConfig(num_workers=spec.num_workers or base.num_workers,
                          num_cpus=base.num_cpus if spec.num_cpus is None else spec.num_cpus,
                          num_gpus=base.num_gpus if spec.num_gpus is None else spec.num_gpus)


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "<root>"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    got = err.get("input")
    tail = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
    more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    return f"config error: {loc}: {msg}{tail}{more}".replace("\n", " ")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"config error: override {item!r} is not KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"config error: override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"config error: {'.'.join(path)}: {p!r} is not a section")
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config error: config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config error: {p}:{where} is not valid YAML") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config error: {p} must hold a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    except ValueError as exc:  # e.g. unknown reward name in cross checks
        raise ConfigError(f"config error: {str(exc).splitlines()[0]}") from None


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
