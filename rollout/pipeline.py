"""``TPDMPipeline``: a frozen SD3 backbone + a trained TPM for fast inference.

    from rollout import TPDMPipeline
    pipe = TPDMPipeline.from_pretrained(tpm="runs/tiny/checkpoints/step_30")   # backbone from the TPM file
    out = pipe(["a red apple on a table", "a lighthouse at dusk"], seed=[0, 1])
    out.images      # [B, 3, H, W] in [0, 1]
    out.steps       # LongTensor [B], steps (= transformer calls) each image used
    out.sigmas      # list of per-image sigma schedules, from sigma_max down to 0
    out.pil()[0].save("apple.png")

``tpm`` may be a checkpoint folder, an export folder (``tpdm-rl export``), a run folder (its
``checkpoints/latest``) or a ``tpm.safetensors`` file. The TPM file is self-describing: its
``inference`` metadata names the backbone it was trained on (``backbone_path``), the backbone's
geometry (``backbone_blocks``, ``hidden_size``) and the feature hooks (``feature_blocks``,
``feature_grid``), plus resolution, CFG scale and the stopping rule. Loading checks that geometry
against the backbone actually used and fails with one line naming both values on a mismatch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbone import DTYPES, Backbone, BackboneError
from .baselines import DEFAULT_MAX_SKIP, BaselineSampler, Method

TPM_FILE = "tpm.safetensors"
EXPORT_CONFIG = "tpdm_config.json"

#: inference settings and their defaults (the keys of a TPM file's ``inference`` metadata)
DEFAULT_SETTINGS: dict = {
    "backbone_path": "", "backbone_blocks": None, "hidden_size": None, "feature_blocks": [0, -1],
    "feature_grid": 8, "feature_dtype": "float32", "resolution": 1024, "guidance_scale": 7.0,
    "max_sequence_length": 77, "negative_prompt": "", "sigma_max": 1.0, "sigma_min": 0.01, "max_steps": 28,
}


def _checkpoint_error(msg: str) -> Exception:
    from tpdm_rl.checkpoint import CheckpointError

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
        raise _checkpoint_error(f"{str(p)!r} holds no {TPM_FILE}: expected a checkpoint folder, an export folder "
                                "or a tpm.safetensors file")
    raise _checkpoint_error(f"TPM checkpoint {str(p)!r} does not exist")


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
    import yaml

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
    out.update({k: b[k] for k in ("feature_blocks", "feature_grid", "feature_dtype", "resolution", "guidance_scale",
                                  "max_sequence_length", "negative_prompt") if k in b})
    out.update({k: r[k] for k in ("sigma_max", "sigma_min", "max_steps") if k in r})
    out["backbone_path"] = path
    return out


def read_inference_settings(tpm_file: str | os.PathLike) -> tuple[dict, dict]:
    """(inference settings, TPM spec dict) of a TPM file.

    Order: the file's own ``inference`` metadata; ``tpdm_config.json`` next to it (export folder);
    the ``config.yaml`` + ``trainer_state.json`` of the checkpoint folder (older checkpoints).
    """
    from tpdm_rl.checkpoint import read_tpm_meta

    tpm_file = Path(tpm_file)
    meta = read_tpm_meta(tpm_file)
    spec = json.loads(meta["tpm_spec"])
    settings = None
    if "inference" in meta:
        try:
            settings = json.loads(meta["inference"])
        except json.JSONDecodeError:
            raise _checkpoint_error(f"TPM weights {str(tpm_file)!r} carry corrupt 'inference' metadata") from None
    if settings is None and (tpm_file.parent / EXPORT_CONFIG).is_file():
        try:
            settings = json.loads((tpm_file.parent / EXPORT_CONFIG).read_text()).get("inference")
        except json.JSONDecodeError:
            raise _checkpoint_error(f"{str(tpm_file.parent / EXPORT_CONFIG)!r} is not valid JSON") from None
    if settings is None:
        settings = _legacy_settings(tpm_file)
    if settings is None:
        raise _checkpoint_error(f"TPM weights {str(tpm_file)!r} carry no inference metadata and have no config.yaml "
                                "or tpdm_config.json next to them")
    out = dict(DEFAULT_SETTINGS)
    out.update(settings)
    return out, spec


def _mismatch(tpm_file: Path, backbone_path: str, key: str, tpm_value, bb_value) -> Exception:
    return _checkpoint_error(
        f"TPM {str(tpm_file)!r} does not fit backbone {backbone_path!r}: {key} is {tpm_value} for the TPM but "
        f"{bb_value} for the backbone")


def check_compatible(tpm_file: Path, settings: dict, spec: dict, backbone: Backbone) -> None:
    """The TPM's recorded backbone geometry and feature hooks must match ``backbone`` (one-line error)."""
    n_blocks = len(backbone.transformer.transformer_blocks)
    bpath = backbone.path
    if settings.get("backbone_blocks") is not None and int(settings["backbone_blocks"]) != n_blocks:
        raise _mismatch(tpm_file, bpath, "backbone_blocks", settings["backbone_blocks"], n_blocks)
    if settings.get("hidden_size") is not None and int(settings["hidden_size"]) != backbone.hidden_size:
        raise _mismatch(tpm_file, bpath, "hidden_size", settings["hidden_size"], backbone.hidden_size)
    blocks = [int(b) % n_blocks for b in settings["feature_blocks"]]
    if blocks != list(backbone.feature_blocks):
        raise _mismatch(tpm_file, bpath, "feature_blocks", blocks, list(backbone.feature_blocks))
    spec_blocks = [int(b) % n_blocks for b in spec.get("feature_blocks", blocks)]
    if spec_blocks != list(backbone.feature_blocks):
        raise _mismatch(tpm_file, bpath, "feature_blocks", spec_blocks, list(backbone.feature_blocks))
    for key, tv in (("feature_grid", int(settings["feature_grid"])), ("feature_grid", int(spec["grid"]))):
        if tv != backbone.feature_grid:
            raise _mismatch(tpm_file, bpath, key, tv, backbone.feature_grid)
    if int(spec["in_channels"]) != backbone.feature_channels:
        raise _mismatch(tpm_file, bpath, "feature channels (hidden_size x feature blocks)", spec["in_channels"],
                        backbone.feature_channels)
    if int(spec["temb_dim"]) != backbone.temb_dim:
        raise _mismatch(tpm_file, bpath, "temb_dim", spec["temb_dim"], backbone.temb_dim)


@dataclass
class TPDMOutput:
    """Images and the schedule each one used."""

    images: torch.Tensor  # [B, 3, H, W] float32 in [0, 1], CPU
    sigmas: list[torch.Tensor]  # per image: sigma at every step, then the final 0
    steps: torch.Tensor  # [B] int64 denoising steps
    nfe: torch.Tensor  # [B] int64 transformer calls (= steps unless adaptive skipping is on)
    seeds: list[int]

    def pil(self) -> list:
        """The images as ``PIL.Image`` objects (RGB, 8 bit)."""
        from PIL import Image

        arr = (self.images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in arr]


class TPDMPipeline:
    """A frozen SD3-family backbone sampling with a trained TPM's per-prompt schedule (Beta mode)."""

    def __init__(self, backbone: Backbone, policy: torch.nn.Module, settings: dict, tpm_path: str | None = None,
                 batch_size: int = 16) -> None:
        self.backbone = backbone
        self.policy = policy.eval()
        self.settings = dict(settings)
        self.tpm_path = tpm_path
        self.batch_size = int(batch_size)
        self.feature_dtype = DTYPES[self.settings.get("feature_dtype", "float32")]
        self._samplers: dict[tuple[int, int], BaselineSampler] = {}

    @classmethod
    def from_pretrained(cls, backbone_path: str | os.PathLike | Backbone | None = None, tpm: str | os.PathLike | None
                        = None, device: str = "auto", dtype: str = "float32", batch_size: int = 16,
                        guidance_scale: float | None = None) -> TPDMPipeline:
        """Load a backbone (default: the TPM metadata's ``backbone_path``) and a TPM, and check they fit.

        ``backbone_path`` may also be an already loaded :class:`~rollout.backbone.Backbone` (its
        feature hooks must match the TPM). ``guidance_scale`` overrides the trained CFG scale.
        """
        from tpdm_rl.checkpoint import load_tpm

        if tpm is None:
            raise _checkpoint_error("TPDMPipeline.from_pretrained needs tpm= (a checkpoint, export folder or "
                                    "tpm.safetensors file)")
        tpm_file = locate_tpm(tpm)
        settings, spec = read_inference_settings(tpm_file)
        if guidance_scale is not None:
            settings["guidance_scale"] = float(guidance_scale)
        if isinstance(backbone_path, Backbone):
            backbone = backbone_path
        else:
            path = str(backbone_path) if backbone_path else settings.get("backbone_path") or ""
            if not path:
                raise _checkpoint_error(f"TPM {str(tpm_file)!r} names no backbone_path; pass the backbone explicitly")
            geo = transformer_geometry(path)
            if geo is not None:  # fail before loading anything heavy
                if settings.get("backbone_blocks") is not None and int(settings["backbone_blocks"]) != geo[0]:
                    raise _mismatch(tpm_file, path, "backbone_blocks", settings["backbone_blocks"], geo[0])
                if settings.get("hidden_size") is not None and int(settings["hidden_size"]) != geo[1]:
                    raise _mismatch(tpm_file, path, "hidden_size", settings["hidden_size"], geo[1])
            try:
                backbone = Backbone(path, device=device, dtype=dtype, guidance_scale=settings["guidance_scale"],
                                    feature_blocks=tuple(settings["feature_blocks"]),
                                    feature_grid=int(settings["feature_grid"]),
                                    max_sequence_length=int(settings["max_sequence_length"]),
                                    negative_prompt=settings["negative_prompt"])
            except BackboneError as exc:
                raise BackboneError(f"{exc} (backbone of TPM {str(tpm_file)!r})") from None
        check_compatible(tpm_file, settings, spec, backbone)
        settings["backbone_path"] = backbone.path
        settings["guidance_scale"] = backbone.guidance_scale
        if settings.get("backbone_blocks") is None:
            settings["backbone_blocks"] = len(backbone.transformer.transformer_blocks)
        if settings.get("hidden_size") is None:
            settings["hidden_size"] = backbone.hidden_size
        settings["feature_blocks"] = list(backbone.feature_blocks)
        policy = load_tpm(tpm_file, device=backbone.device)
        return cls(backbone, policy, settings, tpm_path=str(tpm_file), batch_size=batch_size)

    @property
    def resolution(self) -> int:
        return int(self.settings["resolution"])

    def sampler(self, height: int | None = None, width: int | None = None, base_steps: int = 28) -> BaselineSampler:
        """A :class:`BaselineSampler` with this TPM and its stopping rule (for any method string)."""
        h, w = int(height or self.resolution), int(width or self.resolution)
        key = (h, w, int(base_steps))
        if key not in self._samplers:
            self._samplers[key] = BaselineSampler(
                self.backbone, h, w, batch_size=self.batch_size, base_steps=base_steps, policy=self.policy,
                sigma_min=float(self.settings["sigma_min"]), max_steps=int(self.settings["max_steps"]),
                sigma_max=float(self.settings["sigma_max"]), feature_dtype=self.feature_dtype)
        return self._samplers[key]

    def __call__(self, prompt: str | list[str], seed: int | list[int] | None = None, height: int | None = None,
                 width: int | None = None, adaptive_threshold: float | None = None,
                 max_skip: int = DEFAULT_MAX_SKIP) -> TPDMOutput:
        """Generate one image per prompt with the TPM's schedule.

        ``seed``: one int per prompt (the same initial noise as ``StableDiffusion3Pipeline`` with
        ``generator=torch.Generator().manual_seed(seed)``); a single int s gives s, s+1, ...; None
        draws seeds from torch's global RNG (returned in ``.seeds``). ``adaptive_threshold`` turns on
        AdaptiveDiffusion skipping on top of the TPM's schedule (``tpm+adaptive``).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("TPDMPipeline needs at least one prompt")
        if seed is None:
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(len(prompts))]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        method = Method("tpm") if adaptive_threshold is None else Method(
            "tpm+adaptive", threshold=float(adaptive_threshold), max_skip=int(max_skip))
        out = self.sampler(height, width).run(method, prompts, seeds)
        return TPDMOutput(images=out.images, sigmas=out.sigmas, steps=out.steps, nfe=out.nfe, seeds=seeds)
