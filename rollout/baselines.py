"""Deprecated module name: method parsing is ``tpdm_rl/core/methods.py``, the sampler ``rollout/sampler.py``.

Kept so that code written against it keeps working: ``BaselineSampler`` is :class:`~rollout.sampler.MethodSampler`
(which runs the TPM too, not only baselines), and the method names are those of ``tpdm_rl.core.methods``.
"""

from __future__ import annotations

from tpdm_rl.rollout.adaptive import legacy_skip_mask
from tpdm_rl.rollout.sampler import INFERENCE_STREAM, MethodSampler, SampleOutput  # noqa: F401 - re-exported

from tpdm_rl.core.methods import (  # noqa: F401 - re-exported
    DEFAULT_MAX_SKIP,
    DEFAULT_THRESHOLD,
    METHOD_FORMS,
    SKIPPING_KINDS,
    Method,
    MethodError,
    parse_method,
    parse_methods,
)

#: deprecated: the sampler's old name (it runs every method, the TPM included)
BaselineSampler = MethodSampler
#: the legacy rule under its old name (``adaptive:`` now uses :class:`~rollout.adaptive.OfficialSkipRule`)
adaptive_skip_mask = legacy_skip_mask
