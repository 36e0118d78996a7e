"""The frozen SD3-family backbone: prompt-embedding cache, guided velocity, hooked TPM features.

We use diffusers' own transformer and read the TPM's inputs through forward hooks on
``transformer.transformer_blocks[i]`` (block outputs) and ``transformer.time_text_embed`` (temb),
so any SD3-family checkpoint works without a copy of diffusers' model code.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline

from tpdm_rl.utils import DTYPES, resolve_device


class BackboneError(RuntimeError):
    """The backbone could not be loaded or used (one-line message naming the path / value)."""


@dataclass
class StepOutput:
    """One guided transformer call on a batch of latents."""
    velocity: torch.Tensor  # [B, C, h, w] guided flow-matching velocity (float32)
    features: torch.Tensor  # [B, F, g, g] pooled block outputs of the conditional branch
    temb: torch.Tensor  # [B, D] timestep/text embedding of the conditional branch


class Backbone:
    """Frozen diffusers ``StableDiffusion3Pipeline`` with the pieces a step-wise sampler needs."""
    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "auto",
        dtype: str = "float32",
        guidance_scale: float = 4.5,
        feature_blocks: tuple[int, ...] | list[int] = (0, -1),
        feature_grid: int = 8,
        max_sequence_length: int = 77,
        negative_prompt: str = "",
        local_files_only: bool | None = None,
    ) -> None:
        self.path = str(path)
        self.device = resolve_device(device)
        if dtype not in DTYPES:
            raise BackboneError(f"backbone dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.dtype = DTYPES[dtype]
        is_local = Path(self.path).exists()
        if not is_local and (os.environ.get("HF_HUB_OFFLINE") == "1" or local_files_only):
            raise BackboneError(
                f"backbone path {self.path!r} does not exist (and the hub is offline); give a local diffusers "
                "folder or a hub id such as stabilityai/stable-diffusion-3-medium-diffusers when online"
            )
        if is_local and not (Path(self.path) / "model_index.json").is_file():
            raise BackboneError(f"backbone path {self.path!r} has no model_index.json: not a diffusers pipeline folder")
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(
                self.path, dtype=self.dtype, local_files_only=bool(local_files_only) or is_local
            )
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear line
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackboneError(f"cannot load backbone from {self.path!r}: {msg}") from exc
        pipe.set_progress_bar_config(disable=True)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        self.pipe = pipe.to(self.device)
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt
        self.latent_channels = self.transformer.config.in_channels
        self.patch_size = self.transformer.config.patch_size
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        n_blocks = len(self.transformer.transformer_blocks)
        blocks = []
        for b in feature_blocks:
            if not -n_blocks <= b < n_blocks:
                raise BackboneError(f"feature block {b} out of range for a transformer with {n_blocks} blocks")
            blocks.append(b % n_blocks)
        self.feature_blocks = tuple(blocks)
        self.feature_grid = int(feature_grid)
        self.hidden_size = self.transformer.config.num_attention_heads * self.transformer.config.attention_head_dim
        self.feature_channels = self.hidden_size * len(self.feature_blocks)
        self.temb_dim = self.hidden_size
        self._embed_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._captured: dict[str, torch.Tensor] = {}
        self._capture = False
        self._hooks = []
        for b in self.feature_blocks:
            self._hooks.append(self.transformer.transformer_blocks[b].register_forward_hook(
                self._block_hook(b), with_kwargs=True))
        self._hooks.append(self.transformer.time_text_embed.register_forward_hook(self._temb_hook))

    # ---------------------------------------------------------------- hooks
    def _block_hook(self, index: int):
        def hook(module, args, kwargs, output):
            if self._capture:
                hidden = output[1] if isinstance(output, tuple) else output
                self._captured[f"block{index}"] = hidden

        return hook

    def _temb_hook(self, module, args, output):
        if self._capture:
            self._captured["temb"] = output

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings for ``prompts`` (each distinct prompt encoded once, then cached)."""
        missing = sorted({p for p in prompts if p not in self._embed_cache} - {None})
        if missing:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=missing, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )
            for i, p in enumerate(missing):
                self._embed_cache[p] = (embeds[i], pooled[i])
        e = torch.stack([self._embed_cache[p][0] for p in prompts])
        pl = torch.stack([self._embed_cache[p][1] for p in prompts])
        return e, pl

    def cached_prompt_count(self) -> int:
        return len(self._embed_cache)

    # ---------------------------------------------------------------- geometry
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        if height % (self.vae_scale * self.patch_size) or width % (self.vae_scale * self.patch_size):
            m = self.vae_scale * self.patch_size
            raise BackboneError(f"image size {height}x{width} must be a multiple of {m}")
        return (self.latent_channels, height // self.vae_scale, width // self.vae_scale)

    def default_sigmas(self, num_steps: int) -> torch.Tensor:
        """The backbone scheduler's own (shifted) sigmas for ``num_steps`` steps, ending with 0."""
        sched = copy.deepcopy(self.pipe.scheduler)
        sched.set_timesteps(num_steps, device="cpu")
        return sched.sigmas.float().cpu()

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, latents: torch.Tensor, sigma: torch.Tensor, prompt_embeds: torch.Tensor,
             pooled_embeds: torch.Tensor, need_features: bool = True) -> StepOutput:
        """One guided transformer call; CFG's two branches run as a single batched forward."""
        b = latents.shape[0]
        x = latents.to(self.device, self.dtype)
        t = (sigma.to(self.device, torch.float32) * 1000.0).to(self.dtype)
        pe = prompt_embeds.to(self.device, self.dtype)
        pp = pooled_embeds.to(self.device, self.dtype)
        cfg = self.guidance_scale > 1.0
        if cfg:
            ne, npl = self.encode_prompts([self.negative_prompt])
            x = torch.cat([x, x])
            t = torch.cat([t, t])
            pe = torch.cat([ne.expand(b, -1, -1).to(pe.dtype), pe])
            pp = torch.cat([npl.expand(b, -1).to(pp.dtype), pp])
        self._captured = {}
        self._capture = need_features
        try:
            out = self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=pe,
                                   pooled_projections=pp, return_dict=False)[0]
        finally:
            self._capture = False
        out = out.float()
        if cfg:
            uncond, cond = out.chunk(2)
            v = uncond + self.guidance_scale * (cond - uncond)
        else:
            v = out
        if not need_features:
            return StepOutput(v, torch.empty(0), torch.empty(0))
        gh, gw = latents.shape[-2] // self.patch_size, latents.shape[-1] // self.patch_size
        feats = []
        for blk in self.feature_blocks:
            h = self._captured[f"block{blk}"][-b:].float()  # conditional branch
            h = h.transpose(1, 2).reshape(b, h.shape[-1], gh, gw)
            feats.append(F.adaptive_avg_pool2d(h, self.feature_grid))
        temb = self._captured["temb"][-b:].float()
        self._captured = {}
        return StepOutput(v, torch.cat(feats, dim=1), temb)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Latents -> images in [0, 1], float32 on the CPU, decoded in batches."""
        out = []
        sf = self.vae.config.scaling_factor
        shift = self.vae.config.shift_factor or 0.0
        for i in range(0, latents.shape[0], batch_size):
            z = latents[i:i + batch_size].to(self.device, self.dtype) / sf + shift
            img = self.vae.decode(z, return_dict=False)[0]
            out.append((img.float() / 2 + 0.5).clamp(0, 1).cpu())
        if not out:
            return torch.zeros(0, 3, 1, 1)
        return torch.cat(out)
