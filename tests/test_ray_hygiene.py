"""The suite ends only the Ray processes it started: a Ray head that runs before a test survives it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from own_ray import end_group, group_alive, own_ray_env, own_ray_head, run_own_ray, short_temp_dir

TESTS = Path(__file__).parent

LOCAL_DRIVER = textwrap.dedent("""
    import ray, sys, time
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0)
    def pid():
        import os
        return os.getpid()

    print(ray.get(pid.remote()), flush=True)
    if len(sys.argv) > 1:
        time.sleep(600)  # to be killed
""")

JOIN_DRIVER = textwrap.dedent("""
    import ray, sys
    ray.init(address=sys.argv[1], log_to_driver=False)

    @ray.remote(num_cpus=0)
    def answer():
        import os
        return 42, os.getpid()

    print(*ray.get(answer.remote()), ray.cluster_resources().get("CPU"))
""")


def test_no_test_runs_ray_stop():
    """`ray stop` ends every Ray instance of the machine, a user's included."""
    pattern = re.compile(r"""["']ray stop|ray["']\)?,\s*["']stop["']|["']stop["'],\s*["']--force""")
    offenders = [p.name for p in TESTS.glob("*.py") if p.name != Path(__file__).name and pattern.search(p.read_text())]
    assert offenders == []


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_head_started_before_the_tests_survives_them():
    """A bystander head (a user's, a sweep beside the suite) lives through what the Ray tests do to their own Ray:
    a head of a test's own started and ended, a driver that starts a local instance and exits, and one that is
    SIGKILLed and whose process group is then ended."""
    with own_ray_head(num_cpus=1) as bystander:
        # 1. a test's own head, ended by its process group
        with own_ray_head(num_cpus=1) as mine:
            assert mine["address"] != bystander["address"]
            worker_pid = int(_join(mine["address"])[1])
        _assert_ends(worker_pid)
        # 2. a driver that starts its own local instance and exits
        r = run_own_ray([sys.executable, "-c", LOCAL_DRIVER], timeout=300)
        assert r.returncode == 0 and r.stdout.strip().isdigit(), r.stderr[-3000:]
        # 3. a driver killed in the middle of its run, then its group ended (the killed-sweep test does this)
        temp_dir = short_temp_dir()
        proc = subprocess.Popen([sys.executable, "-c", LOCAL_DRIVER, "hang"], stdout=subprocess.PIPE, text=True,
                                env=own_ray_env(temp_dir), start_new_session=True)
        worker_pid = int(proc.stdout.readline())
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        end_group(proc.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        _assert_ends(worker_pid)

        assert group_alive(int(bystander["pgid"]))
        answer, _, cpus = _join(bystander["address"])
        assert (answer, cpus) == ("42", "1.0")  # the bystander itself (1 CPU) still runs tasks


def _join(address: str) -> list[str]:
    """Run a task on the Ray instance at ``address``: [42, the worker's pid, the instance's CPUs]."""
    env = dict(os.environ, RAY_ADDRESS="", RAY_AUTH_MODE="disabled")
    r = subprocess.run([sys.executable, "-c", JOIN_DRIVER, address], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split()


def _assert_ends(pid: int) -> None:
    """A Ray worker (its own process group) ends once the raylet of its instance is gone."""
    deadline = time.time() + 60
    while time.time() < deadline and _alive(pid):
        time.sleep(0.2)
    assert not _alive(pid), f"Ray worker {pid} outlived its instance"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and re.search(r"State:\s+Z", status.read_text()))
