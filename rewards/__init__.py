"""Reward models behind one batched interface: ``build_reward(name, **options).score(images, prompts)``."""

from .base import RewardError, RewardModel, build_reward, register_reward, reward_class, reward_options

_LOADED = False


def _load_builtin_rewards() -> None:
    """Import the built-in reward modules so they register themselves (lazy: heavy deps)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib

    from . import fidelity  # noqa: F401

    for mod in ("hpsv2", "aesthetic", "pickscore", "imagereward", "clip_score"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:  # the module itself may not exist yet, or an extra is missing
            if exc.name and exc.name.startswith(__name__):
                continue
            raise


__all__ = ["RewardError", "RewardModel", "build_reward", "register_reward", "reward_class", "reward_options"]
