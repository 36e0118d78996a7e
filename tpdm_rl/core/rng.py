"""Counter-based random numbers: every trajectory owns its own stream.

With continuous batching and several rollout workers, which trajectories share a backbone batch
depends on scheduling. A global generator would then make a trajectory's noise and Beta draws depend
on who else was in the batch. Here a draw is a pure function of (trajectory key, step, draw index),
computed with an integer hash in vectorised torch ops, so results do not depend on batching, worker
count or device, and resuming needs no generator state.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def splitmix64(x: int) -> int:
    """One round of SplitMix64 on a Python int (used to derive keys from (seed, iteration, index))."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def derive_key(*parts: int) -> int:
    """A 62-bit key from integer parts; different part tuples give unrelated keys."""
    h = 0x1234567
    for p in parts:
        h = splitmix64(h ^ (int(p) & 0xFFFFFFFFFFFFFFFF))
    return h >> 2


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2**32 for 0 <= x < 2**32 without int64 overflow (split m into 16-bit halves)."""
    lo = x * (m & 0xFFFF)
    hi = ((x * (m >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A strong 32-bit integer finaliser ("lowbias32") on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(keys: torch.Tensor, counters: torch.Tensor, n: int) -> torch.Tensor:
    """Uniforms in the open interval (0, 1), shape [B, n], float64.

    ``keys`` [B] (int64, up to 62 bits) select the stream, ``counters`` [B] (int64, >= 0) the
    position in it (e.g. the step), and the last axis enumerates ``n`` independent draws.
    """
    keys = keys.to(torch.int64).reshape(-1, 1)
    counters = counters.to(torch.int64).reshape(-1, 1)
    j = torch.arange(n, dtype=torch.int64, device=keys.device).reshape(1, -1)
    k_lo = keys & _M32
    k_hi = (keys >> 32) & _M32
    h = _mix32((j + 0x2545F491) & _M32)
    h = _mix32(h ^ (counters & _M32))
    h = _mix32(h ^ ((counters >> 32) & _M32))
    h = _mix32(h ^ k_hi)
    h = _mix32(h ^ k_lo)
    # second, differently seeded hash for 53 bits of mantissa
    h2 = _mix32(h ^ 0x68E31DA4)
    u = (h.to(torch.float64) * 2.0**21 + (h2 >> 11).to(torch.float64) + 0.5) / 2.0**53
    return u


def counter_normal(keys: torch.Tensor, counters: torch.Tensor, n: int) -> torch.Tensor:
    """Standard normals [B, n] (float64) by Box-Muller on counter-based uniforms."""
    m = (n + 1) // 2
    u = counter_uniform(keys, counters, 2 * m)
    u1, u2 = u[:, :m], u[:, m:]
    r = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.cat([r * torch.cos(2 * torch.pi * u2), r * torch.sin(2 * torch.pi * u2)], dim=1)
    return z[:, :n]


GAMMA_CANDIDATES = 8


def counter_gamma(concentration: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor,
                  stream: int) -> torch.Tensor:
    """Gamma(concentration, 1) draws for concentration >= 1, one per row, vectorised.

    Marsaglia-Tsang with ``GAMMA_CANDIDATES`` proposals per draw evaluated at once; the first
    accepted one is used (acceptance >= 95% each, so all rejected has probability < 1e-10; then the
    mode-like value d is returned). ``stream`` separates independent draws at the same counter.
    """
    a = concentration.to(torch.float64).reshape(-1, 1)
    k = GAMMA_CANDIDATES
    sub = counters.to(torch.int64) * 4 + int(stream)
    z = counter_normal(keys, sub, k)
    u = counter_uniform(keys, sub + 2, k)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    v = (1.0 + c * z) ** 3
    pos = v > 0
    logv = torch.log(torch.where(pos, v, torch.ones_like(v)))
    accept = pos & (torch.log(u) < 0.5 * z * z + d - d * v + d * logv)
    first = torch.where(accept.any(dim=1), accept.to(torch.int8).argmax(dim=1), torch.full_like(a[:, 0], -1,
                                                                                                dtype=torch.int64))
    vals = d * v
    chosen = vals.gather(1, first.clamp_min(0).reshape(-1, 1)).reshape(-1)
    return torch.where(first >= 0, chosen, d.reshape(-1))


def counter_beta(alpha: torch.Tensor, beta: torch.Tensor, keys: torch.Tensor,
                 counters: torch.Tensor) -> torch.Tensor:
    """Beta(alpha, beta) draws (alpha, beta >= 1) from each row's own stream; float64 [B]."""
    x = counter_gamma(alpha, keys, counters, stream=0)
    y = counter_gamma(beta, keys, counters, stream=1)
    return x / (x + y)


def keyed_normal_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Initial latents, one CPU ``torch.Generator`` per seed (matches diffusers' ``randn_tensor``).

    This runs once per trajectory when it joins the batch, not per step; a CPU generator gives the
    same noise on every device, and a batch of one equals ``pipe(generator=Generator().manual_seed(s))``.
    """
    out = torch.empty((len(seeds), *shape), dtype=dtype)
    for i, s in enumerate(seeds):
        g = torch.Generator(device="cpu").manual_seed(int(s))
        out[i] = torch.randn(shape, generator=g, dtype=dtype)
    return out.to(device)
