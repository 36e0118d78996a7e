"""Evaluation (``tpdm-rl eval``) and export (``tpdm-rl export``) of trained TPMs."""

from .export import export_tpm
from .report import headline
from .run import DEFAULT_METHODS, DEFAULT_PARETO_STEPS, evaluate

__all__ = ["DEFAULT_METHODS", "DEFAULT_PARETO_STEPS", "evaluate", "export_tpm", "headline"]
