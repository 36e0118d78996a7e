"""``TPDMPipeline``: a frozen backbone (SD3 / SD3.5 or FLUX.1) + a trained TPM for fast inference.

    from tpdm_rl.rollout.pipeline import TPDMPipeline
    pipe = TPDMPipeline.from_pretrained(tpm="runs/tiny/checkpoints/step_30")   # backbone from the TPM file
    out = pipe(["a red apple on a table", "a lighthouse at dusk"], seed=[0, 1])
    out.images      # [B, 3, H, W] in [0, 1]
    out.steps       # LongTensor [B], steps (= transformer calls) each image used
    out.sigmas      # list of per-image sigma schedules, from sigma_max down to 0
    out.pil()[0].save("apple.png")

``tpm`` may be a checkpoint folder, an export folder (``tpdm-rl export``), a run folder (its
``checkpoints/latest``) or a ``tpm.safetensors`` file. The TPM file is self-describing: its
``inference`` metadata names the backbone it was trained on (``backbone_path``, ``backbone_family``), the backbone's
geometry (``backbone_blocks``, ``hidden_size``) and the feature hooks (``feature_blocks``,
``feature_grid``), plus resolution, CFG scale and the stopping rule. Loading checks that geometry
against the backbone actually used and fails with one line naming both values on a mismatch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from PIL import Image
from tpdm_rl.rollout.backbone import Backbone, BackboneError
from tpdm_rl.rollout.sampler import MethodSampler
from tpdm_rl.rollout.settings import check_compatible, mismatch_error, transformer_geometry
from tpdm_rl.rollout.toy import check_toy_prompts

from tpdm_rl.core.devices import DTYPES
from tpdm_rl.core.methods import DEFAULT_MAX_SKIP, Method, parse_method
from tpdm_rl.training.tpm_file import checkpoint_error, load_tpm, locate_tpm, read_inference_settings


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
        self._samplers: dict[tuple[int, int], MethodSampler] = {}

    @classmethod
    def from_pretrained(cls, backbone_path: str | os.PathLike | Backbone | None = None, tpm: str | os.PathLike | None
                        = None, device: str = "auto", dtype: str = "float32", batch_size: int = 16,
                        guidance_scale: float | None = None, inference: str | None = None) -> TPDMPipeline:
        """Load a backbone (default: the TPM metadata's ``backbone_path``) and a TPM, and check they fit.

        ``backbone_path`` may also be an already loaded :class:`~rollout.backbone.Backbone` (its
        feature hooks must match the TPM). ``guidance_scale`` overrides the trained CFG scale.
        """
        if tpm is None:
            raise checkpoint_error("TPDMPipeline.from_pretrained needs tpm= (a checkpoint, export folder or "
                                    "tpm.safetensors file)")
        tpm_file = locate_tpm(tpm)
        settings, spec = read_inference_settings(tpm_file)
        if guidance_scale is not None:
            settings["guidance_scale"] = float(guidance_scale)
        if inference is not None:  # overrides the TPM file's policy.inference (mode, mean or sample)
            settings["inference"] = str(inference)
        if isinstance(backbone_path, Backbone):
            backbone = backbone_path
        else:
            path = str(backbone_path) if backbone_path else settings.get("backbone_path") or ""
            if not path:
                raise checkpoint_error(f"TPM {str(tpm_file)!r} names no backbone_path; pass the backbone explicitly")
            geo = transformer_geometry(path)
            if geo is not None:  # fail before loading anything heavy
                if settings.get("backbone_blocks") is not None and int(settings["backbone_blocks"]) != geo[0]:
                    raise mismatch_error(tpm_file, path, "backbone_blocks", settings["backbone_blocks"], geo[0])
                if settings.get("hidden_size") is not None and int(settings["hidden_size"]) != geo[1]:
                    raise mismatch_error(tpm_file, path, "hidden_size", settings["hidden_size"], geo[1])
            try:
                backbone = Backbone(path, device=device, dtype=dtype, guidance_scale=settings["guidance_scale"],
                                    feature_blocks=tuple(settings["feature_blocks"]),
                                    feature_grid=int(settings["feature_grid"]),
                                    max_sequence_length=int(settings["max_sequence_length"]),
                                    negative_prompt=settings["negative_prompt"],
                                    feature_source=settings.get("feature_source", "blocks"),
                                    family=settings.get("backbone_family", "auto"))
            except BackboneError as exc:
                raise BackboneError(f"{exc} (backbone of TPM {str(tpm_file)!r})") from None
        check_compatible(tpm_file, settings, spec, backbone)
        settings["backbone_path"] = backbone.name
        settings["guidance_scale"] = backbone.guidance_scale
        if settings.get("backbone_blocks") is None:
            settings["backbone_blocks"] = backbone.num_blocks
        if settings.get("hidden_size") is None:
            settings["hidden_size"] = backbone.hidden_size
        settings["feature_blocks"] = list(backbone.feature_blocks)
        policy = load_tpm(tpm_file, device=backbone.device)
        return cls(backbone, policy, settings, tpm_path=str(tpm_file), batch_size=batch_size)

    def check_prompts(self, prompts: list[str]) -> None:
        """A toy backbone draws only its world's prompts: one-line PromptError for the first other one."""
        check_toy_prompts(self.backbone.name, prompts)

    @property
    def resolution(self) -> int:
        return int(self.settings["resolution"])

    def sampler(self, height: int | None = None, width: int | None = None, base_steps: int = 28) -> MethodSampler:
        """A :class:`MethodSampler` with this TPM and its stopping rule (for any method string)."""
        h, w = int(height or self.resolution), int(width or self.resolution)
        key = (h, w, int(base_steps))
        if key not in self._samplers:
            self._samplers[key] = MethodSampler(
                self.backbone, h, w, batch_size=self.batch_size, base_steps=base_steps, policy=self.policy,
                sigma_min=float(self.settings["sigma_min"]), max_steps=int(self.settings["max_steps"]),
                sigma_max=float(self.settings["sigma_max"]), feature_dtype=self.feature_dtype,
                inference=str(self.settings.get("inference", "mode")))
        return self._samplers[key]

    def __call__(self, prompt: str | list[str], seed: int | list[int] | None = None, height: int | None = None,
                 width: int | None = None, adaptive_threshold: float | None = None,
                 max_skip: int = DEFAULT_MAX_SKIP, method: Method | str | None = None) -> TPDMOutput:
        """Generate one image per prompt with the TPM's schedule.

        ``seed``: one int per prompt (the same initial noise as ``StableDiffusion3Pipeline`` with
        ``generator=torch.Generator().manual_seed(seed)``); a single int s gives s, s+1, ...; None
        draws seeds from torch's global RNG (returned in ``.seeds``). ``adaptive_threshold`` turns on
        AdaptiveDiffusion skipping on top of the TPM's schedule (``tpm+adaptive``). ``method``: run a
        baseline instead of the TPM, e.g. ``"sigmas:1,0.9,0.75,0.5,0"`` (an explicit table) or ``"fixed:8"``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("TPDMPipeline needs at least one prompt")
        self.check_prompts(prompts)
        if seed is None:
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(len(prompts))]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if method is not None:
            method = parse_method(method) if isinstance(method, str) else method
        elif adaptive_threshold is None:
            method = Method("tpm")
        else:
            method = Method("tpm+adaptive", threshold=float(adaptive_threshold), max_skip=int(max_skip))
        out = self.sampler(height, width).run(method, prompts, seeds)
        return TPDMOutput(images=out.images, sigmas=out.sigmas, steps=out.steps, nfe=out.nfe, seeds=seeds)
