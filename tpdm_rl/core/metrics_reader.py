"""A run's ``metrics.jsonl`` read back: its records (a torn last line skipped) and their final window.

Written by ``metrics_logger.py``; the keys: ``metrics.py``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

#: final metrics of a run: the mean of its last min(FINAL_WINDOW, n) iterations
FINAL_WINDOW = 3


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
