"""The configuration schema: every section and key, its default, its checks, as a frozen pydantic model.

Every error is reported as one line naming the key path (``config error: rollout.group_size: ...``)
so a typo in a 40-key file is found at once, before any model is loaded. Reading YAML files and overrides,
writing YAML and comparing a resumed run's config: ``config_io.py``.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tpdm_rl.core.methods import parse_methods
from tpdm_rl.core.reward_registry import RewardError, reward_info
from tpdm_rl.core.step_penalty import StepPenalty
from tpdm_rl.core.tables import TableError, check_stop_steps, check_table, load_family

#: the most training iterations a run may ask for (1,000,000 iterations of the smallest run is weeks of compute;
#: a larger number is a typo, e.g. an extra digit group)
MAX_ITERATIONS = 1_000_000


def did_you_mean(word: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` (difflib), or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), sorted(str(c) for c in choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class ConfigError(ValueError):
    """A configuration problem; the message is one line and names the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


DType = Literal["float32", "bfloat16", "float16"]


class BackboneConfig(_Strict):
    """The frozen SD3-family backbone and the TPM's view of it."""

    path: str = Field("", description="diffusers SD3/SD3.5 or FLUX.1 folder, hub id, builtin:toy (the shipped "
                      "trained toy backbone), or empty for the tiny random offline backbone")
    family: Literal["auto", "sd3", "flux"] = Field(
        "auto", description="backbone family: auto (from the folder's model_index.json; for a hub id, flux if "
        "the id names it), sd3 (SD3, SD3.5) or flux (FLUX.1 dev/schnell)")
    tiny_seed: int = Field(0, description="seed of the tiny random backbone (path empty)")
    tiny_dir: str = Field("", description="where the tiny backbone is built (default: <output>/tiny_backbone)")
    resolution: int = Field(128, ge=16, le=4096, description="image height and width in pixels")
    device: str = Field("auto", description="torch device of the backbone: auto (cuda when available), cpu, cuda:N")
    dtype: DType = Field("float32", description="backbone weights and activations dtype")
    guidance_scale: float = Field(4.5, ge=0.0, description="SD3: classifier-free guidance scale (<= 1: no CFG); "
                                  "FLUX.1-dev: the embedded guidance value (3.5 is usual); FLUX.1-schnell: unused")
    negative_prompt: str = Field("", description="the unconditional prompt of CFG")
    max_sequence_length: int = Field(32, ge=1, le=512, description="T5 tokens per prompt")
    feature_blocks: list[int] = Field(default_factory=lambda: [0, -1], min_length=1,
                                      description="transformer blocks whose outputs the TPM reads (negative: "
                                                  "from the end)")
    feature_grid: int = Field(8, ge=1, le=128, description="TPM features are average-pooled to grid x grid")
    feature_dtype: DType = Field("float32", description="dtype of the stored TPM features (bfloat16 halves "
                                 "rollout memory)")
    compile: bool = Field(False, description="torch.compile the transformer (GPU: faster steps after a warm-up)")
    offload_text_encoders: bool = Field(True, description="encode the run's prompts once, then move the text "
                                        "encoders off the accelerator (T5-XXL alone is ~9.5 GB in bf16)")


class PolicyConfig(_Strict):
    """The Time Prediction Module (TPM)."""

    hidden: int = Field(64, ge=8, description="TPM width (conv channels and MLP)")
    init_ratio: float = Field(0.8, gt=0.0, lt=1.0, description="mean of the untrained TPM's ratio "
                              "sigma_next / sigma")
    init_concentration: float = Field(20.0, gt=2.0, description="alpha + beta of the untrained TPM's Beta")
    action: Literal["beta", "stop-ratio"] = Field(
        "beta", description="beta: the paper's Beta ratio sigma_next / sigma, ending when it falls below "
        "rollout.sigma_min; stop-ratio: a stop head (jump to sigma 0) and a logit-normal ratio with a learned "
        "spread, both starting at policy.init_table")
    init_table: list[float] = Field(default_factory=list, description="stop-ratio: the base sigma table the "
                                    "untrained TPM follows (decreasing, in [0, 1], ending at 0), e.g. [1, 0.9, "
                                    "0.75, 0.5, 0]; choose it on training-split prompts (benchmarks/toy_tables.py)")
    init_spread: float = Field(0.3, gt=0.0, le=5.0, description="stop-ratio: the untrained TPM's std of logit r")
    stop_sharpness: float = Field(3.0, gt=0.0, le=50.0, description="stop-ratio: the untrained TPM's stop logit "
                                  "per table position (3: p_stop 0.18 one table step before the table's jump to 0, "
                                  "0.82 at it); higher explores shorter schedules less")
    init_stop_steps: int = Field(0, ge=0, description="stop-ratio: the untrained TPM follows init_table's ratios but "
                                 "stops after this many steps (0: the table's own); 1 lets each prompt climb from 1 "
                                 "step where a middle step count is worse than both neighbours (configs/toy_places.yaml)")
    inputs: Literal["blocks", "paper"] = Field("blocks", description="blocks: backbone.feature_blocks of the "
                                               "conditional branch, mean+max pool, 1+softplus; paper: the official "
                                               "TPDM inputs (pos_embed and norm_out outputs and temb, CFG-combined), "
                                               "avg-pool 16 then max-pool, 1+exp")
    inference: Literal["mode", "mean", "sample"] = Field(
        "mode", description="how the trained TPM picks sigma_next / sigma at inference (recorded in the TPM file): "
        "mode (the paper's Beta mode), mean (the Beta mean) or sample (a draw keyed by the image's noise seed)")

    @model_validator(mode="after")
    def _alpha_beta_above_one(self) -> PolicyConfig:
        if self.action == "stop-ratio":
            try:
                check_table(self.init_table, "init_table")
            except TableError as exc:
                raise ValueError(f"{exc} (stop-ratio needs a table to start from)") from None
            try:
                check_stop_steps(self.init_stop_steps, self.init_table)
            except TableError as exc:
                raise ValueError(str(exc)) from None
            return self
        a, b = self.init_ratio * self.init_concentration, (1 - self.init_ratio) * self.init_concentration
        if a <= 1 or b <= 1:
            raise ValueError(f"init_ratio {self.init_ratio} x init_concentration {self.init_concentration} gives "
                             f"Beta({a:.3g}, {b:.3g}); both parameters must exceed 1")
        return self


class RolloutConfig(_Strict):
    """What one iteration generates and how trajectories end."""

    prompts: str = Field("builtin:train", description="training prompts: a .txt/.jsonl file or builtin:NAME")
    prompts_per_iteration: int = Field(4, ge=1, description="prompt groups per iteration")
    group_size: int = Field(8, ge=2, description="trajectories per prompt (the GRPO group)")
    same_noise_per_group: bool = Field(True, description="the trajectories of a group share their initial noise")
    batch_size: int = Field(16, ge=1, description="concurrent trajectory slots per backbone call")
    continuous_batching: bool = Field(True, description="a finished trajectory's slot is refilled at once")
    sigma_max: float = Field(1.0, gt=0.0, le=1.0, description="sigma of the first step")
    sigma_min: float = Field(0.01, gt=0.0, lt=1.0, description="a trajectory ends when the TPM proposes a sigma "
                             "below this")
    max_steps: int = Field(28, ge=1, le=1000, description="step budget per trajectory (the last step is forced)")
    reference_steps: int = Field(28, ge=1, le=1000, description="steps of the fidelity reward's reference schedule")
    noise_bank: int = Field(0, ge=0, description="initial noise per prompt from a bank of this many seeds (0: fresh "
                            "noise every iteration); with a bank, fidelity references repeat and are cached")
    reference_cache_mb: float = Field(256.0, gt=0.0, description="memory per rollout worker for cached fidelity "
                                      "references (storage dtype)")
    decode_batch_size: int = Field(16, ge=1, description="images per VAE decode call")


class RewardSpec(BaseModel):
    """One reward component; keys other than these are passed to ``build_reward``.

    ``num_workers`` / ``num_cpus`` / ``num_gpus`` size this component's Ray actor pool (default:
    ``distributed.reward``).
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    weight: float = Field(1.0, description="weight of this component in the total reward")
    normalize: Literal["none", "running", "group"] = Field("none", description="per-component normalisation "
                                                           "before weighting")
    num_workers: int | None = Field(None, ge=1, description="Ray reward workers for this component")
    num_cpus: float | None = Field(None, ge=0.0, description="CPUs per reward worker of this component")
    num_gpus: float | None = Field(None, ge=0.0, description="GPUs per reward worker of this component")


class PoolConfig(_Strict):
    """A Ray actor pool: how many actors and the resources of each (fractions allowed)."""

    num_workers: int = Field(1, ge=1, description="actors in the pool")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs per actor")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per actor")


class RolloutPoolConfig(PoolConfig):
    num_workers: int = Field(2, ge=1, description="rollout workers (each holds a backbone copy)")
    num_cpus: float = Field(0.5, ge=0.0, description="CPUs per rollout worker")


class RewardPoolConfig(PoolConfig):
    num_workers: int = Field(1, ge=1, description="reward workers per component")
    num_cpus: float = Field(0.25, ge=0.0, description="CPUs per reward worker")


class LearnerGroupConfig(_Strict):
    """The DeepSpeed learner group."""

    num_ranks: int = Field(2, ge=1, description="learner ranks (data parallel)")
    num_cpus: float = Field(0.25, ge=0.0, description="CPUs per rank")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per rank")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="process-group backend (auto: nccl on "
                                                     "GPU, gloo on CPU)")
    optimizer: Literal["AdamW", "Adam"] = Field("AdamW", description="DeepSpeed optimizer type")


class DistributedConfig(_Strict):
    """Ray layout. ``enabled: false`` runs the same algorithm in one process (no Ray, no DeepSpeed)."""

    enabled: bool = Field(False, description="run the roles as Ray actors (also implied by --address)")
    address: str = Field("", description="Ray cluster address; empty = RAY_ADDRESS or a new local instance")
    rollout: RolloutPoolConfig = Field(default_factory=RolloutPoolConfig, description="rollout worker pool")
    reward: RewardPoolConfig = Field(default_factory=RewardPoolConfig, description="reward worker pool (per "
                                     "component; overridable in rewards.<name>)")
    learner: LearnerGroupConfig = Field(default_factory=LearnerGroupConfig, description="DeepSpeed learner group")
    groups_per_task: int = Field(0, ge=0, description="prompt groups per rollout task; 0 = split evenly")
    threads_per_actor: int = Field(1, ge=1, description="torch threads in each actor process")
    max_actor_restarts: int = Field(3, ge=0, description="restarts per actor slot before the run stops")
    startup_timeout_s: float = Field(900.0, gt=0.0, description="how long actors may wait to be placed and start")


class StepPenaltyConfig(_Strict):
    """How the number of steps is charged."""

    mode: Literal["additive", "discount", "tpdm"] = Field("additive", description="additive: R - coef * steps; "
                                                           "discount: R * gamma^steps; tpdm: R * (1 - gamma^N) / "
                                                           "(N (1 - gamma)) (both only for non-negative rewards)")
    coef: float = Field(1.0, ge=0.0, description="lambda in R - lambda * steps (1.0 suits fidelity in dB)")
    gamma: float = Field(0.97, gt=0.0, le=1.0, description="discount per step (modes discount and tpdm)")


class AlgorithmConfig(_Strict):
    """GRPO advantages and the PPO-clip update."""

    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description="PPO ratio clip")
    epochs: int = Field(2, ge=1, description="passes over each rollout batch")
    minibatches: int = Field(2, ge=1, description="optimiser steps per epoch")
    adv_std: Literal["group", "global", "none"] = Field("group", description="advantage scale: the group's std, "
                                                         "the batch's std, or none (centre only)")
    per_reward_norm: bool = Field(False, description="normalise each component (and the steps) within its group "
                                  "before weighting")
    adv_eps: float = Field(1e-6, gt=0.0, description="added to the std of the advantage normalisation")
    kl_coef: float = Field(0.0, ge=0.0, description="weight of KL(TPM || initial TPM) per step")
    entropy_coef: float = Field(0.0, ge=0.0, description="weight of the entropy bonus per step (keeps the stop head "
                                "exploring: docs/design.md, \"Exploration of the stop head\")")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping")


class OptimConfig(_Strict):
    """The learner's AdamW."""

    lr: float = Field(1e-3, gt=0.0, description="learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon")


class TrainConfig(_Strict):
    """The run."""

    iterations: int = Field(30, ge=1, le=MAX_ITERATIONS, description="training iterations (at most 1,000,000: a "
                            "larger number is a typo)")
    device: str = Field("auto", description="learner device in one process: auto, cpu, cuda:N")
    threads: int = Field(0, ge=0, description="torch threads in the controller process (0: auto, the CPUs idle "
                         "when the run starts, with a passive OpenMP wait; docs/threads.md)")


class CheckpointConfig(_Strict):
    """Checkpoints."""

    every: int = Field(5, ge=1, description="iterations between checkpoints (the last one is always saved)")
    keep_last: int = Field(3, ge=1, description="checkpoints kept")


class EvalConfig(_Strict):
    """The evaluation ``tpdm-rl train`` runs after the last iteration (``tpdm-rl eval`` on the final checkpoint)."""

    enabled: bool = Field(False, description="evaluate the final TPM into <output>/eval when training ends")
    prompts: str = Field("builtin:eval", description="held-out prompts (never the training set)")
    methods: str = Field("tpm,fixed:28,fixed:14,adaptive:0.01", description="methods compared (tpdm-rl eval "
                         "--methods)")
    rewards: str = Field("fidelity", description="comma-separated reward names scored")
    pareto_steps: list[int] = Field(default_factory=lambda: [4, 6, 8, 12, 16, 20, 28], min_length=1,
                                    description="the fixed:N curve")
    tables: str = Field("", description="a hand-made sigma table family compared at equal NFE (tpdm-rl eval "
                        "--tables): builtin:toy, shift:S or a .json file; empty: none")
    seeds: int = Field(1, ge=1, description="images per prompt")
    limit: int = Field(0, ge=0, description="use only the first N prompts (0: all)")
    batch_size: int = Field(16, ge=1, description="concurrent images per backbone call")

    # checked here, with the rest of the config, so that a bad value stops the run before it trains (not after)
    @field_validator("methods")
    @classmethod
    def _methods(cls, v: str) -> str:
        parse_methods(v)
        return v

    @field_validator("tables")
    @classmethod
    def _tables(cls, v: str) -> str:
        if v.strip():
            load_family(v)
        return v

    @field_validator("rewards")
    @classmethod
    def _rewards(cls, v: str) -> str:
        names = [r.strip() for r in v.split(",") if r.strip()]
        if not names:
            raise ValueError("expected comma-separated reward names, e.g. fidelity or shapes")
        for name in names:
            try:
                reward_info(name)
            except RewardError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("pareto_steps")
    @classmethod
    def _pareto(cls, v: list[int]) -> list[int]:
        if any(n < 1 for n in v):
            raise ValueError(f"expected step counts >= 1, got {v}")
        return v


class LoggingConfig(_Strict):
    """Logs."""

    tensorboard: bool = Field(True, description="write TensorBoard events to <output>/tb")
    progress: bool = Field(True, description="show a progress bar")
    wandb_project: str = Field("", description="Weights & Biases project (empty: off)")


class Config(_Strict):
    """A training run."""

    seed: int = Field(0, description="keys every random draw: prompts, noise, Beta draws, minibatch order")
    deterministic: bool = Field(True, description="torch deterministic algorithms (bit-for-bit reruns at a fixed "
                                "thread count)")
    output: str = Field("runs/tiny", description="run folder (overridden by --output)")
    backbone: BackboneConfig = Field(default_factory=BackboneConfig, description="the frozen backbone")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="the TPM")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="trajectories per iteration")
    rewards: dict[str, RewardSpec] = Field(default_factory=lambda: {"fidelity": RewardSpec()},
                                           description="reward components by registry name, each with its weight, "
                                                       "normalisation, pool size and model options")
    step_penalty: StepPenaltyConfig = Field(default_factory=StepPenaltyConfig, description="the cost of steps")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="GRPO / PPO")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="the learner's optimiser")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the run")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpoints")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="metrics and progress")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="the closing evaluation of tpdm-rl train")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="the Ray layout")

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if not self.rewards:
            raise ValueError("rewards: at least one reward component is needed")
        if all(spec.weight == 0 for spec in self.rewards.values()):
            raise ValueError(f"rewards: every weight is 0 ({', '.join(f'rewards.{n}.weight' for n in self.rewards)}), so "
                             "the only signal left is the step penalty; expected at least one non-zero weight")
        for name, spec in self.rewards.items():
            try:
                info = reward_info(name)  # no import of the reward's module: config checks stay fast
            except RewardError as exc:
                raise ValueError(f"rewards.{name}: {exc}") from None
            for key, value in (spec.model_extra or {}).items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"rewards.{name}.{key}: {value} is not a finite number")
                if key not in info.options:
                    known = info.options | set(RewardSpec.model_fields)
                    hint = did_you_mean(key, known)
                    raise ValueError(f"rewards.{name}.{key}: unknown option for reward {name!r}"
                                     + (hint or f"; expected one of {sorted(info.options | {'weight', 'normalize'})}"))
        if self.rollout.sigma_min >= self.rollout.sigma_max:
            raise ValueError("rollout.sigma_min must be below rollout.sigma_max")
        StepPenalty.from_config(self.step_penalty).check(
            ((name, spec.normalize, spec.weight, reward_info(name).nonnegative) for name, spec in self.rewards.items()),
            self.algorithm.per_reward_norm)
        return self

    def reward_options(self, name: str) -> dict[str, Any]:
        spec = self.rewards[name]
        return dict(spec.model_extra or {})

    def reward_pool(self, name: str) -> PoolConfig:
        spec, base = self.rewards[name], self.distributed.reward
        return PoolConfig(num_workers=spec.num_workers or base.num_workers,
                          num_cpus=base.num_cpus if spec.num_cpus is None else spec.num_cpus,
                          num_gpus=base.num_gpus if spec.num_gpus is None else spec.num_gpus)


def _keys_at(path: list[str]) -> list[str] | None:
    """The keys a config section accepts (``path``: the section's key path), or None when it is not a section."""
    model: Any = Config
    i = 0
    while i < len(path):
        info = model.model_fields.get(path[i]) if isinstance(model, type) else None
        if info is None:
            return None
        tp = info.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            model, i = tp, i + 1
            continue
        if path[i] == "rewards" and i + 1 < len(path):
            model, i = RewardSpec, i + 2
            continue
        return None
    return list(model.model_fields)


def unknown_key_message(path: list[str]) -> str:
    """``unknown key; did you mean 'a.b'?`` (difflib over the section's keys), or the keys it accepts."""
    keys = _keys_at(path[:-1])
    if keys is None:
        return "unknown key"
    hint = did_you_mean(path[-1], keys)
    prefix = ".".join(path[:-1])
    if hint:
        close = hint.split("'")[1]
        return f"unknown key; did you mean {(prefix + '.' if prefix else '') + close!r}?"
    return f"unknown key; expected one of {', '.join(keys)}"


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = unknown_key_message([str(p) for p in err["loc"]])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if not loc:  # a whole-config check: its message already starts with the key path it is about
        more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
        return f"config error: {msg}{more}".replace("\n", " ")
    if loc == "train.iterations" and err["type"] == "less_than_equal":
        msg += " (a larger number is a typo: 1,000,000 iterations of the smallest run take weeks)"
    got = err.get("input")
    tail = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
    more = f" [+{len(exc.errors()) - 1} more]" if len(exc.errors()) > 1 else ""
    return f"config error: {loc}: {msg}{tail}{more}".replace("\n", " ")


def validate_config(data: Any) -> Config:
    """``Config.model_validate`` with its first error as one line naming the key path (:class:`ConfigError`)."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    except ValueError as exc:  # e.g. unknown reward name in cross checks
        raise ConfigError(f"config error: {str(exc).splitlines()[0]}") from None
