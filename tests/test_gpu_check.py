"""benchmarks/gpu_check.py --dry-run: every step of the GPU check runs on the CPU at tiny size, so it cannot rot
before a GPU is there to run it for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

pytestmark = [pytest.mark.slow]


def dry_run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    """The dry run in ``tmp_path``: the process, its JSON and its Markdown."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--workdir", str(tmp_path / "work"),
                        "--out-dir", str(tmp_path), *extra], cwd=REPO, capture_output=True, text=True, timeout=1200,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = tmp_path / "gpu_check_cpu-dry-run.json"
    assert out.exists(), r.stderr[-3000:]
    return r, json.loads(out.read_text()), out.with_suffix(".md").read_text()


@pytest.mark.ray
def test_dry_run_runs_every_step_and_reports_them(tmp_path):
    r, res, md = dry_run(tmp_path, "--time-limit", "1000", "--batch-sizes", "1,2")  # the GPU run: 1,2,4,8
    assert r.returncode == 0, r.stderr[-4000:]
    assert list(res["steps"]) == ["gpu_tests", "real_size_sd3-medium_b1", "reward_fixtures", "train",
                                  "real_size_sd3-medium_b2"]
    assert all(s["status"] == "ok" for s in res["steps"].values()), res["steps"]
    n_gpu = sum(p.read_text().count("@pytest.mark.gpu") for p in (REPO / "tests").glob("test_*.py"))
    assert res["steps"]["gpu_tests"]["counts"].get("skipped", 0) >= n_gpu >= 1  # no CUDA here: all skipped
    rows = res["rows"]["sd3-medium"]
    assert [x["batch_size"] for x in rows] == [1, 2]
    for x in rows:
        assert x["resolution"] == 64 and x["seconds_per_call"] > 0 and x["peak_memory_bytes"] > 0
        assert sum(x["shares"].values()) == pytest.approx(1.0, abs=0.02)
    its = res["training"]["iterations"]
    assert [i["iteration"] for i in its] == [0, 1, 2]
    for i in its:
        for k in ("iteration_s", "rollout_s", "rewards_s", "learner_s", "sync_s"):
            assert isinstance(i[k], float) and i[k] >= 0, (k, i)
        assert i["trajectories"] == 8  # 2 prompt groups of 4
    mem = res["steps"]["train"]["memory"]["peak_bytes_by_role"]
    assert {"controller", "rollout", "reward", "learner"} <= set(mem) and all(v > 0 for v in mem.values())
    assert not res["stopped_at_time_limit"]
    assert "| sd3-medium | 64 | 2 |" in md and "| 2 |" in md and "Peak memory per role" in md
    assert "running (10 s)" in r.stderr  # the heartbeat: a line at least every 10 s while a step runs


def test_time_limit_stops_it_and_keeps_what_it_has(tmp_path):
    r, res, md = dry_run(tmp_path, "--time-limit", "35")
    assert r.returncode == 1
    assert res["stopped_at_time_limit"] and res["elapsed_s"] < 90
    statuses = [s["status"] for s in res["steps"].values()]
    n_ok = next((i for i, s in enumerate(statuses) if s != "ok"), len(statuses))
    assert n_ok >= 1, res["steps"]  # the pytest step finished before the limit: kept (a fast machine finishes more)
    later = statuses[n_ok:]  # from the first step the limit cut: nothing else ran
    assert later and all(s.startswith(("timed out", "skipped")) for s in later), res["steps"]
    assert "stopped at the time limit" in md
