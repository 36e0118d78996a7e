"""Sweep planning: grid/random axes, trial names and configs, validation before anything runs."""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpdm_rl.core.config import Config, ConfigError
from tpdm_rl.core.config_io import load_config, parse_override

PLAN_FILE = "sweep_plan.json"
TRIAL_FILE = "trial.json"
DONE_FILE = "DONE"
FINISHED_STATES = ("finished", "early_stopped")


class SweepError(ConfigError):
    """A problem with the sweep's arguments or output folder (one line, exit code 2)."""


# ---------------------------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class GridAxis:
    key: str
    values: tuple[str, ...]  # as typed; each is parsed like a --set value


@dataclass(frozen=True)
class RandomAxis:
    key: str
    low: float
    high: float
    integer: bool = False  # both bounds written as integers: draw integers in [low, high]


@dataclass
class TrialSpec:
    name: str
    overrides: dict[str, str]  # key -> value text, in axis order
    config: dict = field(default_factory=dict)  # validated config (json dump)

    def override_list(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.overrides.items()]


def _check_key(item: str, flag: str) -> str:
    if "=" not in item:
        raise SweepError(f"config error: {flag} {item!r}: expected KEY=VALUES")
    try:
        path, _ = parse_override(item)
    except ConfigError as exc:
        raise SweepError(f"{exc} ({flag})") from None
    return ".".join(path)


def parse_grid(item: str) -> GridAxis:
    """``KEY=V1,V2,...`` -> GridAxis (values are validated later, with the whole trial config)."""
    key = _check_key(item, "--grid")
    raw = item.split("=", 1)[1]
    values = tuple(v.strip() for v in raw.split(","))
    if not raw.strip() or any(not v for v in values):
        raise SweepError(f"config error: --grid {item!r}: expected KEY=V1,V2,... with non-empty values")
    if len(set(values)) != len(values):
        raise SweepError(f"config error: --grid {item!r}: repeated value")
    return GridAxis(key, values)


_INT_RE = re.compile(r"^[+-]?\d+$")


def parse_random(item: str) -> RandomAxis:
    """``KEY=LOW:HIGH`` -> RandomAxis (integers when both bounds are written as integers)."""
    key = _check_key(item, "--random")
    raw = item.split("=", 1)[1].strip()
    parts = raw.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise SweepError(f"config error: --random {item!r}: expected KEY=LOW:HIGH with numbers") from None
    if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
        raise SweepError(f"config error: --random {item!r}: LOW must be below HIGH")
    integer = all(_INT_RE.match(p.strip()) for p in parts)
    return RandomAxis(key, low, high, integer)


def _yaml_float(x: float) -> str:
    """Shortest text that YAML reads back as this float (``1e-05`` would be a string: ``1.0e-05``)."""
    t = repr(float(x))
    if "e" in t and "." not in t.split("e")[0]:
        m, e = t.split("e")
        t = f"{m}.0e{e}"
    return t


def _draw(axis: RandomAxis, rng: random.Random, log: bool) -> str:
    if log:
        if axis.low <= 0:
            raise SweepError(f"config error: --random {axis.key}: --log needs LOW > 0 (got {axis.low:g})")
        x = math.exp(rng.uniform(math.log(axis.low), math.log(axis.high)))
    else:
        x = rng.uniform(axis.low, axis.high)
    if axis.integer:
        return str(min(int(axis.high), max(int(axis.low), round(x))))
    return _yaml_float(float(f"{x:.4g}"))


_SAFE = re.compile(r"[^A-Za-z0-9._=+-]")


def trial_name(overrides: dict[str, str]) -> str:
    """Filesystem-safe, stable name from the overrides: ``key=value__key=value``.

    Characters other than ``[A-Za-z0-9._=+-]`` become ``_``; when that changed anything, or the name
    would exceed 100 characters, a short hash of the exact overrides is appended so names stay unique.
    """
    exact = "__".join(f"{k}={v}" for k, v in overrides.items())
    safe = _SAFE.sub("_", exact)
    if safe != exact or len(safe) > 100:
        digest = hashlib.sha1(exact.encode()).hexdigest()[:8]
        safe = f"{safe[:88]}-{digest}"
    return safe


def short_keys(keys: list[str]) -> dict[str, str]:
    """Shortest dotted suffix of each key that is unique among ``keys`` (for labels)."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(1 for o in keys if o == suffix or o.endswith("." + suffix)) == 1:
                out[k] = suffix
                break
        else:
            out[k] = k
    return out


def expand_trials(grid: list[GridAxis], rand: list[RandomAxis], samples: int = 1, seed: int = 0,
                  log: bool = False) -> list[TrialSpec]:
    """Grid points x ``samples`` random draws (seeded by ``seed``); duplicates are dropped."""
    keys = [a.key for a in grid] + [a.key for a in rand]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise SweepError(f"config error: {dup}: swept twice (each key may appear in one --grid/--random)")
    if not keys:
        raise SweepError("config error: nothing to sweep: give at least one --grid KEY=V1,V2 or --random KEY=LOW:HIGH")
    if samples < 1:
        raise SweepError(f"config error: --samples must be >= 1, got {samples}")
    if samples > 1 and not rand:
        raise SweepError("config error: --samples repeats the random draws; it needs --random (grid points are "
                         "deterministic runs)")
    rng = random.Random(int(seed) * 1_000_003 + 0x5EE9)
    draws = [{a.key: _draw(a, rng, log) for a in rand} for _ in range(samples if rand else 1)]
    trials, seen = [], set()
    for point in itertools.product(*[a.values for a in grid]):
        for d in draws:
            ov = dict(zip([a.key for a in grid], point)) | d
            name = trial_name(ov)
            if name not in seen:
                seen.add(name)
                trials.append(TrialSpec(name, ov))
    return trials


def _where(trial: TrialSpec, grid: list[GridAxis], rand: list[RandomAxis], msg: str) -> str:
    """Name the sweep argument behind a config error (``msg`` is ``config error: LOC: ...``)."""
    parts = msg.split(": ")
    loc = parts[1] if len(parts) > 2 else ""

    def related(key: str) -> bool:
        return bool(loc) and (key == loc or key.startswith(loc + ".") or loc.startswith(key + "."))

    for a in grid:
        if related(a.key):
            return f"(from --grid {a.key}={','.join(a.values)}, value {trial.overrides[a.key]!r})"
    for a in rand:
        if related(a.key):
            return f"(from --random {a.key}, drawn value {trial.overrides[a.key]!r})"
    return f"(trial {trial.name})"


def validate_trials(config_path: str | None, set_overrides: list[str], trials: list[TrialSpec],
                    grid: list[GridAxis] | None = None, rand: list[RandomAxis] | None = None) -> Config:
    """Validate the base config and every trial's config; fills ``trial.config``. Returns the base."""
    base = load_config(config_path, set_overrides)
    for t in trials:
        try:
            cfg = load_config(config_path, list(set_overrides) + t.override_list())
        except ConfigError as exc:
            msg = str(exc)
            raise SweepError(f"{msg} {_where(t, grid or [], rand or [], msg)}") from None
        t.config = cfg.model_dump(mode="json")
    return base


def quality_weights(base: Config) -> dict[str, float]:
    return {name: float(spec.weight) for name, spec in base.rewards.items()}


def plan_sweep(output: str | Path, config_path: str | None, set_overrides: list[str], grid: list[str],
               rand: list[str], samples: int = 1, log: bool = False) -> tuple[Config, list[TrialSpec], dict]:
    """Parse and validate everything (no file is written): base config, trials, the plan record."""
    grid_axes = [parse_grid(g) for g in grid]
    rand_axes = [parse_random(r) for r in rand]
    if log and not rand_axes:
        raise SweepError("config error: --log applies to --random axes; none given")
    base = load_config(config_path, set_overrides)
    trials = expand_trials(grid_axes, rand_axes, samples, base.seed, log)
    validate_trials(config_path, set_overrides, trials, grid_axes, rand_axes)
    out = Path(output).resolve()
    plan = {
        "config": str(config_path) if config_path else None, "set": list(set_overrides),
        "grid": [{"key": a.key, "values": list(a.values)} for a in grid_axes],
        "random": [{"key": a.key, "low": a.low, "high": a.high, "integer": a.integer} for a in rand_axes],
        "samples": samples, "log": log, "seed": base.seed, "keys": [a.key for a in grid_axes + rand_axes],
        "quality_weights": quality_weights(base), "output": str(out),
        "trials": [{"name": t.name, "overrides": t.overrides} for t in trials],
    }
    return base, trials, plan


def first_diff(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} then, {b!r} now"


def trial_label(overrides: dict[str, str], keys: list[str]) -> str:
    short = short_keys(list(keys) or list(overrides))
    return ", ".join(f"{short.get(k, k)}={v}" for k, v in overrides.items())
