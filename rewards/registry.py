"""The reward registry: names -> reward classes, their options, and ``build_reward``.

It sits below every other layer (the config validates reward names and options with it), so it
imports no reward implementation statically: the built-in reward modules are imported by name on
first lookup, which keeps optional heavy dependencies (open_clip, transformers' BLIP) off the
import path of code that never builds those rewards.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

#: built-in reward modules (``tpdm_rl.rewards.<module>``), imported on first registry lookup
BUILTIN_MODULES = ("fidelity", "shapes", "hpsv2", "aesthetic", "pickscore", "imagereward", "clip_score")


class RewardError(ValueError):
    """A reward could not be built or could not score its input (bad option, missing file, bad batch)."""


_REGISTRY: dict[str, type] = {}
_LOADED = False


def register_reward(name: str) -> Callable[[type], type]:
    """Class decorator: make a reward available to ``build_reward(name, ...)``."""

    def deco(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def reward_class(name: str) -> type:
    """Look up a registered reward class by name (one-line error for an unknown name)."""
    _load_builtin_rewards()
    if name not in _REGISTRY:
        raise RewardError(f"unknown reward {name!r}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def reward_names() -> list[str]:
    """Every registered reward name, sorted (the built-in ones whose dependencies are installed)."""
    _load_builtin_rewards()
    return sorted(_REGISTRY)


def reward_option_defaults(name: str) -> dict[str, Any]:
    """The keyword options ``build_reward(name, ...)`` accepts, with their defaults (None when required)."""
    out: dict[str, Any] = {}
    for klass in reward_class(name).__mro__:  # the subclass's default wins
        if "__init__" not in vars(klass):
            continue
        for p, v in inspect.signature(klass.__init__).parameters.items():
            if p != "self" and v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD) and p not in out:
                out[p] = None if v.default is inspect.Parameter.empty else v.default
    return out


def reward_options(name: str) -> set[str]:
    """The keyword options ``build_reward(name, ...)`` accepts."""
    return set(reward_option_defaults(name))


def build_reward(name: str, **options: Any) -> Any:
    """Build a reward model by registry name; unknown options give a one-line RewardError."""
    cls = reward_class(name)
    allowed = reward_options(name)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise RewardError(f"reward {name!r}: unknown option {unknown[0]!r}; expected one of {sorted(allowed)}")
    return cls(**options)


def _load_builtin_rewards() -> None:
    """Import the built-in reward modules so they register themselves."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in BUILTIN_MODULES:
        try:
            importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as exc:  # an optional extra (open_clip) is missing: that reward is unavailable
            if exc.name and exc.name.startswith(__package__):
                raise
