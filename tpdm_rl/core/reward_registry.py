"""The reward registry: names -> reward classes, their options, and ``build_reward``.

In the core (``tpdm_rl.core.reward_registry``): the config, the metrics catalogue and the reward implementations in
``tpdm_rl.rewards`` all import it, and it imports none of them at module level.

It sits below every other layer (the config validates reward names and options with it), so it
imports no reward implementation statically: the built-in reward modules are imported by name on
first lookup, which keeps optional heavy dependencies (open_clip, transformers' BLIP) off the
import path of code that never builds those rewards.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the package of the reward implementations (the repository's rewards/ folder)
REWARDS_PACKAGE = "tpdm_rl.rewards"
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


@dataclass(frozen=True)
class RewardInfo:
    """What validating a config needs to know about a reward, without building (or importing) it."""

    name: str
    options: frozenset[str]
    nonnegative: bool = False
    needs_reference: bool = False
    unit: str = ""


def _info_of_class(cls: type) -> RewardInfo:
    return RewardInfo(cls.name, frozenset(reward_options(cls.name)), bool(getattr(cls, "nonnegative", False)),
                      bool(getattr(cls, "needs_reference", False)), str(getattr(cls, "unit", "")))


_STATIC: dict[str, RewardInfo] | None = None
_FLAGS = ("nonnegative", "needs_reference", "unit")


def _static_builtin_info() -> dict[str, RewardInfo]:
    """The built-in rewards read from their source files (``ast``), not imported.

    Why: importing them loads torch and transformers (5-6 s), and ``tpdm-rl config`` / every config
    error must answer in well under 2 s. ``tests/test_layers.py`` checks this view against the classes."""
    global _STATIC
    if _STATIC is not None:
        return _STATIC
    classes: dict[str, dict] = {}
    spec = importlib.util.find_spec(REWARDS_PACKAGE)  # its folder, without running its __init__
    here = Path(next(iter(spec.submodule_search_locations or ()), "")) if spec else Path()
    for mod in ("base", *BUILTIN_MODULES):
        try:
            tree = ast.parse((here / f"{mod}.py").read_text())
        except (OSError, SyntaxError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            info: dict = {"bases": [b.id for b in node.bases if isinstance(b, ast.Name)], "init": None,
                          "attrs": {}, "registered": None}
            for d in node.decorator_list:
                if (isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == "register_reward"
                        and d.args and isinstance(d.args[0], ast.Constant)):
                    info["registered"] = d.args[0].value
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    info["init"] = {a.arg for a in item.args.args + item.args.kwonlyargs if a.arg != "self"}
                targets = (item.targets if isinstance(item, ast.Assign) else
                           [item.target] if isinstance(item, ast.AnnAssign) and item.value is not None else [])
                for t in targets:
                    if isinstance(t, ast.Name) and t.id in _FLAGS and isinstance(item.value, ast.Constant):
                        info["attrs"][t.id] = item.value.value
            classes[node.name] = info
    out: dict[str, RewardInfo] = {}
    for info in classes.values():
        if info["registered"] is None:
            continue
        opts: set[str] = set()
        attrs: dict = {}
        chain, cur = [], info
        while cur is not None and len(chain) < 16:
            chain.append(cur)
            cur = next((classes[b] for b in cur["bases"] if b in classes), None)
        for c in chain:
            opts |= c["init"] or set()
            for k, v in c["attrs"].items():
                attrs.setdefault(k, v)
        out[info["registered"]] = RewardInfo(info["registered"], frozenset(opts), bool(attrs.get("nonnegative", False)),
                                             bool(attrs.get("needs_reference", False)), str(attrs.get("unit", "")))
    _STATIC = out
    return out


def reward_info(name: str) -> RewardInfo:
    """Options and flags of reward ``name``: from the registered class when it is loaded, else (a built-in)
    from its source without importing it; an unknown name is a one-line RewardError."""
    if name in _REGISTRY:
        return _info_of_class(_REGISTRY[name])
    static = _static_builtin_info()
    if name in static:
        return static[name]
    if not static:  # source files unreadable (a zipped install): import them
        return _info_of_class(reward_class(name))
    known = sorted(set(_REGISTRY) | set(static))
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise RewardError(f"unknown reward {name!r}{hint} (expected one of {known})")


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
            importlib.import_module(f"{REWARDS_PACKAGE}.{mod}")
        except ModuleNotFoundError as exc:  # an optional extra (open_clip) is missing: that reward is unavailable
            if exc.name and exc.name.startswith(REWARDS_PACKAGE):
                raise
