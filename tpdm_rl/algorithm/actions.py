"""The TPM's action distributions: one object per action, all behind one interface.

The TPM (``tpdm_rl/algorithm/policy.py``) maps features to a head output per row; its action object turns that output into
the distribution's parameters (``params``, a tuple of [B] tensors) and answers everything asked of the
distribution: ``sample``, ``deterministic`` (the inference action: ``mode`` or ``mean``), ``log_prob``,
``entropy`` and ``kl``. An action is stored for the learner as the ratio r = sigma_next / sigma in (0, 1), or
exactly :data:`STOP` for "stop".

``beta`` (the paper's, :class:`BetaAction`)
    r ~ Beta(alpha, beta); the trajectory ends only when r * sigma < sigma_min. Starts at mean ``init_ratio`` and
    concentration ``init_concentration``.
``stop-ratio`` (ours, :class:`StopRatioAction`)
    Every step is a Bernoulli "stop" (jump to sigma 0 now, the Euler step x0 = x - sigma v) and, when not
    stopping, a logit-normal ratio: logit r ~ Normal(mu, s) with a learned s. Both are *offsets* from a base
    sigma table (``init_table``): at sigma on the table the untrained TPM proposes the table's next sigma and
    stops where the table jumps to 0, with spread ``init_spread`` (logit units). So the policy starts at a good
    hand-made schedule, can finish early on purpose (a Beta ratio needs r < sigma_min / sigma, a far-tail
    action PPO never reaches), and can become sharp. Deterministic inference: stop when p_stop > 0.5, else
    the median ratio sigmoid(mu).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tpdm_rl.core.rng import counter_beta, counter_uniform
from tpdm_rl.core.tables import check_stop_steps, check_table

R_EPS = 1e-6  # ratios are kept inside (R_EPS, 1 - R_EPS) so log-probs stay finite
STOP = 0.0  # the stored action of a "stop" decision (stop-ratio); ratios lie in (R_EPS, 1 - R_EPS)
#: base stop logit per table position (``TPMSpec.stop_sharpness``): at 3, p_stop is 0.18 one table step before the
#: jump to 0, 0.011 two steps before, 0.82 at it. At the former 8 (0.018 / 6e-6 / 0.98) a group almost never tried a
#: shorter schedule, so GRPO had no per-prompt contrast to learn from (docs/design.md, "Exploration of the stop head")
STOP_SHARPNESS = 3.0
BASE_RATIO_RANGE = (0.02, 0.98)  # the base ratio is clamped here before its logit

Params = tuple[torch.Tensor, ...]


class ActionDistribution(nn.Module):
    """What the TPM and its learner ask of an action space. A module only so that its buffers follow the TPM's
    device; it holds no parameters (the TPM's state dict is the same for every action)."""

    name: str
    head_size: int  # outputs of the TPM's last layer

    def init_head_bias(self, bias: torch.Tensor) -> None:
        """Set the last layer's bias so that the untrained TPM starts where the spec says."""
        raise NotImplementedError

    def params(self, head: torch.Tensor, sigma: torch.Tensor) -> Params:
        """The distribution's parameters from the head output [B, head_size] at noise level ``sigma`` [B]."""
        raise NotImplementedError

    def sample(self, params: Params, keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
        """An action per row from each trajectory's own counter-based stream (float32 [B])."""
        raise NotImplementedError

    def deterministic(self, params: Params, mode: str) -> torch.Tensor:
        """The inference action: ``mode`` or ``mean``."""
        raise NotImplementedError

    def log_prob(self, params: Params, action: torch.Tensor) -> torch.Tensor:
        """Log-probability of stored actions (ratio r, or :data:`STOP`), float32 [B]."""
        raise NotImplementedError

    def entropy(self, params: Params) -> torch.Tensor:
        raise NotImplementedError

    def kl(self, params: Params, ref: Params) -> torch.Tensor:
        """KL(this || reference) per row."""
        raise NotImplementedError


class BetaAction(ActionDistribution):
    """r = sigma_next / sigma ~ Beta(alpha, beta) with alpha, beta > 1 (so the mode exists inside (0, 1)):
    1 + softplus of the head, or 1 + exp (``exp_head``, the official code's head)."""

    name, head_size = "beta", 2

    def __init__(self, init_ratio: float, init_concentration: float, exp_head: bool = False) -> None:
        super().__init__()
        m, k = init_ratio, init_concentration
        self.alpha0, self.beta0 = m * k, (1.0 - m) * k
        if self.alpha0 <= 1.0 or self.beta0 <= 1.0:
            raise ValueError(
                f"init_ratio={m} with init_concentration={k} gives alpha={self.alpha0:.3g}, beta={self.beta0:.3g}; "
                "both must exceed 1 (raise init_concentration)"
            )
        self.exp_head = exp_head

    def init_head_bias(self, bias: torch.Tensor) -> None:
        inv = math.log if self.exp_head else _inv_softplus
        bias.copy_(torch.tensor([inv(self.alpha0 - 1.0), inv(self.beta0 - 1.0)]))

    def params(self, head: torch.Tensor, sigma: torch.Tensor) -> Params:
        act = torch.exp if self.exp_head else F.softplus
        return 1.0 + act(head[:, 0]), 1.0 + act(head[:, 1])

    def sample(self, params: Params, keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
        return sample_ratio(params[0], params[1], keys, counters)

    def deterministic(self, params: Params, mode: str) -> torch.Tensor:
        """The Beta mode (``mode``) or mean (``mean``)."""
        a, b = params
        return (beta_mode(a, b) if mode == "mode" else a / (a + b)).float()

    def log_prob(self, params: Params, action: torch.Tensor) -> torch.Tensor:
        return beta_log_prob(params[0], params[1], action)

    def entropy(self, params: Params) -> torch.Tensor:
        return beta_entropy(params[0], params[1])

    def kl(self, params: Params, ref: Params) -> torch.Tensor:
        return torch.distributions.kl_divergence(torch.distributions.Beta(params[0], params[1]),
                                                 torch.distributions.Beta(ref[0], ref[1]))


class StopRatioAction(ActionDistribution):
    """A stop bit and, when not stopping, logit r ~ Normal(mu, s); params are (stop logit, mu, log s), each an
    offset from the base sigma table ``table`` (see the module docstring)."""

    name, head_size = "stop-ratio", 3

    def __init__(self, table: tuple[float, ...], init_spread: float, sharpness: float, stop_steps: int = 0) -> None:
        super().__init__()
        check_table(table, "init_table")  # the same rule as the config's (a TPM file's spec is checked here)
        if not init_spread > 0:
            raise ValueError(f"init_spread must be > 0, got {init_spread}")
        if not sharpness > 0:
            raise ValueError(f"stop_sharpness must be > 0, got {sharpness}")
        check_stop_steps(stop_steps, table)
        self.init_spread, self.sharpness, self.stop_steps = init_spread, sharpness, stop_steps
        self.register_buffer("table", torch.tensor(table, dtype=torch.float32), persistent=False)

    def init_head_bias(self, bias: torch.Tensor) -> None:
        bias.zero_()

    def params(self, head: torch.Tensor, sigma: torch.Tensor) -> Params:
        base_stop, base_logit = table_base(self.table, sigma.float().to(head.device), self.sharpness,
                                           self.stop_steps)
        return (base_stop + head[:, 0], base_logit + head[:, 1],
                math.log(self.init_spread) + head[:, 2].clamp(-6.0, 3.0))

    def sample(self, params: Params, keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
        stop_logit, mu, log_std = (p.detach().double() for p in params)
        u = counter_uniform(keys, counters, 3).to(mu.device)
        z = torch.sqrt(-2.0 * torch.log(u[:, 1])) * torch.cos(2 * torch.pi * u[:, 2])
        r = torch.sigmoid(mu + log_std.exp() * z).clamp(R_EPS, 1.0 - R_EPS)
        stop = u[:, 0] < torch.sigmoid(stop_logit)
        return torch.where(stop, torch.full_like(r, STOP), r).float()

    def deterministic(self, params: Params, mode: str) -> torch.Tensor:
        """Stop when p_stop > 1/2, else the median ratio sigmoid(mu) (``mode``) or E[r] by 8-point Gauss-Hermite
        quadrature (``mean``)."""
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

    def log_prob(self, params: Params, action: torch.Tensor) -> torch.Tensor:
        stop_logit, mu, log_std = (p.float() for p in params)
        a = action.float().to(mu.device)
        stop = a <= STOP
        r = a.clamp(R_EPS, 1.0 - R_EPS)
        z = torch.logit(r)
        normal = -0.5 * ((z - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        cont = F.logsigmoid(-stop_logit) + normal - torch.log(r * (1.0 - r))
        return torch.where(stop, F.logsigmoid(stop_logit), cont)

    def entropy(self, params: Params) -> torch.Tensor:
        """The stop bit's entropy plus (1 - p_stop) x the normal's in logit space."""
        stop_logit, _, log_std = (p.float() for p in params)
        p = torch.sigmoid(stop_logit)
        bern = F.binary_cross_entropy_with_logits(stop_logit, p, reduction="none")
        return bern + (1.0 - p) * (0.5 * math.log(2 * math.pi * math.e) + log_std)

    def kl(self, params: Params, ref: Params) -> torch.Tensor:
        (l1, m1, s1), (l2, m2, s2) = params, ref
        p = torch.sigmoid(l1)
        bern = p * (F.logsigmoid(l1) - F.logsigmoid(l2)) + (1 - p) * (F.logsigmoid(-l1) - F.logsigmoid(-l2))
        gauss = s2 - s1 + (torch.exp(2 * s1) + (m1 - m2) ** 2) / (2 * torch.exp(2 * s2)) - 0.5
        return bern + (1 - p) * gauss


ACTIONS = ("beta", "stop-ratio")


def make_action(action: str, *, init_ratio: float, init_concentration: float, exp_head: bool,
                init_table: tuple[float, ...], init_spread: float, stop_sharpness: float,
                init_stop_steps: int = 0) -> ActionDistribution:
    """The action object named ``action``, validated (ValueError names the setting at fault)."""
    if action == "beta":
        return BetaAction(init_ratio, init_concentration, exp_head)
    if action == "stop-ratio":
        return StopRatioAction(init_table, init_spread, stop_sharpness, init_stop_steps)
    raise ValueError(f"TPM action must be one of {ACTIONS}, got {action!r}")


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def table_base(table: torch.Tensor, sigma: torch.Tensor, sharpness: float = STOP_SHARPNESS, stop_steps: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(base stop logit, base logit of r) at ``sigma`` for a decreasing sigma ``table`` ending at 0.

    sigma is placed at its fractional position u on the table (linear between entries); the base next
    sigma is the table read at u + 1, the base ratio that over sigma. The stop logit rises by
    ``sharpness`` per table position and crosses 0 half a position before the table's last
    non-zero entry: on the table, the policy stops exactly where the table jumps to 0. With ``stop_steps`` m > 0
    it crosses 0 half a position before entry m - 1 instead: the untrained policy follows the table's ratios but
    stops after m steps, so a class that needs more steps climbs one step at a time rather than crossing a step
    count that is worse than both its neighbours (docs/design.md, "Where the stop head starts")."""
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
    last = (stop_steps if stop_steps else n - 1) - 1  # the position whose step ends the untrained schedule
    stop = sharpness * (u - (last - 0.5))
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
