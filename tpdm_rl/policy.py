"""The Time Prediction Module (TPM): a small policy that picks the next noise level.

At every denoising step it reads the backbone's pooled block features (image tokens on a 2-D grid),
the timestep/text embedding ``temb`` and the current sigma, and outputs a distribution over its action.
Two action spaces (``TPMSpec.action``):

``beta`` (the paper's)
    r = sigma_next / sigma ~ Beta(alpha, beta); the trajectory ends only when r * sigma < sigma_min.
    Starts at mean ``init_ratio`` and concentration ``init_concentration``.
``stop-ratio`` (ours)
    Every step is a Bernoulli "stop" (jump to sigma 0 now, the Euler step x0 = x - sigma v) and, when not
    stopping, a logit-normal ratio: logit r ~ Normal(mu, s) with a learned s. Both are *offsets* from a base
    sigma table (``init_table``): at sigma on the table the untrained TPM proposes the table's next sigma and
    stops where the table jumps to 0, with spread ``init_spread`` (logit units). So the policy starts at a good
    hand-made schedule, can finish early on purpose (a Beta ratio needs r < sigma_min / sigma, a far-tail
    action PPO never reaches), and can become sharp. Deterministic inference: stop when p_stop > 0.5, else
    the median ratio sigmoid(mu).

Every distribution function below takes the TPM's raw output ``params`` (a tuple of [B] tensors) and the
action encoding stored for the learner: the ratio r in (0, 1), or exactly 0 for "stop".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tpdm_rl.rollout.rng import counter_beta, counter_uniform, derive_key

from .config import Config

R_EPS = 1e-6  # ratios are kept inside (R_EPS, 1 - R_EPS) so log-probs stay finite
ACTIONS = ("beta", "stop-ratio")
STOP = 0.0  # the stored action of a "stop" decision (stop-ratio); ratios lie in (R_EPS, 1 - R_EPS)
#: base stop logit per table position (``TPMSpec.stop_sharpness``): at 3, p_stop is 0.18 one table step before the
#: jump to 0, 0.011 two steps before, 0.82 at it. At the former 8 (0.018 / 6e-6 / 0.98) a group almost never tried a
#: shorter schedule, so GRPO had no per-prompt contrast to learn from (docs/design.md, "Exploration of the stop head")
STOP_SHARPNESS = 3.0
#: the sharpness of TPM files written before it was a setting
LEGACY_STOP_SHARPNESS = 8.0
BASE_RATIO_RANGE = (0.02, 0.98)  # the base ratio is clamped here before its logit


@dataclass(frozen=True)
class TPMSpec:
    """Everything needed to rebuild a TPM and to check it matches a backbone (stored in checkpoints)."""

    in_channels: int
    temb_dim: int
    grid: int
    hidden: int = 64
    feature_blocks: tuple[int, ...] = (0, -1)
    init_ratio: float = 0.8
    init_concentration: float = 20.0
    inputs: str = "blocks"  # "blocks" (ours) or "paper" (the official TPDM inputs, pooling and head)
    action: str = "beta"  # "beta" (the paper's Beta ratio) or "stop-ratio" (stop head + logit-normal ratio)
    init_table: tuple[float, ...] = ()  # stop-ratio: the base sigma table (decreasing, ending at 0)
    init_spread: float = 0.3  # stop-ratio: the untrained TPM's std of logit r
    stop_sharpness: float = STOP_SHARPNESS  # stop-ratio: base stop logit per table position

    def to_dict(self) -> dict:
        d = asdict(self)
        d["feature_blocks"] = list(self.feature_blocks)
        d["init_table"] = list(self.init_table)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TPMSpec:
        d = dict(d)
        d["feature_blocks"] = tuple(d.get("feature_blocks", (0, -1)))
        d["init_table"] = tuple(float(v) for v in d.get("init_table", ()))
        if d.get("action") == "stop-ratio":  # stop-ratio files from before the setting used the legacy sharpness
            d.setdefault("stop_sharpness", LEGACY_STOP_SHARPNESS)
        return cls(**d)


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def sigma_embedding(sigma: torch.Tensor, dim: int = 32) -> torch.Tensor:
    """Sinusoidal embedding of 1000 * sigma (the diffusers timestep scale)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = (sigma.float() * 1000.0).reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimePredictionModule(nn.Module):
    """conv -> adaptive group-norm (conditioned on temb + sigma) -> SiLU -> strided conv -> pool -> MLP.

    Outputs Beta parameters alpha, beta > 1 (so the mode exists and lies inside (0, 1)):
    ``inputs="blocks"``: mean+max pooling, alpha = 1 + softplus(a); ``inputs="paper"``: the official
    code's average-pool to 16 x 16 then max-pool, alpha = 1 + exp(a). The last layer starts near zero
    with a bias chosen so that the untrained TPM gives ratios with mean ``init_ratio`` and
    concentration ``init_concentration``.
    """

    def __init__(self, spec: TPMSpec) -> None:
        super().__init__()
        self.spec = spec
        h = spec.hidden
        groups = 8 if h % 8 == 0 else 1
        self.in_conv = nn.Conv2d(spec.in_channels, h, 3, padding=1)
        self.norm = nn.GroupNorm(groups, h, affine=False)
        self.cond = nn.Sequential(nn.Linear(spec.temb_dim + 32, h), nn.SiLU(), nn.Linear(h, 2 * h))
        self.down = nn.Conv2d(h, h, 3, stride=2, padding=1)
        if spec.action not in ACTIONS:
            raise ValueError(f"TPM action must be one of {ACTIONS}, got {spec.action!r}")
        self.stop_ratio = spec.action == "stop-ratio"
        self.head = nn.Sequential(nn.Linear(2 * h, h), nn.SiLU(), nn.Linear(h, 3 if self.stop_ratio else 2))
        nn.init.zeros_(self.cond[-1].weight)
        nn.init.zeros_(self.cond[-1].bias)
        last = self.head[-1]
        nn.init.normal_(last.weight, std=1e-3)
        if spec.inputs not in ("blocks", "paper"):
            raise ValueError(f"TPM inputs must be 'blocks' or 'paper', got {spec.inputs!r}")
        self.paper = spec.inputs == "paper"
        if self.stop_ratio:
            table = torch.tensor(spec.init_table, dtype=torch.float32)
            if table.numel() < 2 or float(table[-1]) != 0.0 or bool((table[1:] >= table[:-1]).any()) \
                    or float(table[0]) > 1.0:
                raise ValueError(f"stop-ratio TPM needs init_table: decreasing sigmas in (0, 1] ending at 0, got "
                                 f"{list(spec.init_table)}")
            if not spec.init_spread > 0:
                raise ValueError(f"init_spread must be > 0, got {spec.init_spread}")
            if not spec.stop_sharpness > 0:
                raise ValueError(f"stop_sharpness must be > 0, got {spec.stop_sharpness}")
            self.register_buffer("table", table, persistent=False)
            with torch.no_grad():
                last.bias.zero_()
            return
        m, k = spec.init_ratio, spec.init_concentration
        alpha0, beta0 = m * k, (1.0 - m) * k
        if alpha0 <= 1.0 or beta0 <= 1.0:
            raise ValueError(
                f"init_ratio={m} with init_concentration={k} gives alpha={alpha0:.3g}, beta={beta0:.3g}; "
                "both must exceed 1 (raise init_concentration)"
            )
        inv = math.log if self.paper else _inv_softplus
        with torch.no_grad():
            last.bias.copy_(torch.tensor([inv(alpha0 - 1.0), inv(beta0 - 1.0)]))

    def forward(self, features: torch.Tensor, temb: torch.Tensor, sigma: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        """The action distribution's parameters, each [B] float32: (alpha, beta) for ``beta``;
        (stop logit, mean of logit r, log std of logit r) for ``stop-ratio``."""
        features = features.float()
        cond = torch.cat([temb.float(), sigma_embedding(sigma)], dim=1)
        scale, shift = self.cond(cond).chunk(2, dim=1)
        x = self.norm(self.in_conv(features))
        x = x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        x = F.silu(x)
        x = F.silu(self.down(x))
        if self.paper:  # the official TPM: average-pool to 16 x 16, then max-pool (both halves of the head see it)
            p = F.adaptive_avg_pool2d(x, min(16, x.shape[-1])).amax(dim=(2, 3))
            pooled = torch.cat([p, p], dim=1)
        else:
            pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        ab = self.head(pooled)
        if self.stop_ratio:
            base_stop, base_logit = table_base(self.table, sigma.float().to(ab.device), self.spec.stop_sharpness)
            return (base_stop + ab[:, 0], base_logit + ab[:, 1],
                    math.log(self.spec.init_spread) + ab[:, 2].clamp(-6.0, 3.0))
        act = torch.exp if self.paper else F.softplus
        return 1.0 + act(ab[:, 0]), 1.0 + act(ab[:, 1])

    # ------------------------------------------------------------------ the action distribution
    def log_prob(self, params: tuple[torch.Tensor, ...], action: torch.Tensor) -> torch.Tensor:
        """Log-probability of stored actions (ratio r, or :data:`STOP`), float32 [B]."""
        if not self.stop_ratio:
            return beta_log_prob(params[0], params[1], action)
        stop_logit, mu, log_std = (p.float() for p in params)
        a = action.float().to(mu.device)
        stop = a <= STOP
        r = a.clamp(R_EPS, 1.0 - R_EPS)
        z = torch.logit(r)
        normal = -0.5 * ((z - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        cont = F.logsigmoid(-stop_logit) + normal - torch.log(r * (1.0 - r))
        return torch.where(stop, F.logsigmoid(stop_logit), cont)

    def entropy(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Entropy per row (stop-ratio: the stop bit's plus (1 - p_stop) x the normal's in logit space)."""
        if not self.stop_ratio:
            return beta_entropy(params[0], params[1])
        stop_logit, _, log_std = (p.float() for p in params)
        p = torch.sigmoid(stop_logit)
        bern = F.binary_cross_entropy_with_logits(stop_logit, p, reduction="none")
        return bern + (1.0 - p) * (0.5 * math.log(2 * math.pi * math.e) + log_std)

    def kl(self, params: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """KL(this || reference) per row."""
        if not self.stop_ratio:
            return torch.distributions.kl_divergence(torch.distributions.Beta(params[0], params[1]),
                                                     torch.distributions.Beta(ref[0], ref[1]))
        (l1, m1, s1), (l2, m2, s2) = params, ref
        p = torch.sigmoid(l1)
        bern = p * (F.logsigmoid(l1) - F.logsigmoid(l2)) + (1 - p) * (F.logsigmoid(-l1) - F.logsigmoid(-l2))
        gauss = s2 - s1 + (torch.exp(2 * s1) + (m1 - m2) ** 2) / (2 * torch.exp(2 * s2)) - 0.5
        return bern + (1 - p) * gauss

    def sample(self, params: tuple[torch.Tensor, ...], keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
        """An action per row from each trajectory's own counter-based stream (float32 [B])."""
        if not self.stop_ratio:
            return sample_ratio(params[0], params[1], keys, counters)
        stop_logit, mu, log_std = (p.detach().double() for p in params)
        u = counter_uniform(keys, counters, 3).to(mu.device)
        z = torch.sqrt(-2.0 * torch.log(u[:, 1])) * torch.cos(2 * torch.pi * u[:, 2])
        r = torch.sigmoid(mu + log_std.exp() * z).clamp(R_EPS, 1.0 - R_EPS)
        stop = u[:, 0] < torch.sigmoid(stop_logit)
        return torch.where(stop, torch.full_like(r, STOP), r).float()

    def deterministic(self, params: tuple[torch.Tensor, ...], mode: str) -> torch.Tensor:
        """The inference action: ``mode`` (Beta mode / stop when p > 1/2, else the median ratio) or ``mean``
        (Beta mean / stop when p > 1/2, else E[r] by 8-point Gauss-Hermite quadrature)."""
        if not self.stop_ratio:
            a, b = params
            return (beta_mode(a, b) if mode == "mode" else a / (a + b)).float()
        stop_logit, mu, log_std = (p.float() for p in params)
        if mode == "mode":
            r = torch.sigmoid(mu)
        else:
            x, w = np.polynomial.hermite_e.hermegauss(8)
            x = torch.tensor(x, dtype=torch.float32, device=mu.device)
            w = torch.tensor(w / w.sum(), dtype=torch.float32, device=mu.device)
            r = (torch.sigmoid(mu[:, None] + log_std.exp()[:, None] * x[None]) * w[None]).sum(1)
        r = r.clamp(R_EPS, 1.0 - R_EPS)
        return torch.where(stop_logit > 0, torch.full_like(r, STOP), r)


def table_base(table: torch.Tensor, sigma: torch.Tensor, sharpness: float = STOP_SHARPNESS
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(base stop logit, base logit of r) at ``sigma`` for a decreasing sigma ``table`` ending at 0.

    sigma is placed at its fractional position u on the table (linear between entries); the base next
    sigma is the table read at u + 1, the base ratio that over sigma. The stop logit rises by
    ``sharpness`` per table position and crosses 0 half a position before the table's last
    non-zero entry: on the table, the policy stops exactly where the table jumps to 0."""
    t = table.to(sigma.device)
    n = t.numel()
    rev = torch.flip(t, (0,))  # increasing
    s = sigma.clamp(0.0, float(t[0]))
    k = torch.searchsorted(rev, s, right=True).clamp(1, n - 1)  # rev[k-1] <= s < rev[k]
    lo, hi = rev[k - 1], rev[k]
    frac = ((s - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)
    u = (n - 1 - (k - 1)).float() - frac  # position on the original table (0 at t[0])
    nxt = torch.clamp(u + 1.0, max=float(n - 1))
    j = nxt.floor().long().clamp(max=n - 2)
    g = t[j] + (t[j + 1] - t[j]) * (nxt - j.float())
    ratio = (g / sigma.clamp_min(1e-12)).clamp(*BASE_RATIO_RANGE)
    stop = sharpness * (u - (n - 2.5))
    return stop, torch.logit(ratio)


def beta_log_prob(alpha: torch.Tensor, beta: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """log Beta(r; alpha, beta), computed in float32 with r clamped into (R_EPS, 1 - R_EPS)."""
    r = r.float().clamp(R_EPS, 1.0 - R_EPS)
    return torch.distributions.Beta(alpha.float(), beta.float(), validate_args=False).log_prob(r)


def beta_mode(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Mode of Beta(alpha, beta) for alpha, beta > 1."""
    return (alpha - 1.0) / (alpha + beta - 2.0)


def beta_entropy(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Beta(alpha.float(), beta.float(), validate_args=False).entropy()


def sample_ratio(alpha: torch.Tensor, beta: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor
                 ) -> torch.Tensor:
    """Draw r ~ Beta(alpha, beta) from each trajectory's own counter-based stream (float32 [B])."""
    r = counter_beta(alpha.detach(), beta.detach(), keys, counters)
    return r.float().clamp(R_EPS, 1.0 - R_EPS)


def build_policy(cfg: Config, in_channels: int, temb_dim: int) -> TimePredictionModule:
    """The run's initial TPM: a pure function of the config and the seed (also the KL reference).

    The global torch RNG is left untouched, so building a policy never shifts other random draws.
    """
    blocks = tuple(cfg.backbone.feature_blocks) if cfg.policy.inputs == "blocks" else ()
    spec = TPMSpec(in_channels=in_channels, temb_dim=temb_dim, grid=cfg.backbone.feature_grid,
                   hidden=cfg.policy.hidden, feature_blocks=blocks,
                   init_ratio=cfg.policy.init_ratio, init_concentration=cfg.policy.init_concentration,
                   inputs=cfg.policy.inputs, action=cfg.policy.action,
                   init_table=tuple(cfg.policy.init_table) if cfg.policy.action == "stop-ratio" else (),
                   init_spread=cfg.policy.init_spread,
                   stop_sharpness=cfg.policy.stop_sharpness if cfg.policy.action == "stop-ratio" else STOP_SHARPNESS)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(derive_key(cfg.seed, 0x7B3) % (2**63))
    try:
        return TimePredictionModule(spec)
    finally:
        torch.random.set_rng_state(gen_state)
