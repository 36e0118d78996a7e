"""Running a sweep: trials as Ray Tune trainables, each in a placement group of its roles' bundles."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tpdm_rl.builders.tiny_backbone import run_backbone_path
from tpdm_rl.core.config import Config
from tpdm_rl.core.files import read_json, write_json_atomic
from tpdm_rl.core.metrics_reader import final_window, finite, read_metrics
from tpdm_rl.executors.ray_pool import init_ray
from tpdm_rl.sweep.plan import DONE_FILE, PLAN_FILE, TRIAL_FILE, SweepError, TrialSpec, first_diff, plan_sweep
from tpdm_rl.sweep.report import collect_report, fmt, write_report
from tpdm_rl.training.controller import Controller
from tpdm_rl.training.resources import describe, shortfall, total, trial_bundles

#: a running trial says what it waits for at least this often (issue 23: no silence a user takes for a hang;
#: Tune calls ``on_step_end`` about once a second, so the longest gap is about this plus one second)
PROGRESS_EVERY_S = 10.0


# ---------------------------------------------------------------------------------------------- trainable
def _trainable(config: dict) -> None:
    """Tune function trainable: one training run into its trial folder, reporting every iteration."""
    from ray import tune

    spec = config["trial"]
    trial_dir = Path(spec["dir"])
    cfg = Config.model_validate(spec["config"])
    # progress bars of concurrent trials would only interleave in Ray's worker logs
    cfg = cfg.model_copy(update={"logging": cfg.logging.model_copy(update={"progress": False})})
    info = read_json(trial_dir / TRIAL_FILE) or {}
    prior_wall = float(info.get("wall_s") or 0.0)
    t0 = time.monotonic()
    weights = spec["quality_weights"]

    def save_info(status: str) -> float:
        wall = prior_wall + time.monotonic() - t0
        write_json_atomic(trial_dir / TRIAL_FILE, info | {"wall_s": wall, "status": status})
        return wall

    # a distributed trial joins this trial's Ray instance and placement group
    trainer = Controller(cfg, output=trial_dir, resume="auto", thread_role="sweep-trial",  # 0 threads -> 1
                         backbone_path=lambda: run_backbone_path(cfg, trial_dir))
    save_info("running")
    reported = []

    def report(m: dict) -> None:
        out = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        q = [(finite(m.get(f"reward/{c}")), w) for c, w in weights.items()]
        out["quality"] = sum(x * w for x, w in q) if all(x is not None for x, _ in q) else float("nan")
        out["train_iteration"] = int(m["iteration"]) + 1
        reported.append(out["train_iteration"])
        tune.report(out)

    def on_iteration(_iteration: int, m: dict) -> None:  # after the metrics line is written
        save_info("running")
        report(m)

    trainer.train(on_iteration=on_iteration)
    records = read_metrics(trial_dir / "metrics.jsonl")
    if not reported and records:  # already complete (killed between its last checkpoint and DONE)
        report(records[-1])
    wall = save_info("finished")
    write_json_atomic(trial_dir / DONE_FILE, {"status": "finished", "iterations": len(records),
                                               "final": final_window(records), "wall_s": wall,
                                               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})


# ---------------------------------------------------------------------------------------------- running
def check_fits(trials: list[TrialSpec], bundles: dict[str, list[dict]], local: bool) -> None:
    import ray

    have = ray.cluster_resources()
    for t in trials:
        short = shortfall(total(bundles[t.name]), have)
        if short:
            msg = (f"sweep error: trial {t.name} needs {describe(short)} for its placement group "
                   f"({len(bundles[t.name])} bundles: controller + actor pools); shrink distributed.* pools")
            if local:
                raise SweepError(msg)
            print(f"tpdm-rl sweep: warning: {msg[len('sweep error: '):]}; waiting for the autoscaler",
                  file=sys.stderr)


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
        old = read_json(tdir / TRIAL_FILE)
        if old and old.get("config") is not None:
            diff = first_diff(old["config"], t.config)
            if diff:
                raise SweepError(f"sweep error: trial {t.name} was started with a different config ({diff}); "
                                 "resume with the same --config/--set or use another --output")
        (skipped if (tdir / DONE_FILE).exists() else pending).append(t)
    bundles = {t.name: trial_bundles(Config.model_validate(t.config), controller_cpus) for t in trials}

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / PLAN_FILE, plan)
    for t in skipped:
        done = read_json(trials_root / t.name / DONE_FILE) or {}
        echo(f"skipping finished trial {t.name} ({done.get('status', 'finished')}, DONE marker present)")
    for t in pending:
        tdir = trials_root / t.name
        tdir.mkdir(parents=True, exist_ok=True)
        info = read_json(tdir / TRIAL_FILE) or {"wall_s": 0.0, "status": "pending"}
        info |= {"name": t.name, "overrides": t.overrides, "config": t.config}
        write_json_atomic(tdir / TRIAL_FILE, info)

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

    logging.getLogger("ray.tune").setLevel(logging.WARNING)  # our echo lines replace Tune's status output
    # Tune's new output engine prints a metric box per result and per finished or failed trial whatever
    # `verbose` says; the legacy reporter at verbose=0 prints nothing (our echo lines say the same, shorter)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"

    started = init_ray(address or "")
    try:
        check_fits(pending, bundles, local=started)
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
                records = read_metrics(tdir / "metrics.jsonl")
                info = read_json(tdir / TRIAL_FILE) or {}
                write_json_atomic(tdir / TRIAL_FILE, info | {"status": "early_stopped"})
                write_json_atomic(tdir / DONE_FILE, {
                    "status": "early_stopped", "iterations": len(records), "final": final_window(records),
                    "wall_s": info.get("wall_s"), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
            elif r.error is not None:
                info = read_json(tdir / TRIAL_FILE) or {}
                write_json_atomic(tdir / TRIAL_FILE, info | {"status": "error", "error": _one_line(r.error)})
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


class TrialProgress:
    """One line per running trial at least every ``every`` seconds: which iteration it waits for, and the last
    one's reward and steps. Kept apart from Ray (``_echo_callback`` feeds it) so it is tested on its own."""

    def __init__(self, echo: Callable[[str], None], every: float = PROGRESS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.echo, self.every, self.clock = echo, every, clock
        self.trials: dict[str, dict] = {}  # name -> total, done, last (metrics), since, said

    def started(self, name: str, total: int) -> None:
        now = self.clock()
        self.trials[name] = {"total": int(total), "done": 0, "last": None, "since": now, "said": now}
        self.echo(f"trial {name}: started; waiting for iteration 1/{total} (start-up: backbone, workers, learner)")

    def result(self, name: str, done: int, metrics: dict) -> None:
        """Iteration ``done`` (1-based) finished with ``metrics``; says so when the trial's last line is due."""
        t = self.trials.get(name)
        if t is None:
            return
        t.update(done=int(done), last=metrics, since=self.clock())
        if self.clock() - t["said"] >= self.every:
            self._say(name, t, f"iteration {t['done']}/{t['total']} done")

    def tick(self) -> None:
        """Called often: a trial silent for ``every`` seconds says what it is waiting for."""
        now = self.clock()
        for name, t in self.trials.items():
            if now - t["said"] >= self.every:
                nxt = min(t["done"] + 1, t["total"])
                what = "start-up and " if t["done"] == 0 else ""
                self._say(name, t, f"waiting for {what}iteration {nxt}/{t['total']} ({now - t['since']:.0f} s so far)")

    def ended(self, name: str) -> None:
        self.trials.pop(name, None)

    def _say(self, name: str, t: dict, what: str) -> None:
        m = t["last"] or {}
        tail = ""
        if m:
            tail = f"; last: reward/total {fmt(m.get('reward/total'))}, steps/mean {fmt(m.get('steps/mean'))}"
        self.echo(f"trial {name}: {what}{tail}")
        t["said"] = self.clock()


def _echo_callback(out: Path, echo):
    from ray.tune import Callback

    class EchoCallback(Callback):
        """Prints a line when a trial starts, ends or fails, and its progress in between (Tune's tables are off)."""
        def __init__(self, out: Path, echo) -> None:
            self.out, self.echo = out, echo
            self.progress = TrialProgress(echo)

        def on_trial_start(self, iteration, trials, trial, **info):
            spec = trial.config["trial"]
            self.progress.started(spec["name"], int(spec["config"]["train"]["iterations"]))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.progress.result(trial.config["trial"]["name"], int(result.get("train_iteration", 0)), result)

        def on_step_end(self, iteration, trials, **info):
            self.progress.tick()

        def on_trial_complete(self, iteration, trials, trial, **info):
            name = trial.config["trial"]["name"]
            self.progress.ended(name)
            done = read_json(self.out / "trials" / name / DONE_FILE)
            if done:
                f = done.get("final", {})
                self.echo(f"trial {name}: {done['status']} after {done['iterations']} iterations "
                          f"(steps/mean {fmt(f.get('steps/mean'))}, reward/total {fmt(f.get('reward/total'))})")
            else:
                self.echo(f"trial {name}: stopped early by the scheduler")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.progress.ended(trial.config["trial"]["name"])
            self.echo(f"trial {trial.config['trial']['name']}: failed")

    return EchoCallback(out, echo)
