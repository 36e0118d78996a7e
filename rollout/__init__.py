"""Frozen backbone wrapper, sampling engine, baseline samplers and the inference pipeline.

``import rollout`` stays light: ``TPDMPipeline`` / ``TPDMOutput`` are imported on first use.
"""

__all__ = ["TPDMOutput", "TPDMPipeline"]


def __getattr__(name: str):
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
