"""Ray layer: job submission, exact resume after SIGKILL, actor faults. Uses one local Ray head."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import small_overrides
from own_ray import own_ray_head
from safetensors.torch import load_file

from tpdm_rl.core.metrics_reader import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent
ITERS = 3


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head of this module's own on 127.0.0.1 (own ports and temp dir), ended by its process group."""
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a throw-away head on loopback, for this test module only
    with own_ray_head(num_cpus=2, dashboard=True) as head:
        yield head


def _overrides(backbone_dir: str, **extra) -> list[str]:
    base = {"distributed.enabled": True, "train.iterations": ITERS, "distributed.learner.num_ranks": 2,
            "distributed.rollout.num_workers": 2}
    base.update(extra)
    return small_overrides(backbone_dir, **base)


def _train_cmd(out: Path, overrides: list[str], *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "tpdm_rl.cli", "train", "--config", "configs/tiny.yaml", "--output", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd + list(extra)


@pytest.fixture(scope="module")
def straight_run(ray_head, tiny_backbone_dir, tmp_path_factory):
    """The tiny training job submitted with `ray job submit`: ITERS iterations straight."""
    out = tmp_path_factory.mktemp("straight")
    # the driver joins the head over loopback; the job runs in this checkout and environment
    entry = ["env", f"RAY_ADDRESS={ray_head['address']}", *_train_cmd(out, _overrides(tiny_backbone_dir))]
    ray_cli = [str(BIN / "ray"), "job"]
    r = subprocess.run([*ray_cli, "submit", "--no-wait", "--address", ray_head["dashboard"], "--entrypoint-num-cpus",
                        "0", "--", *entry], capture_output=True, text=True, timeout=120, cwd=os.getcwd())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = re.search(r"(raysubmit_\w+)", r.stdout + r.stderr).group(1)
    deadline, status = time.time() + 900, ""
    while time.time() < deadline:
        st = subprocess.run([*ray_cli, "status", "--address", ray_head["dashboard"], job_id], capture_output=True,
                            text=True, timeout=60)
        status = st.stdout + st.stderr
        if any(w in status for w in ("succeeded", "failed", "stopped")):
            break
        time.sleep(2)
    logs = subprocess.run([*ray_cli, "logs", "--address", ray_head["dashboard"], job_id], capture_output=True,
                          text=True, timeout=60).stdout
    assert "succeeded" in status, status[-2000:] + logs[-4000:]
    assert "run finished" in logs
    return out


def test_ray_job_submit_runs_the_tiny_job(straight_run):
    recs = read_metrics(straight_run / "metrics.jsonl")
    assert [r["iteration"] for r in recs] == list(range(ITERS))
    for r in recs:
        for k in ("reward/total", "reward/fidelity", "steps/mean", "loss/policy", "time/sync_s",
                  "time/iteration_s", "throughput/images_per_s", "policy/version", "health/actor_restarts",
                  "health/skipped_updates", "time/rollout_s", "time/learn_s"):
            assert isinstance(r[k], (int, float)), k
        assert r["rollout/trajectories"] == 8 and r["learner/ranks"] == 2
    assert [r["policy/version"] for r in recs] == list(range(1, ITERS + 1))
    assert recs[0]["policy/behaviour_logp_err"] < 1e-4
    assert (straight_run / "checkpoints" / "latest").read_text().strip() == f"step_{ITERS}"


_DIE_WHILE_CHECKPOINTING = """
import os, signal, sys
import tpdm_rl.training.checkpoint as ck
real = ck.save_tpm
def save_then_die(policy, path, extra_meta=None):
    real(policy, path, extra_meta)
    if (extra_meta or {}).get("iteration") == 2:  # half-written checkpoint step_2: tpm only, no state yet
        os.kill(os.getpid(), signal.SIGKILL)
ck.save_tpm = save_then_die
from tpdm_rl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_exact_resume_after_sigkill_while_writing_a_checkpoint(ray_head, straight_run, tiny_backbone_dir, tmp_path):
    """SIGKILL of the driver in the middle of writing checkpoint step_2 (the worst moment): ``latest`` still
    names step_1, the half-written folder is never used, and ``--resume auto`` continues bit for bit as the
    run that was never killed (the same metrics and the same final weights)."""
    out = tmp_path / "killed_in_save"
    env = dict(os.environ, RAY_ADDRESS=ray_head["address"])
    cmd = _train_cmd(out, _overrides(tiny_backbone_dir))
    r = subprocess.run([sys.executable, "-c", _DIE_WHILE_CHECKPOINTING, *cmd[3:]], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_1"
    assert not (ckpts / "step_2").exists() and list(ckpts.glob(".step_2.tmp*"))  # the half-written one
    r = subprocess.run(_train_cmd(out, _overrides(tiny_backbone_dir), "--resume", "auto"), env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr and "step_1" in r.stderr
    a, b = read_metrics(straight_run / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [x["iteration"] for x in b] == list(range(ITERS))
    for k in ("reward/total", "steps/mean", "reward/fidelity", "loss/policy"):
        assert [x[k] for x in a] == [x[k] for x in b], k
    wa = load_file(str(straight_run / "checkpoints" / f"step_{ITERS}" / "tpm.safetensors"))
    wb = load_file(str(out / "checkpoints" / f"step_{ITERS}" / "tpm.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list(ckpts.glob(".step_*.tmp*"))  # leftovers of the killed writer are cleaned up


def test_resume_with_different_worker_counts(ray_head, straight_run, tiny_backbone_dir, tmp_path):
    env = dict(os.environ, RAY_ADDRESS=ray_head["address"])
    ckpt = straight_run / "checkpoints" / f"step_{ITERS - 1}"
    if not ckpt.exists():  # keep_last rotation: use whatever older checkpoint survived
        ckpt = sorted(p for p in (straight_run / "checkpoints").glob("step_*") if p.name != f"step_{ITERS}")[-1]
    start = int(ckpt.name.split("_")[1])
    over = _overrides(tiny_backbone_dir, **{"distributed.rollout.num_workers": 1, "distributed.reward.num_workers": 2})
    r = subprocess.run(_train_cmd(tmp_path / "resized", over, "--resume", str(ckpt)), env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a = {x["iteration"]: x for x in read_metrics(straight_run / "metrics.jsonl")}
    b = read_metrics(tmp_path / "resized" / "metrics.jsonl")
    assert [x["iteration"] for x in b] == list(range(start, ITERS))
    for x in b:  # same trajectories (keyed randomness); only float rounding of other batch layouts differs
        assert x["steps/mean"] == a[x["iteration"]]["steps/mean"]
        assert x["reward/total"] == pytest.approx(a[x["iteration"]]["reward/total"], rel=1e-4)


def test_killed_rollout_worker_is_replaced_and_nothing_is_lost(ray_head, straight_run, tiny_backbone_dir, tmp_path):
    import ray

    from tpdm_rl.core.config_io import load_config
    from tpdm_rl.training.controller import Controller

    cfg = load_config("configs/tiny.yaml", _overrides(tiny_backbone_dir))
    tr = Controller(cfg, output=tmp_path / "faulty", address=ray_head["address"])
    killed, calls = [], []

    def kill_mid_iteration(executor):
        calls.append(1)
        if len(calls) == 2 and not killed:  # iteration 1
            time.sleep(0.3)  # tasks are running
            ray.kill(executor.rollout_pool.actors[0], no_restart=True)
            killed.append(1)

    tr.executor.on_dispatch = kill_mid_iteration
    try:
        tr.train()
    finally:
        ray.shutdown()
    assert killed == [1]
    got = read_metrics(tmp_path / "faulty" / "metrics.jsonl")
    ref = read_metrics(straight_run / "metrics.jsonl")
    assert got[-1]["health/actor_restarts"] >= 1
    assert all(x["rollout/trajectories"] == 8 for x in got)
    # every trajectory exactly once: the same rewards and steps as the run without a fault
    for k in ("steps/mean", "steps/min", "steps/max", "reward/total"):
        assert [x[k] for x in got] == [x[k] for x in ref], k
    state = json.loads((tmp_path / "faulty" / "checkpoints" / f"step_{ITERS}" / "trainer_state.json").read_text())
    assert state["actor_restarts"] >= 1


def test_actor_that_keeps_dying_stops_the_run_with_a_checkpoint(ray_head, tiny_backbone_dir, tmp_path):
    import ray

    from tpdm_rl.core.config_io import load_config
    from tpdm_rl.executors.base import FatalRoleError
    from tpdm_rl.training.controller import Controller

    cfg = load_config("configs/tiny.yaml", _overrides(tiny_backbone_dir, **{
        "distributed.max_actor_restarts": 0, "checkpoint.every": 5, "distributed.rollout.num_workers": 1,
        "distributed.learner.num_ranks": 1}))  # one actor per role: only the rollout worker's death matters here
    tr = Controller(cfg, output=tmp_path / "dying", address=ray_head["address"])
    calls = []

    def kill(executor):
        calls.append(1)
        if len(calls) == 2:  # iteration 1
            ray.kill(executor.rollout_pool.actors[0], no_restart=True)

    tr.executor.on_dispatch = kill
    try:
        with pytest.raises(FatalRoleError, match="rollout worker 0 died 1 times"):
            tr.train()
    finally:
        ray.shutdown()
    # the state after the last completed iteration (1) was checkpointed although checkpoint.every is 5
    assert (tmp_path / "dying" / "checkpoints" / "latest").read_text().strip() == "step_1"
    assert len(read_metrics(tmp_path / "dying" / "metrics.jsonl")) == 1


def test_reward_actor_pools_per_component(ray_head, tiny_backbone_dir, tmp_path):
    import ray
    from tpdm_rl.rewards import RewardError

    from tpdm_rl.builders.reward_fixtures import make_all
    from tpdm_rl.core.config_io import load_config
    from tpdm_rl.training.controller import Controller

    fx = make_all(tmp_path / "fx")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("rewards:\n  hpsv2: {weight: 1.0, num_workers: 2}\n  aesthetic: {weight: 0.1}\n")
    over = _overrides(tiny_backbone_dir, **{"train.iterations": 1, "distributed.learner.num_ranks": 1,
                                            "distributed.rollout.num_workers": 1})
    over += [f"rewards.{n}.{k}={v}" for n in ("hpsv2", "aesthetic") for k, v in fx[n].items()]
    try:
        tr = Controller(load_config(cfg_file, over), output=tmp_path / "run", address=ray_head["address"])
        assert [len(tr.executor.reward_pools[n].actors) for n in ("hpsv2", "aesthetic")] == [2, 1]
        tr.train()
        rec = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
        assert {"reward/hpsv2", "reward/aesthetic", "reward/total", "time/reward_hpsv2_s"} <= set(rec)
        bad = over + [f"rewards.hpsv2.checkpoint={tmp_path / 'missing.pt'}"]
        with pytest.raises(RewardError, match="missing.pt"):
            Controller(load_config(cfg_file, bad), output=tmp_path / "run2", address=ray_head["address"])
    finally:
        ray.shutdown()


def test_ray_and_local_executors_run_the_same_algorithm(ray_head, tiny_backbone_dir, tmp_path):
    """Parity: 1 rollout worker, 1 reward worker, 1 learner rank at ZeRO-0 vs one process (1 thread each)."""
    import ray

    from tpdm_rl.core.config_io import load_config
    from tpdm_rl.training.controller import Controller

    over = _overrides(tiny_backbone_dir, **{"train.iterations": 3, "distributed.rollout.num_workers": 1,
                                            "distributed.reward.num_workers": 1, "distributed.learner.num_ranks": 1,
                                            "distributed.learner.zero_stage": 0, "train.threads": 1})
    try:
        Controller(load_config("configs/tiny.yaml", over), output=tmp_path / "ray", address=ray_head["address"]).train()
    finally:
        ray.shutdown()
    local = over + ["distributed.enabled=false"]
    Controller(load_config("configs/tiny.yaml", local), output=tmp_path / "local").train()
    a, b = read_metrics(tmp_path / "ray" / "metrics.jsonl"), read_metrics(tmp_path / "local" / "metrics.jsonl")
    assert len(a) == len(b) == 3
    assert [set(x) for x in a] == [set(x) for x in b]  # the same metric keys in both modes
    for x, y in zip(a, b):
        for k in ("steps/mean", "steps/min", "steps/max", "rollout/backbone_calls", "learner/rows"):
            assert x[k] == y[k], k
        for k in ("reward/fidelity", "reward/total", "loss/policy", "policy/approx_kl"):
            assert x[k] == pytest.approx(y[k], abs=1e-6), k
    wa = load_file(str(tmp_path / "ray" / "checkpoints" / "step_3" / "tpm.safetensors"))
    wb = load_file(str(tmp_path / "local" / "checkpoints" / "step_3" / "tpm.safetensors"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6
