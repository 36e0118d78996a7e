"""An evaluation's output folder: the refusals before any work, without torch (``tpdm-rl eval`` asks them before
torch loads, ``evaluation.run.evaluate`` again under its lock). The files it writes: ``defaults.EVAL_OUTPUT_FILES``.
"""

from __future__ import annotations

from pathlib import Path

from tpdm_rl.core.defaults import EVAL_OUTPUT_FILES


class EvalOutputError(RuntimeError):
    """The eval output cannot be used (a file, or an earlier evaluation without overwrite)."""


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a folder holding an earlier evaluation unless ``overwrite`` (before any work)."""
    if out.exists() and not out.is_dir():
        raise EvalOutputError(f"--output {str(out)!r} is a file; expected a folder for results.json/.md and the "
                              "figures")
    earlier = [n for n in EVAL_OUTPUT_FILES if (out / n).exists()] if out.is_dir() else []
    if earlier and not overwrite:
        raise EvalOutputError(f"--output {str(out)!r} holds an earlier evaluation ({', '.join(earlier[:3])}); pass "
                              "--overwrite to replace it, or choose another folder")
