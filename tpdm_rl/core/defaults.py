"""Defaults the command line shows in its help: kept here, free of heavy imports, so ``tpdm-rl --help`` is fast."""

from __future__ import annotations

#: ``tpdm-rl eval --methods`` default
DEFAULT_METHODS = "tpm,fixed:28,fixed:14,adaptive:0.01"
#: ``tpdm-rl eval --pareto-steps`` default: the fixed:N curve
DEFAULT_PARETO_STEPS = (4, 6, 8, 12, 16, 20, 28)
#: ``tpdm-rl make-random-backbone --preset`` choices: the Stable Diffusion 3 family, then FLUX.1
SD3_PRESETS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
FLUX_PRESETS = ("flux-dev", "flux-schnell")
PRESETS = SD3_PRESETS + FLUX_PRESETS
#: written last by an evaluation: its absence marks an evaluation that did not finish
EVAL_COMPLETE = "COMPLETE"
#: every file an evaluation writes (an earlier evaluation's are removed before a new one starts)
EVAL_OUTPUT_FILES = ("results.json", "results.md", "schedules.png", "nfe_hist.png", "pareto.png", "grid.png",
                     "steps_vs_complexity.png", EVAL_COMPLETE)
#: ``tpdm-rl sample --size`` and ``backbone.resolution`` bounds, in pixels
MIN_SIZE, MAX_SIZE = 16, 4096
