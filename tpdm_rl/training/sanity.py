"""A known-optimum world for the learning: does the TPM learn a per-class step count where one pays?

Like the sanity environments RL libraries keep, this world is small enough to solve by hand. Every prompt
belongs to a class; the class is written into what the TPM reads (the pooled "text" embedding that plays
``temb`` and a constant feature map beside the latent, as SD3's joint attention and pooled CLIP embedding
carry the prompt), mixed with per-prompt nuisance so the TPM must find the class rather than memorise
prompts. The quality of a trajectory is a table ``quality[class][n - 1]`` of its step count n, so the
value of every (class, schedule) is known in closed form: ``quality - price * n``. With the defaults one
class is best at 1 step and the other at 4, and the best single schedule (3 steps) is worth clearly less
than the per-class rule.

The training loop here is the product's own pieces (the sampling engine, the TPM schedule, the GRPO
advantages, the learner and the config's algorithm and optimiser settings); only the backbone and the
reward are replaced, so a test shows in seconds whether the learning can find a per-class rule at all.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from tpdm_rl.algorithm.messages import LearnBatch
from tpdm_rl.algorithm.objective import StepPenalty, grpo_advantages
from tpdm_rl.algorithm.policy import TimePredictionModule, build_policy
from tpdm_rl.core.config import Config
from tpdm_rl.core.prompts import PromptSampler
from tpdm_rl.core.rng import derive_key
from tpdm_rl.rollout.backbone import StepOutput
from tpdm_rl.rollout.engine import SamplingEngine
from tpdm_rl.rollout.schedules import TPMSchedule
from tpdm_rl.training.controller import plan_iteration, step_metrics
from tpdm_rl.training.learner import Learner


def _curve(start: float, gain: float, decay: float, n: int = 8) -> tuple[float, ...]:
    """start + gain * (1 - decay^(k-1)) for k = 1..n: quality that saturates with more steps."""
    return tuple(start + gain * (1.0 - decay ** k) for k in range(n))


@dataclass(frozen=True)
class SanityWorld:
    """Classes, their quality per step count, the price of a step, and how clearly the TPM sees the class."""

    #: quality[c][n - 1]: quality of class c after n steps (n = 1..len); longer runs keep the last value
    quality: tuple[tuple[float, ...], ...] = (
        (0.9,) * 8,                           # "straight": 1 step is as good as 28
        _curve(0.5, 0.5, 0.6),                 # "branching": 0.5, 0.7, 0.82, 0.89, 0.93, ...
    )
    price: float = 0.05
    class_signal: float = 1.0  # amplitude of the class code in the embedding
    nuisance: float = 0.25  # std of the per-prompt random part of the embedding
    embed_dim: int = 8
    channels: int = 4
    grid: int = 4
    reward_noise: float = 0.0  # std of Gaussian noise on each trajectory's quality (keyed by seed, iteration, index)
    prompts_per_class: int = 48  # training prompts; as many again are held out
    #: the TPM starts at the best single schedule (3 steps), so it must move both ways
    init_table: tuple[float, ...] = (1.0, 0.75, 0.5, 0.0)

    @classmethod
    def places_like(cls, reward_noise: float = 0.15) -> SanityWorld:
        """A world shaped like the places experiment: one class in three best at 1 step, the others at 2, the rule
        worth +0.022 over the best single schedule (2 steps) at price 0.065, under reward noise 7x that gain."""
        straight, branching = (0.82,) * 8, (0.60, 0.78, 0.81) + (0.82,) * 5
        return cls(quality=(straight, branching, branching), price=0.065, reward_noise=reward_noise,
                   prompts_per_class=32)

    @classmethod
    def places_valley(cls, reward_noise: float = 0.15) -> SanityWorld:
        """The places world's own step landscape: each class's quality at 1-5 steps is the training-split score of the
        ``builtin:toy-places`` table of that NFE (120 prompts x 2 seeds; all-placed prompts, then the rest). For
        all-placed prompts 2 steps are worse than 1 and 3, so at price 0.065 the per-class optimum is 1 step for them
        and 3 for the rest (+0.022 over 3 steps for all): a TPM started at 3 steps must cross the 2-step valley."""
        straight = (0.866, 0.784, 0.929, 0.965, 0.982, 0.982, 0.982, 0.982)
        branching = (0.610, 0.725, 0.808, 0.832, 0.866, 0.866, 0.866, 0.866)
        return cls(quality=(straight, branching, branching), price=0.065, reward_noise=reward_noise,
                   prompts_per_class=32)

    @property
    def classes(self) -> int:
        return len(self.quality)

    def table(self) -> torch.Tensor:
        q = torch.tensor(self.quality, dtype=torch.float64)
        return torch.cat([q, q[:, -1:].expand(-1, 64)], dim=1)  # n beyond the table keeps the last value

    def value(self, cls: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """quality - price * n per trajectory (float64)."""
        q = self.table()[cls.long(), steps.long().clamp(1, 64) - 1]
        return q - self.price * steps.double()

    def optimum(self) -> dict:
        """Per-class best step counts and values, and the best single step count for a uniform class mix."""
        n = torch.arange(1, len(self.quality[0]) + 1)
        vals = torch.stack([self.value(torch.full_like(n, c), n) for c in range(self.classes)])  # [C, N]
        best_n = vals.argmax(1) + 1
        single = vals.mean(0)
        return {"per_class_steps": best_n.tolist(), "per_class_value": float(vals.max(1).values.mean()),
                "single_steps": int(single.argmax()) + 1, "single_value": float(single.max())}

    def prompts(self, split: str = "train") -> list[str]:
        off = 0 if split == "train" else self.prompts_per_class
        return [f"class {c} prompt {i}" for i in range(off, off + self.prompts_per_class) for c in range(self.classes)]

    @staticmethod
    def class_of(prompts: list[str]) -> torch.Tensor:
        return torch.tensor([int(p.split()[1]) for p in prompts])


class SanityBackbone:
    """The parts of :class:`tpdm_rl.rollout.backbone.Backbone` the sampling engine uses, with no model.

    The latent flows straight to 0 (velocity x / sigma); the TPM reads the latent and the prompt's
    embedding as features, and the embedding as ``temb``."""

    device = torch.device("cpu")

    def __init__(self, world: SanityWorld) -> None:
        self.world = world
        self.feature_channels = world.channels + world.embed_dim
        self.temb_dim = world.embed_dim

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.world.channels, self.world.grid, self.world.grid)

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.world
        cls = SanityWorld.class_of(prompts)
        code = torch.zeros(len(prompts), w.embed_dim)
        code[torch.arange(len(prompts)), cls] = w.class_signal
        noise = torch.stack([torch.randn(w.embed_dim, generator=torch.Generator().manual_seed(
            derive_key(0x5A17, *[ord(ch) for ch in p]))) for p in prompts]) if prompts else code
        pooled = code + w.nuisance * noise
        return pooled[:, None, :], pooled

    def step(self, latents: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
             need_features: bool = True) -> StepOutput:
        velocity = latents / sigma.clamp_min(1e-3)[:, None, None, None]
        g = self.world.grid
        feats = torch.cat([latents, pooled[:, :, None, None].expand(-1, -1, g, g)], dim=1)
        return StepOutput(velocity=velocity, features=feats, temb=pooled)

    def default_sigmas(self, num_steps: int, shape) -> torch.Tensor:
        return torch.linspace(1.0, 0.0, num_steps + 1)


@dataclass
class SanityResult:
    """Per-class mean NFE and the share of the optimum's gain over the best single schedule that was reached."""

    per_class_steps: dict[str, list[float]]  # inference mode -> per-class mean NFE on held-out prompts
    gain_share: dict[str, float]  # inference mode -> (value - single) / (optimum - single)
    optimum: dict
    history: list[dict] = field(default_factory=list)

    def passes(self, mode: str = "mode", tol: float = 0.5, share: float = 0.9) -> bool:
        opt = self.optimum["per_class_steps"]
        close = all(abs(s - o) <= tol for s, o in zip(self.per_class_steps[mode], opt))
        return close and self.gain_share[mode] >= share


def sanity_config(world: SanityWorld, **overrides) -> Config:
    """The config's defaults with the stop-ratio action, the world's table and price (``overrides``: dotted keys)."""
    data: dict = {"policy": {"action": "stop-ratio", "init_table": list(world.init_table), "hidden": 32},
                  "backbone": {"feature_grid": world.grid}, "rollout": {"max_steps": 12, "batch_size": 64},
                  "step_penalty": {"coef": world.price}, "train": {"iterations": 40}}
    for key, value in overrides.items():
        node = data
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return Config.model_validate(data)


def evaluate(world: SanityWorld, policy: TimePredictionModule, cfg: Config, mode: str, seeds: int = 2
             ) -> tuple[list[float], float]:
    """Held-out per-class mean NFE and mean value under the inference ``mode``."""
    engine = SamplingEngine(SanityBackbone(world), 0, 0, batch_size=256, max_steps=cfg.rollout.max_steps,
                            record_features=False)
    prompts = world.prompts("heldout") * seeds
    keys = torch.tensor([derive_key(cfg.seed, 0xE7A1, i) for i in range(len(prompts))])
    seeds_ = [derive_key(cfg.seed, 0xE7A2, i) for i in range(len(prompts))]
    tr = engine.run(prompts, seeds_, keys, TPMSchedule(policy, cfg.rollout.sigma_min, mode=mode), decode=False)
    cls = SanityWorld.class_of(prompts)
    per_class = [float(tr.steps[cls == c].double().mean()) for c in range(world.classes)]
    return per_class, float(world.value(cls, tr.steps).mean())


def train_sanity(world: SanityWorld, cfg: Config, record: bool = False) -> SanityResult:
    """Train a TPM in the world with the config's algorithm and optimiser; evaluate on held-out prompts."""
    torch.manual_seed(cfg.seed)
    bb = SanityBackbone(world)
    engine = SamplingEngine(bb, 0, 0, batch_size=cfg.rollout.batch_size, max_steps=cfg.rollout.max_steps)
    policy = build_policy(cfg, bb.feature_channels, bb.temb_dim).eval()
    learner = Learner(copy.deepcopy(policy), cfg.optim, cfg.algorithm, cfg.seed)
    prompts = world.prompts("train")
    sampler = PromptSampler(prompts, cfg.seed)
    history = []
    alg, penalty = cfg.algorithm, StepPenalty.from_config(cfg.step_penalty)
    for it in range(cfg.train.iterations):
        plan = plan_iteration(cfg, sampler, prompts, it)
        tr = engine.run(plan.prompts, plan.noise_seeds, plan.sample_keys,
                        TPMSchedule(policy, cfg.rollout.sigma_min, mode="sample"), decode=False)
        cls = SanityWorld.class_of(plan.prompts)
        quality = world.table()[cls, tr.steps.clamp(1, 64) - 1].float()
        if world.reward_noise:
            g = torch.Generator().manual_seed(derive_key(cfg.seed, 0x2015E, it))
            quality = quality + world.reward_noise * torch.randn(quality.shape, generator=g)
        adv = grpo_advantages({"quality": quality}, {"quality": 1.0}, tr.steps, plan.group, penalty, alg.adv_std,
                              alg.per_reward_norm, alg.adv_eps)
        rows = tr.step_rows()
        learner.update(LearnBatch.from_rows([(rows, 0, len(rows.traj), adv)]), it)
        policy.load_state_dict(learner.weights())
        if record:
            history.append({"iteration": it, **step_metrics(tr.steps, plan.group),
                            **{f"steps/class{c}": float(tr.steps[cls == c].double().mean())
                               for c in range(world.classes)}, "value": float(world.value(cls, tr.steps).mean())})
    opt = world.optimum()
    steps, share = {}, {}
    for mode in ("mode", "sample"):
        per_class, value = evaluate(world, policy, cfg, mode)
        steps[mode] = per_class
        share[mode] = (value - opt["single_value"]) / (opt["per_class_value"] - opt["single_value"])
    return SanityResult(steps, share, opt, history)
