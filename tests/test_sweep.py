"""``tpdm-rl sweep``: planning and validation, the report, and a real 2 x 2 sweep on Ray Tune that is
killed after its first finished trial and resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli_in_process, small_overrides
from own_ray import end_group, own_ray_env, run_own_ray, short_temp_dir

from tpdm_rl.core.config_io import load_config
from tpdm_rl.sweep.plan import SweepError, expand_trials, parse_grid, parse_random, plan_sweep
from tpdm_rl.sweep.report import best_under_budget, pareto_front
from tpdm_rl.sweep.tune import PROGRESS_EVERY_S, TrialProgress
from tpdm_rl.training.resources import trial_bundles

SWEEP_ITERS = 8
FID_WEIGHTS = ("1.0",)  # one weight: the grid still has two axes, and 2 trials keep the suite short
PENALTIES = ("0.0", "3.0")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tpdm_rl.cli", *args]


# ------------------------------------------------------------------------------------------ fast, no Ray
def test_grid_and_random_expand_to_named_trials():
    grid = [parse_grid("rewards.fidelity.weight=0.5,1.0"), parse_grid("step_penalty.coef=0,2")]
    trials = expand_trials(grid, [])
    assert [t.overrides for t in trials] == [
        {"rewards.fidelity.weight": "0.5", "step_penalty.coef": "0"},
        {"rewards.fidelity.weight": "0.5", "step_penalty.coef": "2"},
        {"rewards.fidelity.weight": "1.0", "step_penalty.coef": "0"},
        {"rewards.fidelity.weight": "1.0", "step_penalty.coef": "2"},
    ]
    assert trials[0].name == "rewards.fidelity.weight=0.5__step_penalty.coef=0"
    rand = [parse_random("optim.lr=0.0001:0.01"), parse_random("rollout.group_size=2:8")]
    a = expand_trials(grid[:1], rand, samples=3, seed=5, log=True)
    b = expand_trials(grid[:1], rand, samples=3, seed=5, log=True)
    assert [t.overrides for t in a] == [t.overrides for t in b] and len(a) == 6  # seeded, 2 points x 3 draws
    for t in a:
        assert 1e-4 <= float(t.overrides["optim.lr"]) <= 1e-2
        assert t.overrides["rollout.group_size"] in {str(i) for i in range(2, 9)}
    assert len({t.name for t in a}) == 6


@pytest.mark.parametrize(("args", "needle"), [
    (["--grid", "rewards.fidelity.wieght=0.5,1.0"], "rewards.fidelity.wieght"),
    (["--grid", "step_penalty.coef=1,lots"], "lots"),
    (["--grid", "step_penalty.coef=-1,1"], "step_penalty.coef"),
    (["--grid", "step_penalty.coef"], "step_penalty.coef"),
    (["--grid", "step_penalty.coef=1,,2"], "step_penalty.coef"),
    (["--random", "optim.lr=0.01:0.001"], "optim.lr"),
])
def test_bad_grid_is_one_line_exit_2_before_any_trial(tmp_path, args, needle):
    out = tmp_path / "sweep"
    r = run_cli_in_process("sweep", "--config", "configs/tiny.yaml", *args, "--output", str(out))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()  # nothing written, no trial started


def test_trial_configs_are_validated_with_their_overrides():
    with pytest.raises(SweepError, match=r"from --grid rollout.group_size=4,1"):
        plan_sweep("unused", "configs/tiny.yaml", [], ["rollout.group_size=4,1"], [])
    base, trials, plan = plan_sweep("unused", "configs/tiny.yaml", ["train.iterations=3"],
                                    ["step_penalty.coef=0.5,2"], [])
    assert [t.config["step_penalty"]["coef"] for t in trials] == [0.5, 2.0]
    assert all(t.config["train"]["iterations"] == 3 for t in trials)
    assert plan["quality_weights"] == {"fidelity": 1.0}


def test_placement_bundles_follow_the_actor_pools():
    cfg = load_config("configs/tiny.yaml", ["distributed.enabled=true"])
    bundles = trial_bundles(cfg, controller_cpus=0.5)
    # controller + 2 rollout workers + 1 fidelity reward worker + 2 learner ranks
    assert bundles == [{"CPU": 0.5}] + [{"CPU": 0.5}] * 2 + [{"CPU": 0.25}] + [{"CPU": 0.25}] * 2
    sd3 = load_config("configs/sd3_medium.yaml")
    total_gpu = sum(b.get("GPU", 0.0) for b in trial_bundles(sd3))
    assert total_gpu == 8.0  # one 8-GPU node per trial
    assert trial_bundles(load_config("configs/tiny.yaml")) == [{"CPU": 1.0}]


def test_a_running_trial_says_what_it_waits_for_at_least_every_15_s():
    """Issue 23: no trial is silent for more than 15 s (Tune ticks the progress about once a second)."""
    now = [0.0]
    lines: list[str] = []
    progress = TrialProgress(lines.append, clock=lambda: now[0])
    progress.started("a", 4)
    assert lines == ["trial a: started; waiting for iteration 1/4 (start-up: backbone, workers, learner)"]
    said = [0.0]  # when a line was printed
    for t in range(1, 61):  # one minute of ticks; iterations 1 and 2 finish at 20 s and 21 s
        now[0] = float(t)
        n = len(lines)
        if t in (20, 21):
            progress.result("a", t - 19, {"reward/total": 0.5, "steps/mean": 6.0})
        progress.tick()
        if len(lines) > n:
            said.append(now[0])
    gaps = [b - a for a, b in zip(said, said[1:])]
    assert max(gaps) <= PROGRESS_EVERY_S + 1 <= 15, (gaps, lines)
    assert "trial a: waiting for start-up and iteration 1/4 (10 s so far)" in lines
    assert any(ln.startswith("trial a: waiting for iteration 3/4") and "reward/total 0.500, steps/mean 6.000" in ln
               for ln in lines), lines
    progress.ended("a")
    n = len(lines)
    now[0] += 100
    progress.tick()
    assert len(lines) == n  # an ended trial says nothing more


def test_pareto_front_and_budget():
    pts = [(10.0, 1.0), (8.0, 1.0), (12.0, 2.0), (12.0, 1.5), (None, 5.0)]
    assert pareto_front(pts) == [False, True, True, False, False]
    report = {"trials": [
        {"name": "a", "status": "finished", "steps/mean": 8.0, "quality": 1.0, "overrides": {}},
        {"name": "b", "status": "finished", "steps/mean": 12.0, "quality": 2.0, "overrides": {}},
        {"name": "c", "status": "incomplete", "steps/mean": 9.0, "quality": 9.0, "overrides": {}},
    ]}
    assert best_under_budget(report, 10)["name"] == "a"
    assert best_under_budget(report, 12)["name"] == "b"
    assert best_under_budget(report, 5) is None


# ------------------------------------------------------------------------------------------ real sweep
@pytest.fixture(scope="module")
def killed_and_resumed_sweep(tiny_backbone_dir, tmp_path_factory):
    """A 1 x 2 sweep (fidelity weight x step penalty), one trial at a time on a local Ray instance,
    SIGKILLed as soon as its first trial has finished, then continued with ``--resume``."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    # 16 steps at most, starting near 16: room to move both ways within a few iterations
    sets = small_overrides(tiny_backbone_dir, **{
        "train.iterations": SWEEP_ITERS, "checkpoint.every": 1, "rollout.max_steps": 16,
        "rollout.reference_steps": 16, "policy.init_ratio": 0.75, "optim.lr": 0.003})
    args = ["sweep", "--config", "configs/tiny.yaml", "--output", str(out), "--max-concurrent", "1",
            "--grid", f"rewards.fidelity.weight={','.join(FID_WEIGHTS)}",
            "--grid", f"step_penalty.coef={','.join(PENALTIES)}", "--budget", "100"]
    for s in sets:
        args += ["--set", s]
    temp_dir = short_temp_dir()  # the first sweep's own Ray: a new session, ended by its process group below
    log1 = out.parent / "first.log"
    with open(log1, "w") as fh:
        proc = subprocess.Popen(_cli(*args), stdout=fh, stderr=subprocess.STDOUT, env=own_ray_env(temp_dir),
                                start_new_session=True)
    trials_root = out / "trials"
    first_done, deadline = None, time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        done = sorted(trials_root.glob("*/DONE")) if trials_root.exists() else []
        if done:
            first_done = done[0]
            break
        time.sleep(0.5)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=120)
    end_group(proc.pid)  # what is left of that sweep's own Ray, and nothing else
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert first_done is not None, log1.read_text()[-4000:]
    done_count_at_kill = len(list(trials_root.glob("*/DONE")))
    snapshot = {"name": first_done.parent.name, "done": first_done.read_text(),
                "metrics": (first_done.parent / "metrics.jsonl").read_text()}

    r = run_own_ray(_cli(*args, "--resume"), timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return {"out": out, "snapshot": snapshot, "stdout": r.stdout, "done_at_kill": done_count_at_kill}


@pytest.mark.ray
@pytest.mark.slow
def test_resume_does_not_rerun_a_finished_trial(killed_and_resumed_sweep):
    s = killed_and_resumed_sweep
    name, tdir = s["snapshot"]["name"], s["out"] / "trials" / s["snapshot"]["name"]
    assert s["done_at_kill"] < len(FID_WEIGHTS) * len(PENALTIES)  # the kill interrupted the sweep
    assert f"skipping finished trial {name}" in s["stdout"]
    assert (tdir / "DONE").read_text() == s["snapshot"]["done"]
    assert (tdir / "metrics.jsonl").read_text() == s["snapshot"]["metrics"]
    # every trial ran each iteration exactly once, the interrupted ones resumed from their checkpoints
    for t in (s["out"] / "trials").iterdir():
        its = [json.loads(ln)["iteration"] for ln in (t / "metrics.jsonl").read_text().splitlines()]
        assert its == list(range(SWEEP_ITERS)), (t.name, its)


@pytest.mark.ray
@pytest.mark.slow
def test_larger_step_penalty_gives_fewer_steps_and_a_report(killed_and_resumed_sweep):
    out = killed_and_resumed_sweep["out"]
    for f in ("sweep.json", "sweep.md", "sweep_pareto.png", "sweep_plan.json"):
        assert (out / f).stat().st_size > 0, f
    report = json.loads((out / "sweep.json").read_text())
    rows = {(r["overrides"]["rewards.fidelity.weight"], r["overrides"]["step_penalty.coef"]): r
            for r in report["trials"]}
    assert len(rows) == len(FID_WEIGHTS) * len(PENALTIES) and all(r["status"] == "finished" for r in rows.values())
    for r in rows.values():
        assert r["iterations"] == SWEEP_ITERS and r["wall_s"] > 0
        assert {"steps/mean", "reward/fidelity", "reward/total", "quality"} <= set(r)
    low, high = PENALTIES
    for w in FID_WEIGHTS:
        assert rows[(w, high)]["steps/mean"] < rows[(w, low)]["steps/mean"], (w, rows)
    assert report["budget"]["best"] in {r["name"] for r in report["trials"]}
    md = (out / "sweep.md").read_text()
    assert all(f"`{r['name']}`" in md for r in report["trials"]) and "budget 100 steps: best trial" in md
    assert any(on for r in report["trials"] for on in r["pareto"].values())
    # the report can be rebuilt from the folder alone
    r = subprocess.run(_cli("sweep-report", str(out), "--budget", "100"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "best trial" in r.stdout, r.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_distributed_trial_runs_its_actors_inside_the_trial(tiny_backbone_dir, tmp_path):
    """A trial of a distributed config starts its rollout/reward/learner actors in its placement group."""
    out = tmp_path / "sweep"
    sets = small_overrides(tiny_backbone_dir, **{"distributed.enabled": True, "distributed.rollout.num_workers": 1,
                                                 "distributed.learner.num_ranks": 1})
    args = ["sweep", "--config", "configs/tiny.yaml", "--output", str(out), "--controller-cpus", "0.25",
            "--grid", "step_penalty.coef=2.0"]
    for s in sets:
        args += ["--set", s]
    r = run_own_ray(_cli(*args), timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    recs = [json.loads(ln) for ln in (out / "trials" / "step_penalty.coef=2.0" / "metrics.jsonl").read_text().splitlines()]
    assert [m["policy/version"] for m in recs] == [1, 2] and all(m["learner/ranks"] == 1 for m in recs)
    plan = json.loads((out / "sweep_plan.json").read_text())
    assert plan["trials"][0]["name"] == "step_penalty.coef=2.0"
