"""Real-size Stable Diffusion 3 and FLUX.1 pipeline folders with random weights, built offline (no download).

``make_random_backbone(dir, "sd3-medium")`` writes a diffusers folder whose components carry the
*real* configurations of the published checkpoints (the MMDiT transformer of SD3 medium, SD3.5 medium
or SD3.5 large, CLIP ViT-L/14 and OpenCLIP bigG text encoders, the T5 v1.1 XXL encoder, SD3's
16-channel VAE, the rectified-flow scheduler) and random weights, so
``StableDiffusion3Pipeline.from_pretrained(dir)`` loads it like the real thing: memory, speed,
sharding and dtype behave as with the real weights, only the images are noise. Use it to size
machines, time rollouts and test multi-GPU code where the real checkpoints cannot be downloaded.

``make_random_backbone(dir, "flux-dev")`` (or ``"flux-schnell"``) does the same for FLUX.1: the
``FluxTransformer2DModel`` of 19 double-stream and 38 single-stream blocks (width 3072, 24 heads of 128,
with the guidance embedder for dev only), CLIP ViT-L/14 (``CLIPTextModel``, pooled output only) and
T5 v1.1 XXL, FLUX's 16-channel VAE and the scheduler of the checkpoint (dev: resolution-dependent
shift; schnell: none), loaded with ``FluxPipeline.from_pretrained(dir)``.

The tokenizers are stand-ins with the real vocabulary sizes and special-token ids (CLIP: 49408
entries, ``<|startoftext|>``/``<|endoftext|>`` = 49406/49407, 77 tokens; T5: 32000 pieces plus 100
``<extra_id_N>``, ``<pad>``/``</s>``/``<unk>`` = 0/1/2, 512 tokens) but no learned merges: they split
text into byte-level characters (CLIP) or single characters (T5).

Components are built one at a time, directly in the target dtype, saved and freed, so the peak
memory is about the largest component (the T5-XXL encoder, 4.76e9 parameters, the SD3.5-large
transformer, 8.06e9, or the FLUX.1 transformer, 11.9e9). Before anything is written the disk and
memory needs are computed from the parameter counts of the models built on the meta device and
compared with what the machine has.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from tpdm_rl.builders.tokenizers import T5_CHARS, WORD_START, character_pieces, clip_tokenizer, t5_tokenizer
from tpdm_rl.core.defaults import FLUX_PRESETS, PRESETS
from tpdm_rl.core.devices import DTYPE_ALIASES, DTYPES
from tpdm_rl.core.files import replace_folder, write_json_atomic

#: the model components, in the order they are built and written (SD3; FLUX.1 in ``FLUX_MODELS``)
MODELS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer")
#: FLUX.1's: CLIP-L (pooled output), T5-XXL, the VAE, the transformer
FLUX_MODELS = ("text_encoder", "text_encoder_2", "vae", "transformer")
MARKER = "tpdm_random.json"
CLIP_VOCAB = 49408
CLIP_MAX_LENGTH = 77
T5_MODEL_VOCAB = 32128  # the T5 v1.1 embedding table: 32000 pieces + 100 extra ids + 28 unused rows
T5_PIECES = 32000
T5_EXTRA_IDS = 100
T5_MAX_LENGTH = 512
#: disk for the configs and tokenizer files (a few MB) and some slack
DISK_SLACK = 64 * 2**20
#: memory for the interpreter and the libraries (torch, diffusers, transformers: ~0.8 GB) beside the
#: largest component
MEMORY_SLACK = 3 * 2**29
SHARD_SIZE = "5GB"


class RandomBackboneError(ValueError):
    """The random backbone cannot be written here (folder in use, too little disk or memory)."""


class PresetError(RandomBackboneError):
    """A bad request: unknown preset or dtype, a bad layer count, inconsistent overrides."""


def is_flux(preset: str) -> bool:
    """Whether ``preset`` is a FLUX.1 one (``FluxPipeline``) rather than an SD3 one."""
    return preset in FLUX_PRESETS


def models(preset: str) -> tuple[str, ...]:
    """The model components of ``preset``'s pipeline, in build order."""
    return FLUX_MODELS if is_flux(preset) else MODELS


def _transformer_config(preset: str) -> dict[str, Any]:
    # diffusers' scripts/convert_sd3_to_diffusers.py: heads = depth, head dim 64, caption projection
    # = 64 * depth; SD3.5 adds RMS qk-norm; SD3.5 medium adds a second (self-)attention to blocks 0-12
    # and a 384 x 384 positional grid (SD3 medium and SD3.5 large: 192 x 192)
    depth = {"sd3-medium": 24, "sd3.5-medium": 24, "sd3.5-large": 38}[preset]
    return {
        "sample_size": 128,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": depth,
        "attention_head_dim": 64,
        "num_attention_heads": depth,
        "joint_attention_dim": 4096,
        "caption_projection_dim": 64 * depth,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 384 if preset == "sd3.5-medium" else 192,
        "dual_attention_layers": tuple(range(13)) if preset == "sd3.5-medium" else (),
        "qk_norm": None if preset == "sd3-medium" else "rms_norm",
    }


def _clip_config(hidden: int, layers: int, heads: int, act: str) -> dict[str, Any]:
    # the token ids are those of SD3's text_encoder/config.json (bos 0, eos 2, pad 1): eos 2 selects
    # CLIP's original pooling at the highest token id, which is <|endoftext|> (49407)
    return {
        "vocab_size": CLIP_VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "projection_dim": hidden,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def _base_configs() -> dict[str, dict[str, Any]]:
    return {
        "text_encoder": _clip_config(768, 12, 12, "quick_gelu"),  # CLIP ViT-L/14
        "text_encoder_2": _clip_config(1280, 32, 20, "gelu"),  # OpenCLIP ViT-bigG/14
        "text_encoder_3": _t5_config(),
        "vae": _vae_config(scaling_factor=1.5305, shift_factor=0.0609),
    }


def _t5_config() -> dict[str, Any]:
    """google/t5-v1_1-xxl, encoder only (SD3's text_encoder_3, FLUX.1's text_encoder_2)."""
    return {
        "vocab_size": T5_MODEL_VOCAB,
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_decoder_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.1,
        "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": True,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def _vae_config(scaling_factor: float, shift_factor: float) -> dict[str, Any]:
    """SDXL's VAE layout with 16 latent channels, no (post-)quant convs (SD3 and FLUX.1: only the latent
    scaling and shift differ)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 16,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "force_upcast": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


def flux_rope_axes(attention_head_dim: int) -> tuple[int, int, int]:
    """The rotary dims of FLUX's three position axes (text/index, row, column) for a head width: they fill the
    head (sum = ``attention_head_dim``), each even, in FLUX's proportion 1/8 : 7/16 : 7/16 ((16, 56, 56) at 128)
    as far as evenness allows; e.g. (4, 6, 6) at 16."""
    if isinstance(attention_head_dim, bool) or not isinstance(attention_head_dim, int) or attention_head_dim < 6 \
            or attention_head_dim % 2:
        raise PresetError(f"make-random-backbone: a FLUX head width must be an even integer >= 6, got "
                          f"{attention_head_dim!r}")
    side = 2 * ((attention_head_dim - 2 * max(1, round(attention_head_dim / 16))) // 4)
    return (attention_head_dim - 2 * side, side, side)


def _flux_configs(preset: str) -> dict[str, dict[str, Any]]:
    # black-forest-labs/FLUX.1-dev and FLUX.1-schnell: the same transformer but for dev's guidance embedder
    # (guidance distillation); CLIP ViT-L/14 text (pooled output), T5 v1.1 XXL, FLUX's VAE
    return {
        "text_encoder": _clip_config(768, 12, 12, "quick_gelu"),
        "text_encoder_2": _t5_config(),
        "vae": _vae_config(scaling_factor=0.3611, shift_factor=0.1159),
        "transformer": {
            "patch_size": 1,
            "in_channels": 64,  # 16 latent channels packed in 2 x 2 patches by the pipeline
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": preset == "flux-dev",
            "axes_dims_rope": (16, 56, 56),
        },
    }


def scheduler_config(preset: str) -> dict[str, Any]:
    """Keywords of ``preset``'s ``FlowMatchEulerDiscreteScheduler``: SD3's fixed shift 3; FLUX.1-dev's shift that
    grows with the image's token count (``mu`` of diffusers' ``calculate_shift``: 0.5 at 256 tokens, 1.15 at
    4096); FLUX.1-schnell's unshifted schedule."""
    _check_name("preset", preset, PRESETS)
    if not is_flux(preset):
        return {"num_train_timesteps": 1000, "shift": 3.0}
    dev = preset == "flux-dev"
    return {"num_train_timesteps": 1000, "shift": 3.0 if dev else 1.0, "use_dynamic_shifting": dev,
            "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}


def _check_name(kind: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PresetError(f"make-random-backbone: unknown {kind} {value!r} (choices: {', '.join(choices)})")


def _dtype_name(dtype: str) -> str:
    name = DTYPE_ALIASES.get(str(dtype), str(dtype))
    _check_name("dtype", name, tuple(DTYPES))
    return name


def configs(preset: str, no_t5: bool = False, layers: int | None = None,
            overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The configuration (constructor keywords) of each model component; without T5 when ``no_t5``.

    ``layers`` sets the transformer depth: SD3: N joint blocks (SD3.5's dual-attention blocks are then
    those below N); FLUX.1: N double-stream and 2N single-stream blocks (the real 19 + 38 keep that ratio).
    ``overrides`` (component -> {key: value}) changes existing keys, e.g. for scaled-down test builds.
    The result is checked for consistency (widths the pipeline joins must match).
    """
    _check_name("preset", preset, PRESETS)
    flux = is_flux(preset)
    if flux:
        cfgs = _flux_configs(preset)
    else:
        cfgs = _base_configs()
        cfgs["transformer"] = _transformer_config(preset)
    for name, changes in (overrides or {}).items():
        _check_name("component", name, models(preset))
        unknown = sorted(set(changes) - set(cfgs[name]))
        if unknown:
            raise PresetError(f"make-random-backbone: {name} has no configuration key(s) {', '.join(unknown)}")
        cfgs[name].update(changes)
    tr = cfgs["transformer"]
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise PresetError(f"make-random-backbone: --layers must be a positive integer, got {layers!r}")
        tr["num_layers"] = layers
        if flux:
            tr["num_single_layers"] = 2 * layers
    if flux:
        if no_t5:
            del cfgs["text_encoder_2"]
        _check_flux_consistent(cfgs)
        return {name: cfgs[name] for name in FLUX_MODELS if name in cfgs}
    tr["dual_attention_layers"] = tuple(i for i in tr["dual_attention_layers"] if i < tr["num_layers"])
    if no_t5:
        del cfgs["text_encoder_3"]
    _check_consistent(cfgs)
    return {name: cfgs[name] for name in MODELS if name in cfgs}


def _fail_unless(rules: list[tuple[bool, str]]) -> None:
    for ok, message in rules:
        if not ok:
            raise PresetError(f"make-random-backbone: inconsistent configuration: {message}")


def _check_flux_consistent(cfgs: dict[str, dict[str, Any]]) -> None:
    tr, te, vae = cfgs["transformer"], cfgs["text_encoder"], cfgs["vae"]
    axes = tuple(tr["axes_dims_rope"])
    rules = [
        (len(axes) == 3 and all(a > 0 and a % 2 == 0 for a in axes),
         "transformer axes_dims_rope must be three positive even numbers"),
        (sum(axes) == tr["attention_head_dim"], "transformer axes_dims_rope must add up to attention_head_dim"),
        (tr["pooled_projection_dim"] == te["hidden_size"],
         "transformer pooled_projection_dim must equal the CLIP hidden size (its pooled output)"),
        (tr["in_channels"] == 4 * vae["latent_channels"] and tr["patch_size"] == 1,
         "transformer in_channels must be 4 x the VAE's latent channels (2 x 2 packing) with patch_size 1"),
    ]
    if "text_encoder_2" in cfgs:
        rules.append((tr["joint_attention_dim"] == cfgs["text_encoder_2"]["d_model"],
                      "transformer joint_attention_dim must equal the T5 d_model"))
    _fail_unless(rules)


def _check_consistent(cfgs: dict[str, dict[str, Any]]) -> None:
    tr, te, te2, vae = cfgs["transformer"], cfgs["text_encoder"], cfgs["text_encoder_2"], cfgs["vae"]
    rules = [
        (tr["num_attention_heads"] * tr["attention_head_dim"] == tr["caption_projection_dim"],
         "transformer heads x head dim must equal caption_projection_dim"),
        (tr["pooled_projection_dim"] == te["projection_dim"] + te2["projection_dim"],
         "transformer pooled_projection_dim must equal the two CLIP projection dims together"),
        (tr["joint_attention_dim"] >= te["hidden_size"] + te2["hidden_size"],
         "transformer joint_attention_dim must hold the two CLIP hidden sizes together"),
        (tr["in_channels"] == tr["out_channels"] == vae["latent_channels"],
         "transformer in/out channels must equal the VAE's latent channels"),
    ]
    if "text_encoder_3" in cfgs:
        rules.append((tr["joint_attention_dim"] == cfgs["text_encoder_3"]["d_model"],
                      "transformer joint_attention_dim must equal the T5 d_model"))
    _fail_unless(rules)


def _construct(name: str, cfg: dict[str, Any], flux: bool = False) -> torch.nn.Module:
    """Build one component (of an SD3 pipeline, or of a FLUX.1 one when ``flux``) with the current default
    device and dtype (random init)."""
    if flux:
        if name == "transformer":
            return FluxTransformer2DModel(**cfg)
        if name == "vae":
            return AutoencoderKL(**cfg)
        if name == "text_encoder_2":
            return T5EncoderModel(T5Config(**cfg))
        return CLIPTextModel(CLIPTextConfig(**cfg))
    if name == "transformer":
        return SD3Transformer2DModel(**cfg)
    if name == "vae":
        return AutoencoderKL(**cfg)
    if name == "text_encoder_3":
        return T5EncoderModel(T5Config(**cfg))
    return CLIPTextModelWithProjection(CLIPTextConfig(**cfg))


def _count(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters, elements of persistent buffers) of ``model``, tied tensors counted once."""
    params = {id(p): p.numel() for p in model.parameters()}
    saved = {id(t): t.numel() for t in model.state_dict(keep_vars=True).values()}
    return sum(params.values()), sum(n for key, n in saved.items() if key not in params)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating tensors not yet in ``dtype`` (the buffers computed in float32) in place.

    (diffusers' ``ModelMixin.to(dtype)`` would do it too, with a warning about float32 modules.)
    """
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                module._buffers[key] = buf.to(dtype)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (no float32 copy at real size)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def shrunk_overrides(attention_head_dim: int, sample_size: int,
                     preset: str = "sd3-medium") -> dict[str, dict[str, Any]]:
    """``overrides`` that shrink every width to a few dozen (2 heads, 16-wide CLIPs, 32-wide T5, 8-channel VAE), for
    tests and smoke runs of the real-size code paths; the transformer's head width and latent size as given.

    For a FLUX.1 ``preset`` the rotary axes are re-split to fill the head (``flux_rope_axes``: sum =
    ``attention_head_dim``) and ``sample_size`` is not used (FLUX's rotary positions have no grid to size).
    """
    _check_name("preset", preset, PRESETS)
    if is_flux(preset):
        return {
            "transformer": {"num_attention_heads": 2, "attention_head_dim": attention_head_dim,
                            "axes_dims_rope": flux_rope_axes(attention_head_dim), "joint_attention_dim": 32,
                            "pooled_projection_dim": 16},
            "text_encoder": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "projection_dim": 16},
            "text_encoder_2": {"d_model": 32, "d_ff": 32, "d_kv": 8, "num_heads": 4, "num_layers": 1,
                               "relative_attention_num_buckets": 8},
            "vae": {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4,
                    "sample_size": 64},
        }
    return {
        "transformer": {"num_attention_heads": 2, "attention_head_dim": attention_head_dim,
                        "caption_projection_dim": 2 * attention_head_dim, "joint_attention_dim": 32,
                        "pooled_projection_dim": 32, "pos_embed_max_size": 2 * sample_size, "sample_size": sample_size},
        **{clip: {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "projection_dim": 16} for clip in ("text_encoder", "text_encoder_2")},
        "text_encoder_3": {"d_model": 32, "d_ff": 32, "d_kv": 8, "num_heads": 4, "num_layers": 1,
                           "relative_attention_num_buckets": 8},
        "vae": {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64},
    }


def estimate(preset: str, no_t5: bool = False, dtype: str = "bfloat16", layers: int | None = None,
             overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Parameter counts and bytes of each component (models built on the meta device: no memory).

    ``bytes`` is what a component's weights take on disk and in memory in ``dtype`` (parameters and
    persistent buffers such as the transformer's positional grid); ``disk_bytes`` the whole folder;
    ``memory_bytes`` the estimated peak of a build: the largest component, the float32/float64
    intermediates of its buffers (built in float32 before the cast), plus ``MEMORY_SLACK``.
    """
    name = _dtype_name(dtype)
    itemsize = DTYPES[name].itemsize
    cfgs = configs(preset, no_t5=no_t5, layers=layers, overrides=overrides)
    components: dict[str, dict[str, Any]] = {}
    peak, peak_name = 0, ""
    with torch.device("meta"):
        for comp, cfg in cfgs.items():
            model = _construct(comp, cfg, flux=is_flux(preset))
            params, buffers = _count(model)
            nbytes = (params + buffers) * itemsize
            components[comp] = {"class": type(model).__name__, "params": params, "buffer_elements": buffers,
                                "bytes": nbytes}
            # buffers (the sin-cos grid) are computed in float64 and kept in float32 until the cast:
            # ~16 bytes per element at the peak (measured), before the parameters are allocated
            need = max(nbytes + 4 * buffers, 16 * buffers)
            if need > peak:
                peak, peak_name = need, comp
            del model
    total = sum(c["bytes"] for c in components.values())
    return {
        "preset": preset, "dtype": name, "no_t5": bool(no_t5), "layers": layers,
        "components": components,
        "params": sum(c["params"] for c in components.values()),
        "weights_bytes": total,
        "disk_bytes": total + DISK_SLACK,
        "largest": peak_name,
        "memory_bytes": peak + MEMORY_SLACK,
    }


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no /proc/meminfo)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_disk(directory: str | os.PathLike) -> int:
    """Free bytes on the file system that ``directory`` (or its nearest existing parent) is on."""
    return shutil.disk_usage(_existing_ancestor(Path(directory).parent)).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_resources(directory: str | os.PathLike, est: Mapping[str, Any]) -> None:
    """One-line ``RandomBackboneError`` when ``directory`` is in use or the disk or memory is too small."""
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RandomBackboneError(f"make-random-backbone: {str(out)!r} exists and is not an empty folder; "
                                  "choose a new one")
    what = f"a random {est['preset']} backbone ({est['dtype']}{', no T5' if est['no_t5'] else ''})"
    where = _existing_ancestor(out.parent)
    free = free_disk(out)
    if free < est["disk_bytes"]:
        raise RandomBackboneError(f"make-random-backbone: {what} needs {_gb(est['disk_bytes'])} of disk but "
                                  f"{str(where)!r} has {_gb(free)} free")
    avail = available_memory()
    if avail is not None and avail < est["memory_bytes"]:
        largest = est["largest"]
        raise RandomBackboneError(
            f"make-random-backbone: {what} needs about {_gb(est['memory_bytes'])} of memory to build its largest "
            f"component ({largest}, {_gb(est['components'][largest]['bytes'])}) but {_gb(avail)} are "
            "available (MemAvailable)")


def _clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with the real vocabulary size and special ids but no merges."""
    return clip_tokenizer(size=CLIP_VOCAB, max_length=CLIP_MAX_LENGTH, pad_token=pad_token)


def _t5_tokenizer():
    """A unigram T5 tokenizer: 32000 pieces (characters, then unused fillers) + 100 extra ids."""
    pieces = [(WORD_START, -1.0), *character_pieces(T5_CHARS, -2.0, -1.5)]
    return t5_tokenizer(pieces, T5_MAX_LENGTH, size=T5_PIECES, extra_ids=T5_EXTRA_IDS)


def _seed_for(seed: int, component: str) -> int:
    """An independent seed per component, so leaving out T5 or changing depth keeps the others."""
    digest = hashlib.sha256(f"tpdm-random-backbone:{seed}:{component}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _library(obj: Any) -> list[str | None]:
    if obj is None:
        return [None, None]
    return [type(obj).__module__.split(".")[0], type(obj).__name__]


def _tokenizers_and_index(preset: str, no_t5: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer name -> tokenizer or None, model_index.json before the models) of ``preset``'s pipeline."""
    if is_flux(preset):
        tokenizers = {"tokenizer": _clip_tokenizer("<|endoftext|>"), "tokenizer_2": None if no_t5 else _t5_tokenizer()}
        pipeline, t5 = "FluxPipeline", "text_encoder_2"
    else:
        tokenizers = {"tokenizer": _clip_tokenizer("<|endoftext|>"), "tokenizer_2": _clip_tokenizer("!"),
                      "tokenizer_3": None if no_t5 else _t5_tokenizer()}
        pipeline, t5 = "StableDiffusion3Pipeline", "text_encoder_3"
    index: dict[str, Any] = {"_class_name": pipeline,
                             "_diffusers_version": diffusers.__version__,
                             "feature_extractor": [None, None], "image_encoder": [None, None],
                             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                             **{k: _library(v) for k, v in tokenizers.items()}, t5: [None, None]}
    return tokenizers, index


def make_random_backbone(directory: str | os.PathLike, preset: str, no_t5: bool = False, dtype: str = "bfloat16",
                         seed: int = 0, layers: int | None = None,
                         overrides: Mapping[str, Mapping[str, Any]] | None = None,
                         progress: Callable[[str], None] | None = None) -> Path:
    """Write a random ``preset`` SD3 or FLUX.1 pipeline to the new (or empty) folder ``directory``; return its path.

    Deterministic for ``seed``. Nothing is written when the request is bad or the disk or memory is too
    small (``RandomBackboneError``, one line). The components are written into a sibling folder that
    is renamed to ``directory`` at the end, so an interrupted build leaves no half folder behind.
    Without T5 (``no_t5``) ``text_encoder_3`` and ``tokenizer_3`` (FLUX.1: ``text_encoder_2`` and
    ``tokenizer_2``) are null in model_index.json: load such a folder with
    ``from_pretrained(dir, text_encoder_3=None, tokenizer_3=None)`` (see ``null_components``); the SD3
    pipeline then feeds zeros in place of the T5 embeddings, while ``FluxPipeline`` has no such fallback
    and needs ``prompt_embeds`` and ``pooled_prompt_embeds`` passed in. ``layers``: see ``configs``.
    ``MARKER`` records the request and the parameter counts.
    """
    say = progress or (lambda _msg: None)
    out = Path(directory)
    est = estimate(preset, no_t5=no_t5, dtype=dtype, layers=layers, overrides=overrides)
    check_resources(out, est)
    cfgs = configs(preset, no_t5=no_t5, layers=layers, overrides=overrides)
    torch_dtype = DTYPES[est["dtype"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    with replace_folder(out) as tmp:  # out is new or empty (checked above)
        FlowMatchEulerDiscreteScheduler(**scheduler_config(preset)).save_pretrained(tmp / "scheduler")
        tokenizers, index = _tokenizers_and_index(preset, no_t5)
        for name, tok in tokenizers.items():
            if tok is not None:
                tok.save_pretrained(tmp / name)
        for name, cfg in cfgs.items():
            t0 = time.perf_counter()
            c = est["components"][name]  # said before the build: T5-XXL alone takes over a minute to write
            say(f"{name}: building and writing {c['class']} ({c['params'] / 1e9:.3f}e9 parameters, {_gb(c['bytes'])}) ...")
            with torch.random.fork_rng(devices=[]), torch.device("cpu"), default_dtype(torch_dtype):
                torch.manual_seed(_seed_for(seed, name))
                model = _construct(name, cfg, flux=is_flux(preset))
                _cast(model, torch_dtype)
            model.save_pretrained(tmp / name, safe_serialization=True, max_shard_size=SHARD_SIZE)
            index[name] = _library(model)
            del model
            gc.collect()
            say(f"{name}: written ({time.perf_counter() - t0:.0f} s)")
        (tmp / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
        write_json_atomic(tmp / MARKER, {
            "preset": preset, "seed": seed, "dtype": est["dtype"], "no_t5": bool(no_t5), "layers": layers,
            "overrides": overrides or {},
            "params": {k: c["params"] for k, c in est["components"].items()},
            "bytes": {k: c["bytes"] for k, c in est["components"].items()},
        })
    return out
