"""Finding and reading reward-model weights, with one-line errors that say where to get them.

Nothing here downloads unless a hub repository is named *and* ``HF_HUB_OFFLINE`` is unset; the
tests and the tiny configs always pass local paths.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from safetensors.torch import load_file

from tpdm_rl.core.reward_registry import RewardError


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def require_file(path: str | os.PathLike | None, what: str, where_to_get: str) -> Path:
    """Return ``path`` as a Path if it is an existing file, else raise a one-line RewardError."""
    if path is None or str(path) == "":
        raise RewardError(one_line(f"{what}: no file given; get it from {where_to_get}"))
    p = Path(path).expanduser()
    if not p.is_file():
        why = "is a directory, expected a file" if p.is_dir() else "not found"
        raise RewardError(one_line(f"{what}: checkpoint {str(p)!r} {why}; get it from {where_to_get}"))
    return p


def require_dir(path: str | os.PathLike | None, what: str, where_to_get: str,
                must_contain: Iterable[str] = ("config.json",)) -> Path:
    """Return ``path`` if it is a folder holding ``must_contain``, else raise a one-line RewardError."""
    if path is None or str(path) == "":
        raise RewardError(one_line(f"{what}: no model folder given; get it from {where_to_get}"))
    p = Path(path).expanduser()
    if not p.is_dir():
        raise RewardError(one_line(f"{what}: model folder {str(p)!r} not found; get it from {where_to_get}"))
    for name in must_contain:
        if not (p / name).is_file():
            raise RewardError(one_line(f"{what}: model folder {str(p)!r} has no {name}; get it from {where_to_get}"))
    return p


HUB_HOST = "huggingface.co"
HUB_PROBE_TIMEOUT_S = 3.0


def hub_reachable(host: str = HUB_HOST, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the hub (a few seconds at most), so a machine without network fails at once
    instead of after the hub client's retries."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_file(path: str | os.PathLike | None, what: str, where_to_get: str,
                 hub_repo: str | None = None, hub_file: str | None = None) -> Path:
    """A local file, or (only when ``path`` is None, a hub repo/file is named and the hub is not
    offline) a file fetched with ``huggingface_hub.hf_hub_download``."""
    if path is None and hub_repo and hub_file and not hub_offline():
        cached = try_to_load_from_cache(repo_id=hub_repo, filename=hub_file)
        if isinstance(cached, str):
            return Path(cached)
        if not hub_reachable():
            raise RewardError(one_line(f"{what}: no local checkpoint given and the hub ({HUB_HOST}) is not "
                                        f"reachable; get {hub_file!r} from hub repo {hub_repo!r} ({where_to_get}) "
                                        "and pass its local path"))
        try:
            return Path(hf_hub_download(repo_id=hub_repo, filename=hub_file))
        except Exception as exc:
            raise RewardError(one_line(f"{what}: could not download {hub_file!r} from hub repo {hub_repo!r} "
                                        f"({type(exc).__name__}: {exc}); pass a local checkpoint path")) from None
    return require_file(path, what, where_to_get)


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise RewardError(f"checkpoint {str(path)!r} does not hold a state dict (got {type(obj).__name__})")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise RewardError(f"checkpoint {str(path)!r} does not hold a state dict of tensors (key {k!r})")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def load_torch_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict on the CPU (``torch.load(weights_only=True)`` or ``.safetensors``).

    Unwraps ``{'state_dict': ...}`` and strips a ``module.`` prefix; an unreadable/corrupt file or a
    file that is not a state dict gives a one-line RewardError naming the path.
    """
    p = Path(path)
    if not p.is_file():
        raise RewardError(f"checkpoint {str(p)!r} not found")
    try:
        if p.suffix == ".safetensors":
            obj = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RewardError(one_line(f"checkpoint {str(p)!r} could not be read ({type(exc).__name__}: "
                                    f"{str(exc)[:200]})")) from None
    return _unwrap(obj, p)


def load_exact(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, path: str | os.PathLike,
               ignore: Iterable[str] = ()) -> None:
    """``module.load_state_dict(state, strict=True)`` with shape checks and a one-line RewardError
    naming the path and the first missing / unexpected / mis-shaped keys. Keys listed in ``ignore``
    (e.g. non-persistent buffers that old checkpoints saved) are dropped when the module lacks them."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not (k in set(ignore) and k not in own)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            if keys:
                extra = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                if label == "wrong shape":
                    shown = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in keys[:3]]
                else:
                    shown = keys[:3]
                parts.append(f"{len(keys)} {label} keys: {', '.join(shown)}{extra}")
        raise RewardError(one_line(f"{what}: checkpoint {str(path)!r} does not match the model; "
                                    + "; ".join(parts)))
    module.load_state_dict(dict(state), strict=True)
