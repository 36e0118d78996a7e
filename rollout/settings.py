"""A TPM file against a backbone: the inference settings a run records about its backbone, and the check that a
TPM fits the backbone it is loaded onto.

The file format itself (reading, writing, locating, the settings' keys and defaults) is ``tpdm_rl/training/tpm_file.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tpdm_rl.rollout.backbone import Backbone
from tpdm_rl.rollout.toy import toy_backbone_path

from tpdm_rl.core.config import Config
from tpdm_rl.core.console import warn
from tpdm_rl.training.tpm_file import BACKBONE_KEYS, ROLLOUT_KEYS, checkpoint_error


def inference_settings(cfg: Config, backbone: Backbone, backbone_path: str) -> dict:
    """What a TPM file must carry to be used without its training config (checked at load time)."""
    out = {"backbone_path": backbone_path, "backbone_blocks": backbone.num_blocks,
           "hidden_size": backbone.hidden_size}
    out.update({k: getattr(cfg.backbone, k) for k in BACKBONE_KEYS})
    out["feature_blocks"] = list(backbone.feature_blocks)
    out["feature_grid"] = backbone.feature_grid
    out["feature_source"] = backbone.feature_source
    out["backbone_family"] = backbone.family.name
    out["backbone_fingerprint"] = backbone.fingerprint()
    out["inference"] = cfg.policy.inference
    out.update({k: getattr(cfg.rollout, k) for k in ROLLOUT_KEYS})
    return out


def transformer_geometry(backbone_path: str) -> tuple[int, int] | None:
    """(number of transformer blocks, hidden size) from a local diffusers folder's config, else None (FLUX.1:
    double-stream plus single-stream blocks)."""
    cfg = Path(toy_backbone_path(str(backbone_path))) / "transformer" / "config.json"
    if not cfg.is_file():
        return None
    try:
        c = json.loads(cfg.read_text())
        blocks = int(c["num_layers"]) + int(c.get("num_single_layers", 0))
        return blocks, int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    except (ValueError, KeyError, TypeError):
        return None


def mismatch_error(tpm_file: Path, backbone_path: str, key: str, tpm_value, bb_value) -> Exception:
    return checkpoint_error(
        f"TPM {str(tpm_file)!r} does not fit backbone {backbone_path!r}: {key} is {tpm_value} for the TPM but "
        f"{bb_value} for the backbone")


def check_compatible(tpm_file: Path, settings: dict, spec: dict, backbone: Backbone) -> None:
    """The TPM's recorded backbone geometry and feature hooks must match ``backbone`` (one-line error)."""
    n_blocks = backbone.num_blocks
    bpath = backbone.name
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
