"""The Time Prediction Module (TPM): a small policy that picks the next noise level.

At every denoising step it reads the backbone's pooled block features (image tokens on a 2-D grid),
the timestep/text embedding ``temb`` and the current sigma, and outputs a Beta distribution over the
ratio r = sigma_next / sigma. Training samples r; inference uses the Beta mode.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tpdm_rl.rollout.rng import counter_beta, derive_key

from .config import Config

R_EPS = 1e-6  # ratios are kept inside (R_EPS, 1 - R_EPS) so log-probs stay finite


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["feature_blocks"] = list(self.feature_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TPMSpec:
        d = dict(d)
        d["feature_blocks"] = tuple(d.get("feature_blocks", (0, -1)))
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
        self.head = nn.Sequential(nn.Linear(2 * h, h), nn.SiLU(), nn.Linear(h, 2))
        nn.init.zeros_(self.cond[-1].weight)
        nn.init.zeros_(self.cond[-1].bias)
        last = self.head[-1]
        nn.init.normal_(last.weight, std=1e-3)
        m, k = spec.init_ratio, spec.init_concentration
        alpha0, beta0 = m * k, (1.0 - m) * k
        if alpha0 <= 1.0 or beta0 <= 1.0:
            raise ValueError(
                f"init_ratio={m} with init_concentration={k} gives alpha={alpha0:.3g}, beta={beta0:.3g}; "
                "both must exceed 1 (raise init_concentration)"
            )
        if spec.inputs not in ("blocks", "paper"):
            raise ValueError(f"TPM inputs must be 'blocks' or 'paper', got {spec.inputs!r}")
        self.paper = spec.inputs == "paper"
        inv = math.log if self.paper else _inv_softplus
        with torch.no_grad():
            last.bias.copy_(torch.tensor([inv(alpha0 - 1.0), inv(beta0 - 1.0)]))

    def forward(self, features: torch.Tensor, temb: torch.Tensor, sigma: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (alpha, beta), each [B], float32."""
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
        act = torch.exp if self.paper else F.softplus
        return 1.0 + act(ab[:, 0]), 1.0 + act(ab[:, 1])


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
                   inputs=cfg.policy.inputs)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(derive_key(cfg.seed, 0x7B3) % (2**63))
    try:
        return TimePredictionModule(spec)
    finally:
        torch.random.set_rng_state(gen_state)
