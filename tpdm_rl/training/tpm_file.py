"""The TPM file format: ``tpm.safetensors`` (weights, the spec that rebuilds the module, and how it was trained).

A TPM file is a safetensors file whose metadata says ``format: tpdm-rl/tpm`` and carries ``tpm_spec`` (which
blocks, sizes: enough to rebuild the module) and ``inference`` (the settings below: the backbone it was
trained on, its geometry, the feature hooks, resolution, CFG and the stopping rule). The training
controller writes it into every checkpoint; ``eval``, ``sample``, ``export`` and the inference pipeline
read it back here, whatever folder it sits in. Older files without ``inference`` metadata are read from the
``tpdm_config.json`` of an export or the ``config.yaml`` of a checkpoint next to them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tpdm_rl.algorithm.policy import TimePredictionModule, TPMSpec
from tpdm_rl.rollout.toy import builtin_name

TPM_FILE = "tpm.safetensors"
EXPORT_CONFIG = "tpdm_config.json"

#: config keys recorded in a TPM file (``backbone.*`` and ``rollout.*``)
BACKBONE_KEYS = ("feature_blocks", "feature_grid", "feature_dtype", "resolution", "guidance_scale",
                 "max_sequence_length", "negative_prompt")
ROLLOUT_KEYS = ("sigma_max", "sigma_min", "max_steps")
#: inference settings and their defaults (the keys of a TPM file's ``inference`` metadata)
DEFAULT_SETTINGS: dict = {
    "backbone_path": "", "backbone_blocks": None, "hidden_size": None, "feature_blocks": [0, -1],
    "feature_grid": 8, "feature_dtype": "float32", "resolution": 1024, "guidance_scale": 7.0,
    "max_sequence_length": 77, "negative_prompt": "", "sigma_max": 1.0, "sigma_min": 0.01, "max_steps": 28,
    "feature_source": "blocks", "backbone_fingerprint": None, "inference": "mode", "backbone_family": "auto",
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt (one-line message naming the path)."""


def save_tpm(policy: TimePredictionModule, path: str | os.PathLike, extra_meta: dict | None = None) -> None:
    """TPM weights + a self-describing spec (which blocks, sizes) in the safetensors metadata."""
    meta = {"format": "tpdm-rl/tpm", "tpm_spec": json.dumps(policy.spec.to_dict())}
    for k, v in (extra_meta or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)
    make_shareable(path)


def make_shareable(path: str | os.PathLike) -> None:
    """Give a file the mode an ordinary ``open`` would (0644 under umask 022).

    Why: safetensors writes its files with mode 0600, so a checkpoint or export could not be shared with
    the group like every other file of a run."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def read_tpm_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"TPM weights {str(p)!r} do not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"TPM weights {str(p)!r} are corrupt or not safetensors ({exc})") from None
    if "tpm_spec" not in meta:
        raise CheckpointError(f"TPM weights {str(p)!r} carry no tpm_spec metadata: not a tpdm-rl TPM file")
    return tensors, meta


def load_tpm(path: str | os.PathLike, device: str | torch.device = "cpu") -> TimePredictionModule:
    """Rebuild a TPM from a ``tpm.safetensors`` file or a checkpoint/export folder containing one."""
    p = Path(path)
    if p.is_dir():
        p = p / TPM_FILE
    tensors, meta = read_tpm_file(p)
    spec = TPMSpec.from_dict(json.loads(meta["tpm_spec"]))
    policy = TimePredictionModule(spec)
    try:
        policy.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"TPM weights {str(p)!r} do not match their spec: {str(exc).splitlines()[0]}") from None
    return policy.to(device)


def read_tpm_meta(path: str | os.PathLike) -> dict[str, str]:
    p = Path(path)
    return read_tpm_file(p / TPM_FILE if p.is_dir() else p)[1]


def checkpoint_error(msg: str) -> Exception:
    return CheckpointError(" ".join(msg.split()))


def locate_tpm(path: str | os.PathLike) -> Path:
    """The ``tpm.safetensors`` behind a file, checkpoint/export folder, checkpoints root or run folder."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / TPM_FILE).is_file():
            return p / TPM_FILE
        for marker in (p / "latest", p / "checkpoints" / "latest"):
            if marker.is_file():
                name = marker.read_text().strip()
                if name and (marker.parent / name / TPM_FILE).is_file():
                    return marker.parent / name / TPM_FILE
        raise checkpoint_error(f"{str(p)!r} holds no {TPM_FILE}: expected a checkpoint folder, an export folder "
                                "or a tpm.safetensors file")
    raise checkpoint_error(f"TPM checkpoint {str(p)!r} does not exist")


def _legacy_settings(tpm_file: Path) -> dict | None:
    """Settings of a checkpoint written before TPM files carried ``inference`` metadata."""
    cfg_file = tpm_file.parent / "config.yaml"
    if not cfg_file.is_file():
        return None
    try:
        cfg = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError:
        return None
    b, r = cfg.get("backbone") or {}, cfg.get("rollout") or {}
    path = b.get("path") or ""
    state = tpm_file.parent / "trainer_state.json"
    if state.is_file():
        try:
            path = json.loads(state.read_text()).get("backbone_path") or path
        except json.JSONDecodeError:
            pass
    out = dict(DEFAULT_SETTINGS)
    out.update({k: b[k] for k in BACKBONE_KEYS if k in b})
    out.update({k: r[k] for k in ROLLOUT_KEYS if k in r})
    out["backbone_path"] = path
    out["backbone_family"] = b.get("family", "auto")
    return out


def read_inference_settings(tpm_file: str | os.PathLike) -> tuple[dict, dict]:
    """(inference settings, TPM spec dict) of a TPM file.

    Order: the file's own ``inference`` metadata; ``tpdm_config.json`` next to it (export folder);
    the ``config.yaml`` + ``trainer_state.json`` of the checkpoint folder (older checkpoints).
    """
    tpm_file = Path(tpm_file)
    meta = read_tpm_meta(tpm_file)
    spec = json.loads(meta["tpm_spec"])
    settings = None
    if "inference" in meta:
        try:
            settings = json.loads(meta["inference"])
        except json.JSONDecodeError:
            raise checkpoint_error(f"TPM weights {str(tpm_file)!r} carry corrupt 'inference' metadata") from None
    if settings is None and (tpm_file.parent / EXPORT_CONFIG).is_file():
        try:
            settings = json.loads((tpm_file.parent / EXPORT_CONFIG).read_text()).get("inference")
        except json.JSONDecodeError:
            raise checkpoint_error(f"{str(tpm_file.parent / EXPORT_CONFIG)!r} is not valid JSON") from None
    if settings is None:
        settings = _legacy_settings(tpm_file)
    if settings is None:
        raise checkpoint_error(f"TPM weights {str(tpm_file)!r} carry no inference metadata and have no config.yaml "
                                "or tpdm_config.json next to them")
    out = dict(DEFAULT_SETTINGS)
    out.update(settings)
    shipped = builtin_name(out.get("backbone_path") or "")
    if shipped is not None:  # a shipped toy backbone recorded by its folder in some clone (older files)
        out["backbone_path"] = shipped
    return out, spec


