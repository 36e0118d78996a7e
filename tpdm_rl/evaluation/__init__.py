"""Evaluation (``tpdm-rl eval``) and export (``tpdm-rl export``) of trained TPMs."""

from tpdm_rl.evaluation.export import export_tpm
from tpdm_rl.evaluation.report import headline
from tpdm_rl.evaluation.run import DEFAULT_METHODS, DEFAULT_PARETO_STEPS, evaluate

__all__ = ["DEFAULT_METHODS", "DEFAULT_PARETO_STEPS", "evaluate", "export_tpm", "headline"]
