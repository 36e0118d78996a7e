"""Small helpers every layer shares: devices and dtypes, atomic files, metrics files, phase timing, threads.

One helper per concern, so the single-process path, the Ray path and the applications cannot drift.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .console import _WARNED, warn  # noqa: F401 - re-exported (warn lives where torch is not needed)
from .threads import available_cpus  # noqa: F401 - re-exported

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: final metrics of a run: the mean of its last min(FINAL_WINDOW, n) iterations
FINAL_WINDOW = 3


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` / None -> cuda when available, else cpu; anything else as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        return device
    check_device("device", str(device))
    return torch.device(device)


class DeviceError(ValueError):
    """A configured device does not exist on this machine."""


def _key(key: str) -> str:
    """The message prefix naming where a device came from: a config key, an option, or nothing."""
    if key.startswith("--"):
        return f"{key} "
    return f"config error: {key}: " if "." in key else f"{key} "


def check_device(key: str, device: str) -> None:
    """One-line error when ``device`` names an accelerator this machine lacks (``auto`` always works)."""
    if device in ("auto", "cpu"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"{_key(key)}{device!r} is not a torch device (expected auto, cpu, cuda or "
                          "cuda:N)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise DeviceError(f"{_key(key)}{device!r} requested but this machine has {n} CUDA "
                              "device(s); use auto or cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """A dtype by name (``float32``/``bfloat16``/``float16`` or fp32/bf16/fp16); ``auto`` / None ->
    bf16 on a GPU, fp32 elsewhere. Unknown names raise ValueError naming the choices."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    name = DTYPE_ALIASES.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}")
    return DTYPES[name]


# ---------------------------------------------------------------------------- files
def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file, fsync it, then rename over ``path``: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


@contextmanager
def replace_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; when the block ends it replaces ``final``, on an error it goes.

    Why: a folder others read (a checkpoint, a built backbone) is either the old one or complete, never half
    written, even when the writer is killed (its ``.NAME.tmpPID`` leftover is never read).
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a ``metrics.jsonl`` (missing file: none; a torn last line is skipped)."""
    p = Path(path)
    if not p.exists():
        return []
    recs = []
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            recs.append(rec)
    return recs


def finite(v: Any) -> float | None:
    """``v`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(float(v)) else None


def final_window(records: list[dict], keys: list[str] | None = None, window: int = FINAL_WINDOW
                 ) -> dict[str, float | None]:
    """Mean of the last min(window, n) records per key (non-finite values skipped).

    ``keys`` default: every ``reward/*`` and ``steps/*`` key of the last record."""
    tail = records[-window:]
    if keys is None:
        keys = [k for k in (records[-1] if records else {}) if k.startswith(("reward/", "steps/"))]
    out: dict[str, float | None] = {}
    for k in keys:
        vals = [x for x in (finite(r.get(k)) for r in tail) if x is not None]
        out[k] = sum(vals) / len(vals) if vals else None
    return out


# ---------------------------------------------------------------------------- timing
class PhaseTimer:
    """Wall-clock seconds per named phase, logged as ``time/<phase>_s`` (the same keys in every mode).

    ``with timer("learn"): ...`` adds to the phase; ``timer.metrics()`` returns the totals.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + float(seconds)

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}_s": v for k, v in self.seconds.items()}
