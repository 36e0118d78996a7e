"""Messages to the user that every layer shares; imports nothing heavy, so the fast CLI paths can use it."""

from __future__ import annotations

import errno
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_WARNED: set[str] = set()


def warn(message: str) -> None:
    """A one-line ``tpdm-rl: warning: ...`` on stderr, once per distinct message per process."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"tpdm-rl: warning: {message}", file=sys.stderr)


def progress(message: str) -> None:
    """A progress line on stderr, flushed at once (for waits a user could take for a hang)."""
    print(f"tpdm-rl: {message}", file=sys.stderr, flush=True)


def disk_full(exc: BaseException) -> OSError | None:
    """The ENOSPC ``OSError`` in ``exc`` or its causes / contexts (torch wraps it in a RuntimeError), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        if "No space left on device" in str(exc) and isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


#: the longest a user waits without a line saying what for
HEARTBEAT_S = 10.0


@contextmanager
def waiting(what: str, every: float = HEARTBEAT_S, stream=None) -> Iterator[None]:
    """Print ``what`` now and ``still waiting for what (N s)`` every ``every`` seconds until the block ends.

    Why: Ray start-up, actor creation and model loading can be silent for a minute and more, which a user
    takes for a hang."""
    out = stream or sys.stderr
    t0 = time.monotonic()
    print(f"tpdm-rl: {what} ...", file=out, flush=True)
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            print(f"tpdm-rl: still {what} ({time.monotonic() - t0:.0f} s)", file=out, flush=True)

    t = threading.Thread(target=beat, name="tpdm-rl-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join(timeout=1.0)
