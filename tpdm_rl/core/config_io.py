"""The config as text: YAML files and ``--set key=value`` overrides in (``load_config``), YAML out
(``config_to_yaml``), and what a resumed run may change (``RESUME_FREE_KEYS``, ``config_changes``).

The schema itself, its checks and its one-line errors are in ``config.py``.
"""

from __future__ import annotations

import copy
import fnmatch
import os
from pathlib import Path
from typing import Any

import yaml

from tpdm_rl.core.config import Config, ConfigError, did_you_mean, validate_config
from tpdm_rl.core.console import warn


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"config error: override {item!r} is not KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"config error: override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for p in path[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"config error: {'.'.join(path)}: {p!r} is not a section")
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return data


class _DuplicateKeyLoader(yaml.SafeLoader):
    """SafeLoader that reports a key given twice in one mapping (YAML keeps the last one silently)."""

    duplicates: list[tuple[str, int]]


def _mapping_with_duplicates(loader: _DuplicateKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            loader.duplicates.append((str(key), key_node.start_mark.line + 1))
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_DuplicateKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_duplicates)


def read_yaml_file(p: Path) -> Any:
    """The YAML in ``p``; a key given twice in one mapping is an error (YAML would keep the last silently,
    dropping e.g. a whole earlier ``train:`` section)."""
    text = p.read_text()
    loader = _DuplicateKeyLoader(text)
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    for key, line in loader.duplicates[:1]:
        raise ConfigError(f"config error: {p}:{line}: key {key!r} is given twice in one section; expected each "
                          "key once (merge the two entries)")
    return data


def yaml_error(p: Path, exc: yaml.YAMLError) -> str:
    """One line: where the YAML parser stopped, why, and where the construct it was reading began."""
    mark, ctx = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
    where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    began = (f" ({context} at line {ctx.line + 1})" if context and ctx is not None and mark is not None
             and ctx.line != mark.line else "")
    return f"config error: {where}: not valid YAML: {problem}{began}"


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config error: config file {str(p)!r} is a folder; expected a YAML file")
        if not p.is_file():
            raise ConfigError(f"config error: config file {str(p)!r} does not exist")
        try:
            data = read_yaml_file(p)
            if data is None:
                warn(f"config file {p} is empty: every setting is the default (tpdm-rl config --explain lists them)")
                data = {}
        except yaml.YAMLError as exc:
            raise ConfigError(yaml_error(p, exc)) from None
        if not isinstance(data, dict):
            raise ConfigError(f"config error: {p} must hold a mapping at the top level")
    return validate_config(apply_overrides(data, overrides or []))


#: keys that may change when a run is resumed: layout, devices, logging, length (the objective and the
#: trajectories stay the same); every other key needs ``--allow-config-change KEY``
RESUME_FREE_KEYS = ("output", "deterministic", "train.iterations", "train.device", "train.threads", "checkpoint.*",
                    "logging.*", "eval.*", "distributed.*", "backbone.device", "backbone.tiny_dir", "rollout.batch_size",
                    "rollout.decode_batch_size", "rollout.continuous_batching", "rewards.*.num_workers",
                    "rewards.*.num_cpus", "rewards.*.num_gpus", "rewards.*.device", "rewards.*.batch_size")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_config_keys(keys: list[str] | tuple[str, ...], flag: str, cfg: Config | None = None) -> None:
    """Every entry of ``keys`` must be a config key (``rewards.<name>.<option>`` included); else one line with the
    closest key (difflib)."""
    known = set(_flatten(Config().model_dump(mode="json")))
    if cfg is not None:
        known |= set(_flatten(cfg.model_dump(mode="json")))
    for key in keys:
        parts = key.split(".")
        if key in known or (len(parts) >= 3 and parts[0] == "rewards" and all(parts)):
            continue
        hint = did_you_mean(key, known)
        raise ConfigError(f"config error: {flag} {key!r}: not a config key"
                          + (hint or "; expected a key such as step_penalty.coef (tpdm-rl config --explain lists them)"))


def config_changes(old_yaml: str, new: Config) -> dict[str, tuple[Any, Any]]:
    """Keys outside ``RESUME_FREE_KEYS`` whose value differs between a checkpoint's config and ``new``.

    A key the old config lacks counts as unchanged when the new value is the schema default (a setting
    added later, at its default, keeps the old behaviour); a key only the old config has is ignored."""
    try:
        old = yaml.safe_load(old_yaml) or {}
    except yaml.YAMLError:
        old = {}
    fo, fn = _flatten(old if isinstance(old, dict) else {}), _flatten(new.model_dump(mode="json"))
    defaults = _flatten(Config().model_dump(mode="json"))
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(fn):
        if any(fnmatch.fnmatchcase(key, pat) for pat in RESUME_FREE_KEYS):
            continue
        if key not in fo:
            if key in defaults and fn[key] == defaults[key]:
                continue
            changes[key] = ("<absent>", fn[key])
        elif fo[key] != fn[key]:
            changes[key] = (fo[key], fn[key])
    return changes


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
