"""The Time Prediction Module (TPM): a small policy that picks the next noise level.

At every denoising step it reads the backbone's pooled block features (image tokens on a 2-D grid),
the timestep/text embedding ``temb`` and the current sigma, and outputs the parameters of a distribution over
its action. The action spaces (``TPMSpec.action``: ``beta``, the paper's, or ``stop-ratio``, ours) are objects
of ``tpdm_rl/algorithm/actions.py``; the TPM asks its action object for everything about the distribution (sample,
deterministic, log_prob, entropy, KL).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tpdm_rl.algorithm.actions import ACTIONS, STOP_SHARPNESS, ActionDistribution, Params, make_action
from tpdm_rl.core.config import Config
from tpdm_rl.core.rng import derive_key

__all__ = ["ACTIONS", "LEGACY_STOP_SHARPNESS", "TPMSpec", "TimePredictionModule", "build_policy", "sigma_embedding"]

#: the sharpness of TPM files written before it was a setting
LEGACY_STOP_SHARPNESS = 8.0


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
    init_stop_steps: int = 0  # stop-ratio: steps of the untrained TPM (0: the table's own)

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


def sigma_embedding(sigma: torch.Tensor, dim: int = 32) -> torch.Tensor:
    """Sinusoidal embedding of 1000 * sigma (the diffusers timestep scale)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = (sigma.float() * 1000.0).reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimePredictionModule(nn.Module):
    """conv -> adaptive group-norm (conditioned on temb + sigma) -> SiLU -> strided conv -> pool -> MLP.

    ``inputs="blocks"``: mean+max pooling (Beta head 1 + softplus); ``inputs="paper"``: the official code's
    average-pool to 16 x 16 then max-pool (Beta head 1 + exp). The last layer starts near zero with the bias its
    action object chooses, so the untrained TPM starts where the spec says (``init_ratio`` and
    ``init_concentration`` for ``beta``, ``init_table`` for ``stop-ratio``).
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
        if spec.inputs not in ("blocks", "paper"):
            raise ValueError(f"TPM inputs must be 'blocks' or 'paper', got {spec.inputs!r}")
        self.paper = spec.inputs == "paper"
        self.action: ActionDistribution = make_action(
            spec.action, init_ratio=spec.init_ratio, init_concentration=spec.init_concentration, exp_head=self.paper,
            init_table=spec.init_table, init_spread=spec.init_spread, stop_sharpness=spec.stop_sharpness,
            init_stop_steps=spec.init_stop_steps)
        self.head = nn.Sequential(nn.Linear(2 * h, h), nn.SiLU(), nn.Linear(h, self.action.head_size))
        nn.init.zeros_(self.cond[-1].weight)
        nn.init.zeros_(self.cond[-1].bias)
        last = self.head[-1]
        nn.init.normal_(last.weight, std=1e-3)
        with torch.no_grad():
            self.action.init_head_bias(last.bias)

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
        return self.action.params(self.head(pooled), sigma)

    # ------------------------------------------------------------------ the action distribution (its object's)
    def log_prob(self, params: Params, action: torch.Tensor) -> torch.Tensor:
        """Log-probability of stored actions (ratio r, or ``actions.STOP``), float32 [B]."""
        return self.action.log_prob(params, action)

    def entropy(self, params: Params) -> torch.Tensor:
        return self.action.entropy(params)

    def kl(self, params: Params, ref: Params) -> torch.Tensor:
        """KL(this || reference) per row."""
        return self.action.kl(params, ref)

    def sample(self, params: Params, keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
        """An action per row from each trajectory's own counter-based stream (float32 [B])."""
        return self.action.sample(params, keys, counters)

    def deterministic(self, params: Params, mode: str) -> torch.Tensor:
        """The inference action (``mode`` or ``mean``; see the action's own)."""
        return self.action.deterministic(params, mode)


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
                   stop_sharpness=cfg.policy.stop_sharpness if cfg.policy.action == "stop-ratio" else STOP_SHARPNESS,
                   init_stop_steps=cfg.policy.init_stop_steps if cfg.policy.action == "stop-ratio" else 0)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(derive_key(cfg.seed, 0x7B3) % (2**63))
    try:
        return TimePredictionModule(spec)
    finally:
        torch.random.set_rng_state(gen_state)
