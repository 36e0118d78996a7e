"""The frozen backbone (SD3 / SD3.5 or FLUX.1): prompt-embedding cache, guided velocity, hooked TPM features.

We use diffusers' own transformer and read the TPM's inputs through forward hooks on the family's blocks
(block outputs: image tokens reshaped to the 2-D token grid) and ``transformer.time_text_embed`` (temb), so
any checkpoint of a supported family works without a copy of diffusers' model code. What differs between the
families (packing, timesteps, guidance, encoders, shift) is answered by :mod:`tpdm_rl.rollout.families`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tpdm_rl.rollout.families import FamilyError, detect_family, family
from tpdm_rl.rollout.toy import SHIPPED_TOY_BACKBONES, toy_backbone_path

from tpdm_rl.core.console import warn
from tpdm_rl.core.devices import DTYPES, resolve_device


class BackboneError(RuntimeError):
    """The backbone could not be loaded or used (one-line message naming the path / value)."""


def _family_for(path: str, name: str):
    return family(detect_family(path, name))


def check_model_index(index_file: Path) -> None:
    """A one-line BackboneError naming ``model_index.json`` when it is not a JSON object (diffusers' own error
    names neither the file nor what was expected)."""
    try:
        index = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BackboneError(f"{str(index_file)!r} is not valid JSON ({exc}); expected a diffusers pipeline index "
                            "(a JSON object naming the components)") from None
    if not isinstance(index, dict) or "_class_name" not in index:
        raise BackboneError(f"{str(index_file)!r} holds {type(index).__name__}, not a diffusers pipeline index; "
                            "expected a JSON object with '_class_name' and the components")


def null_components(directory: str | os.PathLike) -> dict[str, None]:
    """``{name: None}`` for the components a pipeline folder's model_index.json leaves out (null).

    diffusers' ``from_pretrained`` refuses a folder whose required component is null (here
    ``text_encoder_3``/``tokenizer_3`` of a ``no_t5`` SD3 build, ``text_encoder_2``/``tokenizer_2`` of a FLUX.1
    one) unless the caller passes it as None, as in diffusers' own "drop T5" recipe:
    ``StableDiffusion3Pipeline.from_pretrained(dir, **null_components(dir))`` (``FluxPipeline`` alike).
    """
    index = json.loads((Path(directory) / "model_index.json").read_text())
    return {name: None for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and value[:1] == [None]}


@dataclass
class StepOutput:
    """One guided transformer call on a batch of latents."""

    velocity: torch.Tensor  # [B, C, h, w] guided flow-matching velocity (float32)
    features: torch.Tensor  # [B, F, g, g] pooled TPM input features
    temb: torch.Tensor  # [B, D] timestep/text embedding


#: what the TPM reads: ``blocks`` = the outputs of ``feature_blocks`` from the conditional CFG branch;
#: ``paper`` = the official TPDM inputs, the output of ``pos_embed`` and of ``norm_out`` and ``temb``,
#: each combined across the CFG branches like the velocity (uncond + s * (cond - uncond))
FEATURE_SOURCES = ("blocks", "paper")


class Backbone:
    """A frozen diffusers pipeline (``StableDiffusion3Pipeline`` or ``FluxPipeline``) with the pieces a
    step-wise sampler needs.

    Latents stay unpacked ``[B, 16, h, w]`` for every family. Timesteps go into the transformer in float32
    (as diffusers' SD3 pipeline passes them), whatever the backbone dtype: 1000 * sigma in bf16 would lose its
    fraction (760.74 -> 760). Prompt embeddings are cached on the CPU; ``offload_text_encoders`` moves the
    text encoders off the accelerator once a run's prompts are encoded. ``family`` is detected from the
    folder's ``model_index.json`` unless given (``sd3`` or ``flux``).
    """

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
        feature_source: str = "blocks",
        compile: bool = False,
        family: str = "auto",
    ) -> None:
        #: the name the backbone was given (``builtin:toy`` stays that, for TPM files that work in any clone)
        self.name = str(path)
        if self.name.startswith("builtin:") and self.name not in SHIPPED_TOY_BACKBONES:
            raise BackboneError(f"backbone {self.name!r} is not a shipped backbone; expected one of "
                                f"{', '.join(SHIPPED_TOY_BACKBONES)}, a local diffusers folder or a hub id")
        self.path = toy_backbone_path(self.name)
        self.device = resolve_device(device)
        if dtype not in DTYPES:
            raise BackboneError(f"backbone dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if feature_source not in FEATURE_SOURCES:
            raise BackboneError(f"feature source {feature_source!r} is not one of {FEATURE_SOURCES}")
        self.dtype = DTYPES[dtype]
        pipe = self._load_pipeline(family, local_files_only)
        self.pipe = pipe.to(self.device)
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.guidance_scale = float(guidance_scale)
        self.max_sequence_length = int(max_sequence_length)
        self.negative_prompt = negative_prompt
        fam = self.family
        self.uses_cfg = fam.uses_cfg(self.guidance_scale)
        self.latent_channels = fam.latent_channels(self.transformer)
        self.patch_size = fam.patch_size(self.transformer)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.blocks = fam.blocks(self.transformer)
        self.feature_source = feature_source
        blocks = self._block_indices(feature_blocks)  # checked with either source, as before
        self.feature_blocks = blocks if feature_source == "blocks" else ()
        self.feature_grid = int(feature_grid)
        self.hidden_size = fam.hidden_size(self.transformer)
        self.feature_channels = self.hidden_size * (len(self.feature_blocks) if feature_source == "blocks" else 2)
        self.temb_dim = self.hidden_size
        self._embed_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # CPU, backbone dtype
        self._text_device = self.device
        self._captured: dict[str, torch.Tensor] = {}
        self._capture = False
        self._hooks = self._install_hooks()
        self._forward = torch.compile(self.transformer) if compile else self.transformer

    def _load_pipeline(self, family: str, local_files_only: bool | None):
        """The diffusers pipeline of ``self.path`` (a local folder, checked first, or a hub id), frozen and in eval
        mode; sets ``self.family``."""
        is_local = Path(self.path).exists()
        if not is_local and (os.environ.get("HF_HUB_OFFLINE") == "1" or local_files_only):
            raise BackboneError(
                f"backbone path {self.path!r} does not exist (and the hub is offline); give a local diffusers "
                "folder or a hub id such as stabilityai/stable-diffusion-3-medium-diffusers when online"
            )
        if is_local and not (Path(self.path) / "model_index.json").is_file():
            raise BackboneError(f"backbone path {self.path!r} has no model_index.json: not a diffusers pipeline folder")
        if is_local:
            check_model_index(Path(self.path) / "model_index.json")
        try:
            self.family = _family_for(self.path, family)
        except FamilyError as exc:
            raise BackboneError(str(exc)) from None
        try:
            pipe = self.family.pipeline_class.from_pretrained(
                self.path, dtype=self.dtype, local_files_only=bool(local_files_only) or is_local,
                **(null_components(self.path) if is_local else {}))
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes one clear line
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackboneError(f"cannot load backbone from {self.path!r}: {msg}") from exc
        pipe.set_progress_bar_config(disable=True)
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        return pipe

    def _block_indices(self, feature_blocks: tuple[int, ...] | list[int]) -> tuple[int, ...]:
        """``backbone.feature_blocks`` as indices into the transformer's blocks (negative: from the end)."""
        n_blocks = len(self.blocks)
        blocks = []
        for b in feature_blocks:
            if not -n_blocks <= b < n_blocks:
                raise BackboneError(f"feature block {b} out of range for a transformer with {n_blocks} blocks")
            blocks.append(b % n_blocks)
        return tuple(blocks)

    def _install_hooks(self) -> list:
        """Forward hooks that capture the TPM's inputs during :meth:`step` (the feature blocks' image tokens, or
        the paper's ``pos_embed``/``norm_out`` outputs) and ``temb``."""
        hooks = []
        if self.feature_source == "blocks":
            for b in self.feature_blocks:
                hooks.append(self.blocks[b].register_forward_hook(
                    self._capture_hook(f"block{b}", tuple_index=1), with_kwargs=True))
        else:
            hooks.append(self.family.input_tokens(self.transformer).register_forward_hook(
                self._capture_hook("pos_embed"), with_kwargs=True))
            hooks.append(self.transformer.norm_out.register_forward_hook(self._capture_hook("norm_out"),
                                                                         with_kwargs=True))
        hooks.append(self.transformer.time_text_embed.register_forward_hook(self._capture_hook("temb"),
                                                                            with_kwargs=True))
        return hooks

    # ---------------------------------------------------------------- hooks
    def _capture_hook(self, name: str, tuple_index: int | None = None):
        def hook(module, args, kwargs, output):
            if self._capture:
                self._captured[name] = output[tuple_index] if isinstance(output, tuple) else output

        return hook

    # ---------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings for ``prompts`` on the backbone's device (each distinct prompt encoded once, cached on the
        CPU)."""
        missing = sorted({p for p in prompts if p not in self._embed_cache} - {None})
        if missing:
            self._warn_truncated([p for p in missing if p != self.negative_prompt])  # the run's prompts only
            embeds, pooled = self.family.encode(self.pipe, missing, self._text_device, self.max_sequence_length)
            for i, p in enumerate(missing):
                self._embed_cache[p] = (embeds[i].to("cpu", self.dtype), pooled[i].to("cpu", self.dtype))
        e = torch.stack([self._embed_cache[p][0] for p in prompts]).to(self.device)
        pl = torch.stack([self._embed_cache[p][1] for p in prompts]).to(self.device)
        return e, pl

    def _warn_truncated(self, prompts: list[str]) -> None:
        if not prompts:
            return
        limits = []
        for name, limit in (("tokenizer", self.pipe.tokenizer_max_length),
                            (self.family.t5_tokenizer, self.max_sequence_length)):
            tok = getattr(self.pipe, name, None)
            if tok is not None:
                lengths = [len(ids) for ids in tok(prompts, add_special_tokens=True)["input_ids"]]
                limits.append((name, limit, sum(n > limit for n in lengths)))
        too_long = max((n for _, _, n in limits), default=0)
        if too_long:
            which = ", ".join(f"{'CLIP' if n == 'tokenizer' else 'T5'} {lim} tokens" for n, lim, _ in limits)
            warn(f"{too_long} of {len(prompts)} distinct prompts are longer than the text encoders' limits ({which}) "
                 "and are truncated; raise backbone.max_sequence_length for T5 or shorten them")

    def offload_text_encoders(self, prompts: list[str]) -> int:
        """Encode ``prompts`` (and the negative prompt), then move the text encoders to the CPU.

        Returns the bytes of accelerator memory freed (0 when the backbone already runs on the CPU).
        Prompts that arrive later are still encoded, on the CPU."""
        self.encode_prompts(list(prompts) + [self.negative_prompt])
        if self.device.type == "cpu":
            return 0
        freed = 0
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                freed += sum(p.numel() * p.element_size() for p in module.parameters())
                module.to("cpu")
        self._text_device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return freed

    def fingerprint(self) -> str:
        """A short hash of the transformer's weights (a sample of every tensor): two backbones with the same
        shapes but different weights get different fingerprints."""
        h = hashlib.sha256()
        for name, t in sorted(self.transformer.state_dict().items()):
            flat = t.detach().reshape(-1)
            sample = torch.cat([flat[:8], flat[-8:], flat[:: max(1, flat.numel() // 64)][:64]]).float().cpu()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(sample.numpy().tobytes())
        return h.hexdigest()[:16]

    # ---------------------------------------------------------------- geometry
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        if height % (self.vae_scale * self.patch_size) or width % (self.vae_scale * self.patch_size):
            m = self.vae_scale * self.patch_size
            raise BackboneError(f"image size {height}x{width} must be a multiple of {m}")
        return (self.latent_channels, height // self.vae_scale, width // self.vae_scale)

    @property
    def num_blocks(self) -> int:
        """The blocks ``feature_blocks`` index (FLUX.1: double-stream then single-stream)."""
        return len(self.blocks)

    def default_sigmas(self, num_steps: int, latent_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """The backbone scheduler's own (shifted) sigmas for ``num_steps`` steps, ending with 0; FLUX.1's shift
        depends on the latent size ``latent_hw`` (h, w)."""
        return self.family.default_sigmas(self.pipe.scheduler, num_steps, latent_hw)

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, latents: torch.Tensor, sigma: torch.Tensor, prompt_embeds: torch.Tensor,
             pooled_embeds: torch.Tensor, need_features: bool = True) -> StepOutput:
        """One guided transformer call; CFG's two branches run as a single batched forward."""
        b = latents.shape[0]
        x = latents.to(self.device, self.dtype)
        t = sigma.to(self.device, torch.float32)
        pe = prompt_embeds.to(self.device, self.dtype)
        pp = pooled_embeds.to(self.device, self.dtype)
        cfg = self.uses_cfg
        if cfg:
            ne, npl = self.encode_prompts([self.negative_prompt])
            x = torch.cat([x, x])
            t = torch.cat([t, t])
            pe = torch.cat([ne.expand(b, -1, -1).to(pe.dtype), pe])
            pp = torch.cat([npl.expand(b, -1).to(pp.dtype), pp])
        self._captured = {}
        self._capture = need_features
        try:
            out = self.family.forward(self._forward, x, t, pe, pp, self.guidance_scale)
        finally:
            self._capture = False
        v = self._guide(out.float(), cfg)
        if not need_features:
            return StepOutput(v, torch.empty(0), torch.empty(0))
        gh, gw = latents.shape[-2] // self.patch_size, latents.shape[-1] // self.patch_size
        names = [f"block{blk}" for blk in self.feature_blocks] if self.feature_source == "blocks" else [
            "pos_embed", "norm_out"]
        feats = []
        for name in names:
            h = self._branch(self._captured[name].float(), cfg, b)
            h = h.transpose(1, 2).reshape(b, h.shape[-1], gh, gw)
            feats.append(F.adaptive_avg_pool2d(h, self.feature_grid))
        temb = self._branch(self._captured["temb"].float(), cfg, b)
        self._captured = {}
        return StepOutput(v, torch.cat(feats, dim=1), temb)

    def _guide(self, out: torch.Tensor, cfg: bool) -> torch.Tensor:
        if not cfg:
            return out
        uncond, cond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def _branch(self, h: torch.Tensor, cfg: bool, b: int) -> torch.Tensor:
        """The TPM's view of a captured tensor: the conditional branch (``blocks``) or the CFG combination
        (``paper``, as the official TPDM code does)."""
        if not cfg:
            return h
        return self._guide(h, cfg) if self.feature_source == "paper" else h[-b:]

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
