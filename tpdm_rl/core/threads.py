"""The thread policy of every tpdm-rl process, in one place (docs/threads.md explains the figures).

Why: torch's OpenMP pool spin-waits for its workers by default, so a process that uses every CPU
collapses (10x and more) as soon as any other process wants a core. Two rules fix that:

1. ``prepare_environment()`` sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it. OpenMP reads it
   once, when torch loads, so every entry point calls this before ``import torch`` (this module
   imports nothing heavy for that reason).
2. ``apply_threads(requested, role)`` sets torch's intra-op threads: an explicit number is used as
   given; 0 / None means the role's default: ``auto`` for the one process that does the work
   (train, eval, sample, the toy backbone trainer), 1 for processes that share the machine with
   siblings (Ray actors, sweep trials, export). ``auto`` = the CPUs this process may use that are
   idle right now (sampled for ``PROBE_S`` seconds), at least 1.
"""

from __future__ import annotations

import os
import time

#: how long ``auto`` samples the machine's idle time before choosing a thread count
PROBE_S = 0.25
#: roles and the thread count that 0 / None means for them ("auto": the idle CPUs at start)
ROLE_DEFAULTS: dict[str, int | str] = {"train": "auto", "eval": "auto", "sample": "auto", "toy-trainer": "auto",
                                      "export": 1, "actor": 1, "sweep-trial": 1, "benchmark": "auto"}


def prepare_environment() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless set (effective only if torch is not imported yet)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where it does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user..steal


def idle_cpus(probe_s: float = PROBE_S) -> float:
    """How many of the machine's CPUs other processes left idle over ``probe_s`` seconds."""
    a = _cpu_times()
    time.sleep(probe_s)
    b = _cpu_times()
    ncpu = os.cpu_count() or 1
    if a is None or b is None or b[1] <= a[1]:
        return float(ncpu)
    return ncpu * (b[0] - a[0]) / (b[1] - a[1])


def auto_threads(probe_s: float = PROBE_S) -> int:
    """The CPUs this process may use that are idle now, at least 1 (a busy neighbour costs one thread)."""
    return max(1, min(available_cpus(), int(idle_cpus(probe_s) + 0.5)))


def resolve_threads(requested: int | None, role: str = "train") -> int:
    """The thread count for ``role``: ``requested`` when > 0, else the role's default."""
    if requested is not None and int(requested) < 0:
        raise ValueError(f"threads must be >= 0 (0: the default of role {role!r}), got {requested}")
    if requested:
        return int(requested)
    default = ROLE_DEFAULTS.get(role, 1)
    return auto_threads() if default == "auto" else int(default)


def apply_threads(requested: int | None, role: str = "train") -> int:
    """Set torch's intra-op threads for ``role`` (see the module docstring); returns the number in use."""
    prepare_environment()  # in time only when torch is not loaded yet (entry points call it first)
    import torch

    torch.set_num_threads(resolve_threads(requested, role))
    return torch.get_num_threads()
