"""Backbone families: what differs between SD3-family and FLUX.1 transformers, behind one small interface.

:class:`~tpdm_rl.rollout.backbone.Backbone` does everything the rollout needs (prompt cache, guidance, TPM
feature hooks, decoding) in one place; a family answers only the questions whose answers differ:

=================  ======================================  ==========================================
question           SD3 / SD3.5 (``sd3``)                   FLUX.1 dev / schnell (``flux``)
=================  ======================================  ==========================================
pipeline class     ``StableDiffusion3Pipeline``            ``FluxPipeline``
text encoders      CLIP-L + CLIP-G (pooled) + T5-XXL       CLIP-L (pooled) + T5-XXL
transformer input  latents [B, 16, h, w], patch 2 inside   latents packed into 2 x 2 patches [B, hw/4, 64]
timestep           1000 * sigma                            sigma (the model multiplies by 1000)
guidance           classifier-free (two branches)          a guidance embedding (dev) or none (schnell)
blocks the TPM     ``transformer_blocks``                  ``transformer_blocks`` (double stream) then
can read                                                   ``single_transformer_blocks``
"paper" inputs     ``pos_embed`` and ``norm_out``          ``x_embedder`` and ``norm_out``
default sigmas     the scheduler's static shift            shift from the image's token count
                                                           (``use_dynamic_shifting``)
=================  ======================================  ==========================================

Both families' blocks return ``(encoder_hidden_states, hidden_states)``, so the image tokens are element 1; the
engine always keeps latents unpacked ``[B, 16, h, w]`` and a family packs them for its transformer.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

#: the families and the pipeline classes (``_class_name`` in model_index.json) that select them
PIPELINE_CLASSES: dict[str, tuple[str, ...]] = {
    "sd3": ("StableDiffusion3Pipeline",),
    "flux": ("FluxPipeline",),
}
FAMILY_NAMES: tuple[str, ...] = ("auto", *PIPELINE_CLASSES)


class FamilyError(ValueError):
    """The backbone family is unknown or cannot be detected (one-line message)."""


def detect_family(path: str | os.PathLike, family: str = "auto") -> str:
    """The family of a pipeline folder from its ``model_index.json`` (``family`` other than auto forces it).

    A hub id (no local folder) cannot be read offline: ``auto`` then guesses from the id (``flux`` in the
    name) and ``backbone.family`` overrides the guess."""
    if family not in FAMILY_NAMES:
        raise FamilyError(f"backbone family {family!r} is not one of {list(FAMILY_NAMES)}")
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return family if family != "auto" else "flux" if "flux" in str(path).lower() else "sd3"
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        return family if family != "auto" else "sd3"  # Backbone's own check of the index names the problem
    for fam, classes in PIPELINE_CLASSES.items():
        if name in classes:
            if family not in ("auto", fam):  # forcing the other family fails deep inside diffusers otherwise
                raise FamilyError(f"backbone.family {family!r} does not fit {str(index)!r}, which names {name} "
                                  f"(family {fam!r}); expected backbone.family auto or {fam}")
            return fam
    if family != "auto":
        return family
    raise FamilyError(f"{str(index)!r} names pipeline class {name!r}; expected one of "
                      f"{[c for cs in PIPELINE_CLASSES.values() for c in cs]} (or set backbone.family)")


class BackboneFamily:
    """The family-specific answers; one instance per :class:`Backbone`."""

    name = ""
    pipeline_class: type = object
    #: the T5 tokenizer's attribute on the pipeline (the one ``max_sequence_length`` limits)
    t5_tokenizer = ""

    def blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The blocks ``feature_blocks`` index, in order of depth."""
        raise NotImplementedError

    def input_tokens(self, transformer: torch.nn.Module) -> torch.nn.Module:
        """The module whose output is the embedded image tokens (the ``paper`` TPM input)."""
        raise NotImplementedError

    def hidden_size(self, transformer: torch.nn.Module) -> int:
        c = transformer.config
        return int(c.num_attention_heads) * int(c.attention_head_dim)

    def latent_channels(self, transformer: torch.nn.Module) -> int:
        raise NotImplementedError

    def patch_size(self, transformer: torch.nn.Module) -> int:
        """Latent pixels per image token along each side (the TPM's feature grid is latent / patch)."""
        raise NotImplementedError

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Whether ``guidance_scale`` means classifier-free guidance (two branches per call)."""
        raise NotImplementedError

    def encode(self, pipe, prompts: list[str], device: torch.device,
               max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embeddings [B, L, D], pooled embeddings [B, P]) for ``prompts``."""
        raise NotImplementedError

    def forward(self, fn, latents: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor,
                pooled: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """The transformer's velocity for unpacked ``latents`` [B, C, h, w] (returned unpacked)."""
        raise NotImplementedError

    def default_sigmas(self, scheduler, num_steps: int, latent_hw: tuple[int, int] | None) -> torch.Tensor:
        """The scheduler's own sigmas for ``num_steps`` steps (ending with 0) at a latent size."""
        raise NotImplementedError


class SD3Family(BackboneFamily):
    """SD3 / SD3.5: joint-attention blocks, CFG, a static shift."""

    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    t5_tokenizer = "tokenizer_3"

    def blocks(self, transformer):
        return list(transformer.transformer_blocks)

    def input_tokens(self, transformer):
        return transformer.pos_embed

    def latent_channels(self, transformer):
        return int(transformer.config.in_channels)

    def patch_size(self, transformer):
        return int(transformer.config.patch_size)

    def uses_cfg(self, guidance_scale):
        return guidance_scale > 1.0

    def encode(self, pipe, prompts, device, max_sequence_length):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
        return embeds, pooled

    def forward(self, fn, latents, sigma, embeds, pooled, guidance_scale):
        # diffusers' SD3 timestep: 1000 * sigma, in float32 whatever the dtype (bf16 would drop the fraction)
        t = sigma.to(latents.device, torch.float32) * 1000.0
        return fn(hidden_states=latents, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                  return_dict=False)[0]

    def default_sigmas(self, scheduler, num_steps, latent_hw):
        sched = copy.deepcopy(scheduler)
        sched.set_timesteps(num_steps, device="cpu")
        return sched.sigmas.float().cpu()


def flux_shift_mu(scheduler_config, image_tokens: int) -> float:
    """FLUX.1's resolution-dependent shift (``use_dynamic_shifting``): mu linear in the image's token count,
    from ``base_shift`` at ``base_image_seq_len`` tokens to ``max_shift`` at ``max_image_seq_len``."""
    c = scheduler_config
    lo_n, hi_n = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    lo, hi = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    return lo + (hi - lo) * (image_tokens - lo_n) / (hi_n - lo_n)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: FLUX.1's 2 x 2 patches, row-major, channels outermost in a patch."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a latent of ``h`` x ``w``."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(gh: int, gw: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """FLUX.1's positional ids of the packed image tokens: (0, row, column) per token, row-major."""
    rows = torch.arange(gh, dtype=torch.float32).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.float32).repeat(gh)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(device, dtype)


class FluxFamily(BackboneFamily):
    """FLUX.1: double- then single-stream blocks, packed latents, a guidance embedding (dev) or none
    (schnell), a dynamic shift."""

    name = "flux"
    pipeline_class = FluxPipeline
    t5_tokenizer = "tokenizer_2"

    def blocks(self, transformer):
        return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)

    def input_tokens(self, transformer):
        return transformer.x_embedder

    def latent_channels(self, transformer):
        return int(transformer.config.in_channels) // 4

    def patch_size(self, transformer):
        return 2

    def uses_cfg(self, guidance_scale):
        return False  # dev embeds the guidance value; schnell takes none

    def encode(self, pipe, prompts, device, max_sequence_length):
        pooled = pipe._get_clip_prompt_embeds(prompt=prompts, device=device, num_images_per_prompt=1)
        if pipe.text_encoder_2 is not None:
            embeds = pipe._get_t5_prompt_embeds(prompt=prompts, num_images_per_prompt=1,
                                                max_sequence_length=max_sequence_length, device=device)
        else:  # a no-T5 build: zeros in T5's place, as the SD3 pipeline does without text_encoder_3
            width = pipe.transformer.config.joint_attention_dim
            embeds = torch.zeros(len(prompts), max_sequence_length, width, device=device, dtype=pooled.dtype)
        return embeds, pooled

    def forward(self, fn, latents, sigma, embeds, pooled, guidance_scale):
        b, _, h, w = latents.shape
        t = sigma.to(latents.device, torch.float32)  # the pipeline's timestep / 1000
        guidance = None
        if fn_config(fn).guidance_embeds:
            guidance = torch.full((b,), float(guidance_scale), device=latents.device, dtype=torch.float32)
        txt = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
        out = fn(hidden_states=pack_latents(latents), timestep=t, guidance=guidance, pooled_projections=pooled,
                 encoder_hidden_states=embeds, txt_ids=txt, img_ids=image_ids(h // 2, w // 2, latents.device,
                                                                               latents.dtype),
                 return_dict=False)[0]
        return unpack_latents(out, h, w)

    def default_sigmas(self, scheduler, num_steps, latent_hw):
        sched = copy.deepcopy(scheduler)
        kw = {}
        if sched.config.get("use_dynamic_shifting", False):
            if latent_hw is None:
                raise FamilyError("FLUX.1's default sigmas depend on the image size: pass the latent size")
            kw["mu"] = flux_shift_mu(sched.config, (latent_hw[0] // 2) * (latent_hw[1] // 2))
        sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), device="cpu", **kw)
        return sched.sigmas.float().cpu()


def fn_config(fn):
    """The config of a transformer, also through ``torch.compile``'s wrapper."""
    return getattr(fn, "config", None) or fn._orig_mod.config


FAMILIES: dict[str, type[BackboneFamily]] = {"sd3": SD3Family, "flux": FluxFamily}


def family(name: str) -> BackboneFamily:
    return FAMILIES[name]()
