"""A run folder belongs to one run: a lock while it runs, no silent reuse, a history of what happened.

- ``acquire`` takes an exclusive ``flock`` on ``<run>/.tpdm-rl.lock`` (the kernel drops it when the
  process dies, even on SIGKILL, so a crashed run never leaves a stale lock) and writes the owner's
  pid and host into it, for the message a second run gets.
- A folder that already holds a run is refused unless the caller resumes it or asks to overwrite it;
  ``--overwrite`` moves the old run aside (to ``<run>.replaced-<time>``) and says so.
- ``history.jsonl`` records every start and resume, with any config change that was allowed.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".tpdm-rl.lock"
HISTORY_FILE = "history.jsonl"
#: what a previous run leaves in its folder (the tiny backbone cache alone is not a run)
RUN_ENTRIES = ("metrics.jsonl", "checkpoints", "config.yaml", "summary.txt", "tb", HISTORY_FILE)


class RunFolderError(RuntimeError):
    """The run folder cannot be used (one-line message naming it and what to do)."""


def holds_a_run(folder: Path) -> list[str]:
    """The entries of ``folder`` that show a previous run."""
    return [e for e in RUN_ENTRIES if (folder / e).exists()]


def completed_nothing(folder: Path) -> bool:
    """True when the run in ``folder`` failed before its first iteration: no metrics record, no checkpoint.

    Such a folder holds nothing to lose (its config and history only), so a retry may reuse it."""
    metrics = folder / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        return False
    ckpts = folder / "checkpoints"
    return not (ckpts.is_dir() and any(d.name.startswith("step_") for d in ckpts.iterdir()))


def lock_folder(p: Path, what: str, advice: str):
    """Create ``p`` and take the exclusive kernel lock on ``p/.tpdm-rl.lock``; return the open lock file.

    A folder another live process holds is refused with one line naming ``what``, that process (pid, host, start)
    and ``advice``. The kernel drops the lock when its holder dies, so it is never stale. The owner's pid, host
    and start time are written into the file for that message."""
    try:
        p.mkdir(parents=True, exist_ok=True)
        fh = open(p / LOCK_FILE, "a+")  # noqa: SIM115 - held open for the owner's lifetime
    except OSError as exc:
        raise RunFolderError(f"cannot create {what} {str(p)!r}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        owner = fh.read().strip() or "{}"
        fh.close()
        try:
            o = json.loads(owner)
        except json.JSONDecodeError:
            o = {}
        o = o if isinstance(o, dict) else {}
        raise RunFolderError(f"{what} {str(p)!r} is in use by pid {o.get('pid', '?')} on host {o.get('host', '?')} "
                             f"(since {o.get('since', '?')}); {advice}") from None
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
    fh.flush()
    return fh


def unlock_folder(fh) -> None:
    """Drop a lock taken by :func:`lock_folder`."""
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        fh.close()


class RunFolder:
    """Ownership of one run folder for the lifetime of a run."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fh = None
        self.moved_to: Path | None = None
        self.retried = False

    def acquire(self, resume: bool, overwrite: bool) -> RunFolder:
        p = self.path
        if p.exists() and not p.is_dir():
            raise RunFolderError(f"--output {str(p)!r} is a file; expected a run folder")
        fh = lock_folder(p, "run folder", "wait for that run to end or choose another --output")
        self._fh = fh
        prior = holds_a_run(p)
        if prior and not resume and not overwrite and completed_nothing(p):
            self.retried = True  # the earlier start failed before its first iteration: nothing to keep
            prior = []
        if prior and not resume:
            if not overwrite:
                self.release()
                raise RunFolderError(f"run folder {str(p)!r} already holds a run ({', '.join(prior)}); pass "
                                     "--resume auto to continue it, --overwrite to move it aside, or choose "
                                     "another --output")
            self.moved_to = p.with_name(f"{p.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            self.moved_to.mkdir()
            for entry in prior:
                os.replace(p / entry, self.moved_to / entry)
        return self

    def record(self, event: str, **fields) -> None:
        """Append one line to ``history.jsonl``."""
        rec = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "event": event, "pid": os.getpid(), **fields}
        with open(self.path / HISTORY_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def release(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            unlock_folder(fh)
