"""The run summary ``tpdm-rl train`` prints and writes to ``summary.txt``: start vs end of the headline metrics.

Why apart from the controller: the summary reads a finished run's ``metrics.jsonl`` (any run folder, also one
trained elsewhere); it needs nothing of the training loop.
"""

from __future__ import annotations

from pathlib import Path

from tpdm_rl.core.config import Config
from tpdm_rl.core.metrics_reader import FINAL_WINDOW, final_window, read_metrics
from tpdm_rl.core.step_penalty import StepPenalty
from tpdm_rl.training.metrics import metric_unit


def summarize(metrics_path: Path, cfg: Config | None = None) -> str:
    """Start vs end (mean of the last FINAL_WINDOW iterations) of the headline metrics, with units, and how
    ``reward/total`` is made of its parts."""
    recs = read_metrics(metrics_path)
    if not recs:
        return "no iterations recorded"
    first = recs[0]
    keys = ["reward/total"] + sorted(k for k in first if k.startswith("reward/") and k != "reward/total") + [
        "steps/mean", "health/skipped_updates"]
    end = final_window(recs, keys)
    lines = [f"{'metric':<30}{'first iter':>12}{f'last {min(FINAL_WINDOW, len(recs))} iters':>14}{'change':>10}"]
    for k in keys:
        if not isinstance(first.get(k), (int, float)) or end.get(k) is None:
            continue
        label = f"{k} ({summary_unit(k)})" if summary_unit(k) else k
        lines.append(f"{label:<30}{first[k]:>12.4f}{end[k]:>14.4f}{end[k] - first[k]:>+10.4f}")
    if cfg is not None:
        lines.append("reward/total = " + total_formula(cfg))
    return "\n".join(lines)


def summary_unit(key: str) -> str:
    """The unit a summary line shows: the metric catalogue's, except for ``reward/total`` (a weighted mix of its
    parts in their own units: the formula line below the table says what it is made of)."""
    return "" if key == "reward/total" else metric_unit(key)


def total_formula(cfg: Config) -> str:
    """``reward/total`` in words: the weighted components and the step penalty, as configured."""
    parts = []
    for name, spec in cfg.rewards.items():
        norm = "" if spec.normalize == "none" else f" ({spec.normalize}-normalised)"
        parts.append(f"{spec.weight:g} x {name}{norm}")
    return StepPenalty.from_config(cfg.step_penalty).formula(" + ".join(parts))


def write_summary(output: Path, cfg: Config | None = None) -> str:
    """Write ``summary.txt`` into the run folder and return its text (what ``tpdm-rl train`` prints at the end)."""
    text = summarize(output / "metrics.jsonl", cfg)
    (output / "summary.txt").write_text(text + "\n")
    return text
