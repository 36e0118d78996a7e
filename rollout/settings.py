"""Inference settings: what a TPM file records about how it was trained, read back in one place.

A TPM file's ``inference`` metadata names the backbone it was trained on (``backbone_path``), the
backbone's geometry (``backbone_blocks``, ``hidden_size``), the feature hooks (``feature_blocks``,
``feature_grid``, ``feature_dtype``), resolution, CFG and the stopping rule. ``BACKBONE_KEYS`` and
``ROLLOUT_KEYS`` are the config keys copied into it; the training controller writes them, the
inference pipeline, ``eval`` and ``export`` read them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from tpdm_rl.checkpoint import CheckpointError, read_tpm_meta
from tpdm_rl.config import Config
from tpdm_rl.utils import warn

from .backbone import Backbone

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
    "feature_source": "blocks", "backbone_fingerprint": None, "inference": "mode",
}


def inference_settings(cfg: Config, backbone: Backbone, backbone_path: str) -> dict:
    """What a TPM file must carry to be used without its training config (checked at load time)."""
    out = {"backbone_path": backbone_path, "backbone_blocks": len(backbone.transformer.transformer_blocks),
           "hidden_size": backbone.hidden_size}
    out.update({k: getattr(cfg.backbone, k) for k in BACKBONE_KEYS})
    out["feature_blocks"] = list(backbone.feature_blocks)
    out["feature_grid"] = backbone.feature_grid
    out["feature_source"] = backbone.feature_source
    out["backbone_fingerprint"] = backbone.fingerprint()
    out["inference"] = cfg.policy.inference
    out.update({k: getattr(cfg.rollout, k) for k in ROLLOUT_KEYS})
    return out


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


def transformer_geometry(backbone_path: str) -> tuple[int, int] | None:
    """(number of transformer blocks, hidden size) from a local diffusers folder's config, else None."""
    cfg = Path(backbone_path) / "transformer" / "config.json"
    if not cfg.is_file():
        return None
    try:
        c = json.loads(cfg.read_text())
        return int(c["num_layers"]), int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    except (ValueError, KeyError, TypeError):
        return None


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
    return out, spec


def mismatch_error(tpm_file: Path, backbone_path: str, key: str, tpm_value, bb_value) -> Exception:
    return checkpoint_error(
        f"TPM {str(tpm_file)!r} does not fit backbone {backbone_path!r}: {key} is {tpm_value} for the TPM but "
        f"{bb_value} for the backbone")


def check_compatible(tpm_file: Path, settings: dict, spec: dict, backbone: Backbone) -> None:
    """The TPM's recorded backbone geometry and feature hooks must match ``backbone`` (one-line error)."""
    n_blocks = len(backbone.transformer.transformer_blocks)
    bpath = backbone.path
    if settings.get("backbone_blocks") is not None and int(settings["backbone_blocks"]) != n_blocks:
        raise mismatch_error(tpm_file, bpath, "backbone_blocks", settings["backbone_blocks"], n_blocks)
    if settings.get("hidden_size") is not None and int(settings["hidden_size"]) != backbone.hidden_size:
        raise mismatch_error(tpm_file, bpath, "hidden_size", settings["hidden_size"], backbone.hidden_size)
    source = settings.get("feature_source", "blocks")
    if source != backbone.feature_source:
        raise mismatch_error(tpm_file, bpath, "feature_source (policy.inputs)", source, backbone.feature_source)
    fp = settings.get("backbone_fingerprint")
    if fp and fp != backbone.fingerprint():
        warn(f"TPM {str(tpm_file)!r} was trained on a backbone with other weights (fingerprint {fp}, this one "
             f"{backbone.fingerprint()}) of the same shapes; its schedules may not fit this backbone")
    blocks = [int(b) % n_blocks for b in settings["feature_blocks"]] if source == "blocks" else []
    if blocks != list(backbone.feature_blocks):
        raise mismatch_error(tpm_file, bpath, "feature_blocks", blocks, list(backbone.feature_blocks))
    spec_blocks = [int(b) % n_blocks for b in spec.get("feature_blocks", blocks)] if source == "blocks" else []
    if spec_blocks != list(backbone.feature_blocks):
        raise mismatch_error(tpm_file, bpath, "feature_blocks", spec_blocks, list(backbone.feature_blocks))
    for key, tv in (("feature_grid", int(settings["feature_grid"])), ("feature_grid", int(spec["grid"]))):
        if tv != backbone.feature_grid:
            raise mismatch_error(tpm_file, bpath, key, tv, backbone.feature_grid)
    if int(spec["in_channels"]) != backbone.feature_channels:
        raise mismatch_error(tpm_file, bpath, "feature channels (hidden_size x feature blocks)", spec["in_channels"],
                        backbone.feature_channels)
    if int(spec["temb_dim"]) != backbone.temb_dim:
        raise mismatch_error(tpm_file, bpath, "temb_dim", spec["temb_dim"], backbone.temb_dim)
