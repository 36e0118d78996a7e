"""Rollout: the frozen backbone, the sampling engine, baseline samplers, the inference pipeline.

Installed as ``tpdm_rl.rollout``; import the modules you need, e.g.
``from tpdm_rl.rollout.pipeline import TPDMPipeline``.
"""
