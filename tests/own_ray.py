"""Ray instances a test starts for itself and ends by process group, never with ``ray stop``.

``ray stop --force`` ends every Ray process of the machine: a user's head, a job or a sweep running beside the
suite. A test here starts its Ray in a new session (its own process group), with its own temp dir (so it neither
reads nor overwrites ``/tmp/ray/ray_current_cluster``) and its own ports, and ends exactly that group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_ray_env(temp_dir: str, **extra: str) -> dict[str, str]:
    """The environment of a process that starts its own local Ray: no address to join, a temp dir of its own."""
    return dict(os.environ, RAY_ADDRESS="", RAY_TMPDIR=temp_dir, RAY_AUTH_MODE="disabled",
                RAY_USAGE_STATS_ENABLED="0", **extra)


def short_temp_dir() -> str:
    """A temp dir under /tmp with a short path (Ray's unix sockets live inside it: 107 characters at most)."""
    return tempfile.mkdtemp(prefix="rt", dir="/tmp")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_group(pgid: int, grace_s: float = 2.0) -> None:
    """SIGTERM the process group ``pgid``, then SIGKILL what is left after ``grace_s`` (as ``ray stop --force``
    would, for this group only: gcs_server and raylet take their time over SIGTERM); wait until it is gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait_s
        while time.time() < deadline and group_alive(pgid):
            time.sleep(0.1)
        if not group_alive(pgid):
            return


def run_own_ray(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, temp_dir: str | None = None,
                **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` for a command that starts its own local Ray.

    It runs in a new session with a temp dir of its own (removed afterwards unless the caller passes
    ``temp_dir``, then it is the caller's); whatever of its process group outlives it (a Ray process the command
    did not end) is ended afterwards, and nothing else."""
    owned = temp_dir is None
    temp_dir = temp_dir or short_temp_dir()
    full_env = own_ray_env(temp_dir) | (env or {}) | {"RAY_TMPDIR": temp_dir}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        end_group(proc.pid)
        proc.wait()
        if owned:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@contextlib.contextmanager
def own_ray_head(num_cpus: int = 2, dashboard: bool = False) -> Iterator[dict[str, str]]:
    """A Ray head on 127.0.0.1 with its own ports and temp dir, in its own process group, ended by that group.

    Yields ``address`` (GCS host:port), ``dashboard`` (URL, when asked for) and ``temp_dir``."""
    temp_dir = short_temp_dir()
    port, dash = free_port(), free_port()
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    cmd += (["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"] if dashboard
            else ["--include-dashboard=false"])
    # `ray start` returns once the head runs; the head's processes stay in the group it was started in
    log = Path(temp_dir) / "ray_start.log"
    with open(log, "w") as fh:  # a file, not a pipe: the head's processes may keep inherited handles open
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=own_ray_env(temp_dir),
                                start_new_session=True)
    try:
        proc.wait(timeout=180)
        assert proc.returncode == 0, log.read_text()[-3000:]
        info = {"address": f"127.0.0.1:{port}", "temp_dir": temp_dir, "pgid": str(proc.pid)}
        if dashboard:
            info["dashboard"] = f"http://127.0.0.1:{dash}"
        yield info
    finally:
        end_group(proc.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
