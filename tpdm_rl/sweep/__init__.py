"""Reward-weight / step-penalty sweeps on Ray Tune, and the sweep report.

A sweep is a set of *trials*; each trial is a normal training run (the ``Controller`` with the local
executor, or the Ray executor when ``distributed.enabled``) of the base config (``--config`` + ``--set``) plus the trial's own grid/random
overrides, with the same validation, metrics and checkpoints, written to ``DIR/trials/<name>/``.

Layout of ``DIR``:

- ``sweep_plan.json``: the base config path and ``--set`` overrides, the grid/random spec, the trials;
- ``trials/<name>/``: ``trial.json`` (overrides, validated config, accumulated wall time),
  ``metrics.jsonl``, ``checkpoints/``, ``config.yaml``, and ``DONE`` (final metrics, written
  atomically when the trial ended: finished or stopped early). ``--resume`` skips trials with ``DONE``;
  the others continue from their own checkpoints (``resume="auto"``); Tune's experiment restore is not
  used;
- ``tune/``: Ray Tune's experiment folders (``storage_path``);
- ``sweep.json``, ``sweep.md``, ``sweep_pareto.png``: the report (``collect_report`` / ``write_report``).

Quality: trials that sweep reward weights or ``step_penalty.coef`` optimise different objectives, so
their ``reward/total`` values are not comparable. The report therefore ranks trials by
**quality** = sum over components of (the *base* config's weight x the component's raw mean reward);
the base weights are the same for every trial, and the step penalty is left out (steps are the other
axis). ``best_under_budget`` returns the highest-quality trial whose mean steps fit the budget.
"""

import importlib
from typing import Any

from tpdm_rl.sweep.plan import SweepError, plan_sweep

#: names re-exported from the submodules that load torch, matplotlib and Ray: imported on first use, so that
#: validating a sweep (``plan``) answers in well under a second
_LAZY = {"best_under_budget": "report", "budget_line": "report", "collect_report": "report",
         "report_table": "report", "write_report": "report", "run_sweep": "tune"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["SweepError", "best_under_budget", "budget_line", "collect_report", "plan_sweep", "report_table",
           "run_sweep", "write_report"]
