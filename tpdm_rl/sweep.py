"""Reward-weight / step-penalty sweeps on Ray Tune, and the sweep report.

A sweep is a set of *trials*; each trial is a normal training run (``Trainer``, or ``RayTrainer`` when
``distributed.enabled``) of the base config (``--config`` + ``--set``) plus the trial's own grid/random
overrides, with the same validation, metrics and checkpoints, written to ``DIR/trials/<name>/``.

Layout of ``DIR``:

- ``sweep_plan.json``: the base config path and ``--set`` overrides, the grid/random spec, the trials;
- ``trials/<name>/``: ``trial.json`` (overrides, validated config, accumulated wall time),
  ``metrics.jsonl``, ``checkpoints/``, ``config.yaml``, and ``DONE`` (final metrics, written
  atomically when the trial ended: finished or stopped early). ``--resume`` skips trials with ``DONE``;
  the others continue from their own checkpoints (``resume="auto"``); Tune's experiment restore is not
  used;
- ``tune/``: Ray Tune's experiment folders (``storage_path``);
- ``sweep.json``, ``sweep.md``, ``sweep_pareto.png``: the report (``collect_report`` / ``write_report``).

Quality: trials that sweep reward weights or ``step_penalty.coef`` optimise different objectives, so
their ``reward/total`` values are not comparable. The report therefore ranks trials by
**quality** = sum over components of (the *base* config's weight x the component's raw mean reward);
the base weights are the same for every trial, and the step penalty is left out (steps are the other
axis). ``best_under_budget`` returns the highest-quality trial whose mean steps fit the budget.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, load_config, parse_override

PLAN_FILE = "sweep_plan.json"
TRIAL_FILE = "trial.json"
DONE_FILE = "DONE"
FINAL_WINDOW = 3  # final metrics: mean of the last min(3, n) iterations
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


# ---------------------------------------------------------------------------------------------- resources
def trial_bundles(cfg: Config, controller_cpus: float = 1.0) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: the controller (the Tune trainable itself) first, then one
    bundle per actor (rollout workers, reward workers per component, learner ranks) when
    ``distributed.enabled``; otherwise one bundle for the single process (1 CPU, plus 1 GPU when
    ``train.device`` / ``backbone.device`` name a CUDA device)."""

    def bundle(cpu: float, gpu: float = 0.0) -> dict[str, float]:
        b = {"CPU": float(cpu)}
        if gpu > 0:
            b["GPU"] = float(gpu)
        return b

    if not cfg.distributed.enabled:
        wants_gpu = any(str(d).startswith("cuda") for d in (cfg.train.device, cfg.backbone.device))
        return [bundle(max(controller_cpus, 1.0), 1.0 if wants_gpu else 0.0)]
    d = cfg.distributed
    out = [bundle(controller_cpus)]
    out += [bundle(d.rollout.num_cpus, d.rollout.num_gpus) for _ in range(d.rollout.num_workers)]
    for name in cfg.rewards:
        p = cfg.reward_pool(name)
        out += [bundle(p.num_cpus, p.num_gpus) for _ in range(p.num_workers)]
    out += [bundle(d.learner.num_cpus, d.learner.num_gpus) for _ in range(d.learner.num_ranks)]
    # Ray refuses empty bundles: an actor asking for no resources fits in any bundle of the group
    return [b for b in out if any(v > 0 for v in b.values())]


def _bundle_total(bundles: list[dict[str, float]]) -> dict[str, float]:
    tot: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            tot[k] = tot.get(k, 0.0) + v
    return tot


# ---------------------------------------------------------------------------------------------- files
def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def final_metrics(records: list[dict], window: int = FINAL_WINDOW) -> dict[str, float | None]:
    """Mean of the last min(window, n) iterations of ``steps/*`` and ``reward/*`` (non-finite skipped)."""
    tail = records[-window:]
    keys = [k for k in (records[-1] if records else {}) if k.startswith(("reward/", "steps/"))]
    out: dict[str, float | None] = {}
    for k in keys:
        vals = [x for x in (_num(r.get(k)) for r in tail) if x is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


def _read_metrics(path: Path) -> list[dict]:
    recs = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return recs


# ---------------------------------------------------------------------------------------------- trainable
def _trainable(config: dict) -> None:
    """Tune function trainable: one training run into its trial folder, reporting every iteration."""
    from ray import tune

    spec = config["trial"]
    trial_dir = Path(spec["dir"])
    cfg = Config.model_validate(spec["config"])
    # progress bars of concurrent trials would only interleave in Ray's worker logs
    cfg = cfg.model_copy(update={"logging": cfg.logging.model_copy(update={"progress": False})})
    info = _read_json(trial_dir / TRIAL_FILE) or {}
    prior_wall = float(info.get("wall_s") or 0.0)
    t0 = time.monotonic()
    weights = spec["quality_weights"]

    def save_info(status: str) -> float:
        wall = prior_wall + time.monotonic() - t0
        _write_json_atomic(trial_dir / TRIAL_FILE, info | {"wall_s": wall, "status": status})
        return wall

    if cfg.distributed.enabled:
        from .ray_trainer import RayTrainer

        trainer = RayTrainer(cfg, output=trial_dir, resume="auto")  # joins this trial's Ray / placement group
    else:
        from .trainer import Trainer

        trainer = Trainer(cfg, output=trial_dir, resume="auto")
    save_info("running")
    log = trainer.metrics.log
    reported = []

    def report(m: dict) -> None:
        out = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        q = [(_num(m.get(f"reward/{c}")), w) for c, w in weights.items()]
        out["quality"] = sum(x * w for x, w in q) if all(x is not None for x, _ in q) else float("nan")
        out["train_iteration"] = int(m["iteration"]) + 1
        reported.append(out["train_iteration"])
        tune.report(out)

    def log_and_report(m: dict) -> None:
        log(m)
        save_info("running")
        report(m)

    trainer.metrics.log = log_and_report
    trainer.train()
    records = _read_metrics(trial_dir / "metrics.jsonl")
    if not reported and records:  # already complete (killed between its last checkpoint and DONE)
        report(records[-1])
    wall = save_info("finished")
    _write_json_atomic(trial_dir / DONE_FILE, {"status": "finished", "iterations": len(records),
                                               "final": final_metrics(records), "wall_s": wall,
                                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})


# ---------------------------------------------------------------------------------------------- running
def _check_fits(trials: list[TrialSpec], bundles: dict[str, list[dict]], local: bool) -> None:
    import ray

    have = ray.cluster_resources()
    for t in trials:
        need = _bundle_total(bundles[t.name])
        short = {k: v for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
        if short:
            what = ", ".join(f"{k} {v:g} (cluster has {have.get(k, 0.0):g})" for k, v in short.items())
            msg = (f"sweep error: trial {t.name} needs {what} for its placement group "
                   f"({len(bundles[t.name])} bundles: controller + actor pools); shrink distributed.* pools")
            if local:
                raise SweepError(msg)
            print(f"tpdm-rl sweep: warning: {msg[len('sweep error: '):]}; waiting for the autoscaler",
                  file=sys.stderr)


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


def _first_diff(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} then, {b!r} now"


def run_sweep(output: str | Path, config_path: str | None, set_overrides: list[str], grid: list[str],
              rand: list[str] | None = None, samples: int = 1, log: bool = False, max_concurrent: int = 0,
              resume: bool = False, address: str | None = None, early_stop: str = "none",
              early_stop_metric: str = "reward/total", controller_cpus: float = 1.0,
              budget: float | None = None, echo=print) -> dict:
    """Validate every trial, run the unfinished ones on Ray Tune, write and return the report."""
    out = Path(output).resolve()
    _, trials, plan = plan_sweep(out, config_path, set_overrides, grid, rand or [], samples, log)
    if early_stop not in ("none", "asha", "median"):
        raise SweepError(f"config error: --early-stop {early_stop!r}: expected none, asha or median")
    if early_stop_metric not in ("reward/total", "quality"):
        raise SweepError(f"config error: --early-stop-metric {early_stop_metric!r}: expected reward/total or quality")
    if max_concurrent < 0:
        raise SweepError(f"config error: --max-concurrent must be >= 0, got {max_concurrent}")
    if controller_cpus <= 0:
        raise SweepError(f"config error: --controller-cpus must be > 0, got {controller_cpus}")
    trials_root = out / "trials"
    if not resume and trials_root.is_dir() and any(trials_root.iterdir()):
        raise SweepError(f"sweep error: {out} already holds a sweep; pass --resume to continue it or choose "
                         "another --output")
    pending, skipped = [], []
    for t in trials:
        tdir = trials_root / t.name
        old = _read_json(tdir / TRIAL_FILE)
        if old and old.get("config") is not None:
            diff = _first_diff(old["config"], t.config)
            if diff:
                raise SweepError(f"sweep error: trial {t.name} was started with a different config ({diff}); "
                                 "resume with the same --config/--set or use another --output")
        (skipped if (tdir / DONE_FILE).exists() else pending).append(t)
    bundles = {t.name: trial_bundles(Config.model_validate(t.config), controller_cpus) for t in trials}

    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out / PLAN_FILE, plan)
    for t in skipped:
        done = _read_json(trials_root / t.name / DONE_FILE) or {}
        echo(f"skipping finished trial {t.name} ({done.get('status', 'finished')}, DONE marker present)")
    for t in pending:
        tdir = trials_root / t.name
        tdir.mkdir(parents=True, exist_ok=True)
        info = _read_json(tdir / TRIAL_FILE) or {"wall_s": 0.0, "status": "pending"}
        info |= {"name": t.name, "overrides": t.overrides, "config": t.config}
        _write_json_atomic(tdir / TRIAL_FILE, info)

    if pending:
        _run_tune(out, pending, plan, bundles, max_concurrent, address, early_stop, early_stop_metric, echo)
    report = collect_report(out)
    write_report(out, report, budget)
    return report


def _run_tune(out: Path, pending: list[TrialSpec], plan: dict, bundles: dict, max_concurrent: int,
              address: str | None, early_stop: str, metric: str, echo) -> None:
    import ray
    from ray import tune

    # trials keep the job's working directory, so relative paths in the config work as in `train`
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    import logging

    logging.getLogger("ray.tune").setLevel(logging.WARNING)  # our echo lines replace Tune's status output
    from .ray_trainer import init_ray

    started = init_ray(address or "")
    try:
        _check_fits(pending, bundles, local=started)
        specs = [{"name": t.name, "dir": str(out / "trials" / t.name), "config": t.config,
                  "overrides": t.overrides, "bundles": bundles[t.name],
                  "quality_weights": plan["quality_weights"]} for t in pending]
        trainable = tune.with_resources(
            _trainable, resources=lambda c: tune.PlacementGroupFactory(c["trial"]["bundles"]))
        max_t = max(int(t.config["train"]["iterations"]) for t in pending)
        grace = max(1, max_t // 4)
        scheduler = None
        if early_stop == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="train_iteration", metric=metric, mode="max", max_t=max_t,
                                      grace_period=min(grace, max_t), reduction_factor=2)
        elif early_stop == "median":
            from ray.tune.schedulers import MedianStoppingRule

            scheduler = MedianStoppingRule(time_attr="train_iteration", metric=metric, mode="max",
                                           grace_period=grace, min_samples_required=3)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(specs)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent or None, scheduler=scheduler, reuse_actors=False,
                trial_name_creator=lambda tr: tr.config["trial"]["name"],
                trial_dirname_creator=lambda tr: tr.config["trial"]["name"]),
            run_config=tune.RunConfig(
                storage_path=str(out / "tune"), name=time.strftime("sweep-%Y%m%d-%H%M%S"), verbose=0,
                failure_config=tune.FailureConfig(max_failures=0), callbacks=[_echo_callback(out, echo)]),
        )
        echo(f"running {len(pending)} trial(s) on Ray Tune (max concurrent: {max_concurrent or 'as resources allow'}, "
             f"early stop: {early_stop})")
        results = tuner.fit()
        for r in results:
            name = r.config["trial"]["name"] if r.config else None
            if name is None:
                continue
            tdir = out / "trials" / name
            if r.error is None and not (tdir / DONE_FILE).exists():
                # ended without error and without DONE: the scheduler stopped it early
                records = _read_metrics(tdir / "metrics.jsonl")
                info = _read_json(tdir / TRIAL_FILE) or {}
                _write_json_atomic(tdir / TRIAL_FILE, info | {"status": "early_stopped"})
                _write_json_atomic(tdir / DONE_FILE, {
                    "status": "early_stopped", "iterations": len(records), "final": final_metrics(records),
                    "wall_s": info.get("wall_s"), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
            elif r.error is not None:
                info = _read_json(tdir / TRIAL_FILE) or {}
                _write_json_atomic(tdir / TRIAL_FILE, info | {"status": "error", "error": _one_line(r.error)})
    finally:
        if started:
            ray.shutdown()


def _one_line(err: BaseException | str) -> str:
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln):
            return ln[:300]
    return (lines[-1] if lines else type(err).__name__)[:300]


def _echo_callback(out: Path, echo):
    from ray.tune import Callback

    class EchoCallback(Callback):
        """Prints one line when a trial starts, ends or fails (Tune's own tables are off)."""

        def __init__(self, out: Path, echo) -> None:
            self.out, self.echo = out, echo

        def on_trial_start(self, iteration, trials, trial, **info):
            self.echo(f"trial {trial.config['trial']['name']}: started")

        def on_trial_complete(self, iteration, trials, trial, **info):
            name = trial.config["trial"]["name"]
            done = _read_json(self.out / "trials" / name / DONE_FILE)
            if done:
                f = done.get("final", {})
                self.echo(f"trial {name}: {done['status']} after {done['iterations']} iterations "
                          f"(steps/mean {_fmt(f.get('steps/mean'))}, reward/total {_fmt(f.get('reward/total'))})")
            else:
                self.echo(f"trial {name}: stopped early by the scheduler")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.echo(f"trial {trial.config['trial']['name']}: failed")

    return EchoCallback(out, echo)


# ---------------------------------------------------------------------------------------------- report
def _fmt(v, digits: int = 3) -> str:
    x = _num(v)
    return "-" if x is None else f"{x:.{digits}f}"


def collect_report(output: str | Path) -> dict:
    """Rebuild the report from ``DIR/sweep_plan.json`` and the trial folders."""
    out = Path(output).resolve()
    plan = _read_json(out / PLAN_FILE)
    trials_root = out / "trials"
    if plan is None:
        if not trials_root.is_dir():
            raise FileNotFoundError(f"{out} holds no sweep ({PLAN_FILE} and trials/ missing)")
        infos = [_read_json(d / TRIAL_FILE) for d in sorted(trials_root.iterdir()) if d.is_dir()]
        infos = [i for i in infos if i]
        plan = {"trials": [{"name": i["name"], "overrides": i.get("overrides", {})} for i in infos],
                "keys": list(dict.fromkeys(k for i in infos for k in i.get("overrides", {}))),
                "quality_weights": {}, "config": None, "set": []}
    weights: dict[str, float] = dict(plan.get("quality_weights") or {})
    rows, components = [], []
    for t in plan["trials"]:
        tdir = trials_root / t["name"]
        done = _read_json(tdir / DONE_FILE)
        info = _read_json(tdir / TRIAL_FILE) or {}
        records = _read_metrics(tdir / "metrics.jsonl")
        if done:
            status, final, iters = done.get("status", "finished"), done.get("final") or {}, done.get("iterations")
        else:
            status = "error" if info.get("status") == "error" else ("incomplete" if records else "pending")
            final, iters = final_metrics(records), len(records)
        total_iters = ((info.get("config") or {}).get("train") or {}).get("iterations")
        comps = [k[len("reward/"):] for k in final if k.startswith("reward/")
                 and k not in ("reward/total", "reward/step_penalty")]
        for c in comps:
            if c not in components:
                components.append(c)
        row = {"name": t["name"], "overrides": t["overrides"], "status": status, "iterations": iters,
               "planned_iterations": total_iters, "steps/mean": _num(final.get("steps/mean"))}
        for c in comps:
            row[f"reward/{c}"] = _num(final.get(f"reward/{c}"))
        row["reward/total"] = _num(final.get("reward/total"))
        row["wall_s"] = _num((done or {}).get("wall_s", info.get("wall_s")))
        if info.get("error"):
            row["error"] = info["error"]
        rows.append(row)
    for c in components:
        weights.setdefault(c, 1.0)
    for row in rows:
        vals = [row.get(f"reward/{c}") for c in components]
        row["quality"] = (sum(weights[c] * v for c, v in zip(components, vals))
                          if vals and all(v is not None for v in vals) else None)
    panels = components + (["quality"] if len(components) > 1 else [])
    for row in rows:
        row["pareto"] = {}
    for p in panels:
        key = p if p == "quality" else f"reward/{p}"
        front = pareto_front([(r["steps/mean"], r.get(key)) for r in rows])
        for r, on in zip(rows, front):
            r["pareto"][p] = on
    return {
        "output": str(out), "config": plan.get("config"), "set": plan.get("set", []), "keys": plan.get("keys", []),
        "components": components, "quality_weights": weights,
        "quality_definition": "sum over reward components of (base-config weight x mean raw component reward, "
                              "last min(3, n) iterations); step penalty excluded",
        "final_window": FINAL_WINDOW, "trials": rows,
    }


def pareto_front(points: list[tuple[float | None, float | None]]) -> list[bool]:
    """True for points (steps, quality) that no other point beats: fewer-or-equal steps AND higher-or-equal
    quality, strictly better in one. Points with a missing coordinate are never on the front."""
    ok = [s is not None and q is not None for s, q in points]
    out = []
    for i, (s, q) in enumerate(points):
        if not ok[i]:
            out.append(False)
            continue
        dominated = any(ok[j] and j != i and points[j][0] <= s and points[j][1] >= q
                        and (points[j][0] < s or points[j][1] > q) for j in range(len(points)))
        out.append(not dominated)
    return out


def best_under_budget(report: dict, steps: float) -> dict | None:
    """The finished (or early-stopped) trial with the highest quality whose mean steps are <= ``steps``
    (ties: fewer steps). None when no trial fits."""
    fits = [r for r in report["trials"] if r["status"] in FINISHED_STATES and r.get("quality") is not None
            and r.get("steps/mean") is not None and r["steps/mean"] <= steps]
    if not fits:
        return None
    return max(fits, key=lambda r: (r["quality"], -r["steps/mean"]))


def budget_line(report: dict, steps: float) -> str:
    best = best_under_budget(report, steps)
    if best is None:
        done = [r["steps/mean"] for r in report["trials"] if r["status"] in FINISHED_STATES
                and r.get("steps/mean") is not None]
        fewest = f" (fewest mean steps of a finished trial: {min(done):.2f})" if done else ""
        return f"budget {steps:g} steps: no finished trial fits{fewest}"
    ov = ", ".join(f"{k}={v}" for k, v in best["overrides"].items())
    return (f"budget {steps:g} steps: best trial {best['name']} ({ov}): quality {best['quality']:.4f}, "
            f"steps/mean {best['steps/mean']:.2f}, reward/total {_fmt(best.get('reward/total'), 4)}")


def _label(overrides: dict[str, str], keys: list[str]) -> str:
    short = short_keys(list(keys) or list(overrides))
    return ", ".join(f"{short.get(k, k)}={v}" for k, v in overrides.items())


def report_table(report: dict) -> str:
    keys = report["keys"] or list(dict.fromkeys(k for r in report["trials"] for k in r["overrides"]))
    short = short_keys(keys)
    comps = report["components"]
    head = ["trial"] + [short[k] for k in keys] + ["status", "iters", "steps/mean"] + [f"reward/{c}" for c in comps] \
        + ["reward/total", "quality", "wall s", "Pareto"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["trials"]:
        pareto = ", ".join(p for p, on in r["pareto"].items() if on) or ""
        iters = "-" if r["iterations"] is None else str(r["iterations"])
        if r.get("planned_iterations"):
            iters += f"/{r['planned_iterations']}"
        cells = [f"`{r['name']}`"] + [str(r["overrides"].get(k, "")) for k in keys] + [
            r["status"], iters, _fmt(r["steps/mean"], 2)] + [_fmt(r.get(f"reward/{c}"), 3) for c in comps] + [
            _fmt(r.get("reward/total"), 3), _fmt(r.get("quality"), 3), _fmt(r.get("wall_s"), 1), pareto]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(report: dict, budget: float | None = None) -> str:
    w = ", ".join(f"{c} x {report['quality_weights'][c]:g}" for c in report["components"])
    parts = [
        "# Sweep report", "",
        f"Base config: `{report.get('config') or '(built-in defaults)'}`"
        + (f" with `--set {' '.join(report['set'])}`" if report.get("set") else ""), "",
        f"Swept: {', '.join(f'`{k}`' for k in report['keys'])}. One row per trial; metrics are the mean of the "
        f"last min({report['final_window']}, n) iterations of its `metrics.jsonl`.", "",
        report_table(report), "",
        f"**quality** = {w or '-'} (the base config's weights for every trial; step penalty excluded), so "
        "trials that optimise different weights or step penalties are compared on one scale. **Pareto**: the "
        "panels (reward component, or quality) in which no other trial has fewer-or-equal mean steps and a "
        "higher-or-equal value. Plot: `sweep_pareto.png`.",
    ]
    if budget is not None:
        parts += ["", f"**Budget**: {budget_line(report, budget)}"]
    errors = [r for r in report["trials"] if r.get("error")]
    if errors:
        parts += ["", "Errors:"] + [f"- `{r['name']}`: {r['error']}" for r in errors]
    return "\n".join(parts) + "\n"


def plot_pareto(report: dict, path: str | Path, budget: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = report["components"]
    panels = comps + (["quality"] if len(comps) > 1 else [])
    panels = panels or ["quality"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), squeeze=False)
    keys = report["keys"]
    for ax, p in zip(axes[0], panels):
        key = p if p == "quality" else f"reward/{p}"
        pts = [(r["steps/mean"], r.get(key), r) for r in report["trials"]
               if r.get("steps/mean") is not None and r.get(key) is not None]
        on = [(s, q, r) for s, q, r in pts if r["pareto"].get(p)]
        off = [(s, q, r) for s, q, r in pts if not r["pareto"].get(p)]
        if off:
            ax.scatter([s for s, _, _ in off], [q for _, q, _ in off], s=36, color="tab:blue", alpha=0.75,
                       label="trial")
        if on:
            on.sort(key=lambda t: t[0])
            ax.plot([s for s, _, _ in on], [q for _, q, _ in on], "--", color="tab:red", lw=1, alpha=0.6)
            ax.scatter([s for s, _, _ in on], [q for _, q, _ in on], s=110, marker="*", color="tab:red",
                       edgecolor="black", linewidth=0.5, zorder=3, label="Pareto-optimal")
            # labels step down with quality, so the leader lines of neighbouring points do not cross
            for i, (s, q, r) in enumerate(sorted(on, key=lambda t: -t[1])):
                # alternate the label side and draw a leader line, so neighbouring points keep their labels
                ax.annotate(_label(r["overrides"], keys), (s, q), textcoords="offset points",
                            xytext=(14, (18, -2, -22)[i % 3]), fontsize=7.5,
                            arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.4"})
        if budget is not None:
            ax.axvline(budget, color="gray", ls=":", lw=1, label=f"budget {budget:g} steps")
        ax.set_xlabel(f"mean denoising steps (last {report['final_window']} iters)")
        ylabel = (f"quality = sum base weight x reward (last {report['final_window']} iters)" if p == "quality"
                  else f"reward/{p} (mean, last {report['final_window']} iters)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{p} vs steps ({len(pts)} trials)")
        ax.grid(alpha=0.3)
        if pts:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center", transform=ax.transAxes)
        ax.margins(x=0.15, y=0.15)
    fig.suptitle("Sweep: quality vs mean steps (fewer steps AND higher quality = Pareto-optimal)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(output: str | Path, report: dict, budget: float | None = None) -> None:
    out = Path(output)
    data = dict(report)
    if budget is not None:
        best = best_under_budget(report, budget)
        data["budget"] = {"steps": budget, "best": best["name"] if best else None}
    _write_json_atomic(out / "sweep.json", data)
    (out / "sweep.md").write_text(render_markdown(report, budget))
    plot_pareto(report, out / "sweep_pareto.png", budget)
