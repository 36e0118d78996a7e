"""Build a tiny, random, fully offline Stable Diffusion 3 pipeline folder.

The tiny backbone is the embedded default for the demo and the tests: it has SD3's shapes where they
matter to us (16 latent channels, patch size 2, 8x VAE, two CLIP text encoders plus T5, joint
attention blocks) but a few thousand parameters per module, so a denoising step costs milliseconds on
a CPU. It is written with diffusers' own ``save_pretrained`` so that
``StableDiffusion3Pipeline.from_pretrained(dir)`` loads it exactly like a real checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from tpdm_rl.builders.tokenizers import T5_CHARS, WORD_START, character_pieces, clip_tokenizer, t5_tokenizer
from tpdm_rl.core.files import replace_folder

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, T5TokenizerFast

    from tpdm_rl.core.config import Config

TINY_HIDDEN = 32  # transformer width = heads * head_dim
TINY_CLIP_HIDDEN = 16  # two CLIPs concatenated = 32 = T5 d_model = joint_attention_dim
TINY_T5_MAX_LEN = 32


def tiny_clip_tokenizer() -> tuple[CLIPTokenizer, int]:
    """A byte-level CLIPTokenizer (no merges) built offline; returns (tokenizer, vocab size)."""
    tok = clip_tokenizer()
    return tok, tok.vocab_size


def tiny_t5_tokenizer() -> tuple[T5TokenizerFast, int]:
    """A unigram T5 tokenizer of single characters (``TINY_T5_MAX_LEN`` tokens); returns (tokenizer, vocab size)."""
    tok = t5_tokenizer([(WORD_START, -1.0), *character_pieces(T5_CHARS, -2.0, -1.5)], TINY_T5_MAX_LEN)
    return tok, tok.vocab_size


def tiny_vae(sample_size: int, shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    """The tiny backbones' VAE (16 latent channels, 8x down, 8 channels wide), with a family's latent scaling."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                         latent_channels=16, norm_num_groups=4, sample_size=sample_size, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor)


def build_tiny_pipeline(seed: int = 0, sample_size: int = 128):
    """Return a random tiny ``StableDiffusion3Pipeline`` (deterministic for a given seed).

    ``sample_size`` is the default image size in pixels; the transformer's positional embedding
    supports up to 4x that.
    """

    latent = sample_size // 8
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=latent, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=TINY_HIDDEN, caption_projection_dim=TINY_HIDDEN,
            pooled_projection_dim=2 * TINY_CLIP_HIDDEN, out_channels=16, pos_embed_max_size=4 * latent // 2,
        )
        vae = tiny_vae(sample_size, shift_factor=0.0609, scaling_factor=1.5035)
        clip_tok, clip_vocab = tiny_clip_tokenizer()
        clip_cfg = dict(
            vocab_size=clip_vocab,
            hidden_size=TINY_CLIP_HIDDEN,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=TINY_CLIP_HIDDEN,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
            hidden_act="gelu",
        )
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg))
        t5_tok, t5_vocab = tiny_t5_tokenizer()
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=t5_vocab, d_model=TINY_HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ))
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    finally:
        torch.random.set_rng_state(gen_state)
    for m in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        m.eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tok,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok,
    )


def make_tiny_backbone(directory: str | os.PathLike, seed: int = 0, sample_size: int = 128) -> Path:
    """Write the tiny pipeline to ``directory`` (created if needed) and return its path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(seed=seed, sample_size=sample_size)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "tpdm_tiny.json").write_text(json.dumps({"seed": seed, "sample_size": sample_size}) + "\n")
    return out


def ensure_tiny_backbone(directory: str | os.PathLike, seed: int = 0, sample_size: int = 128) -> Path:
    """Build the tiny backbone in ``directory`` unless a matching one is already there."""
    out = Path(directory)
    marker = out / "tpdm_tiny.json"
    if marker.is_file() and (out / "model_index.json").is_file():
        try:
            meta = json.loads(marker.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta == {"seed": seed, "sample_size": sample_size}:
            return out
    with replace_folder(out) as tmp:
        make_tiny_backbone(tmp, seed=seed, sample_size=sample_size)
    return out


def resolve_backbone_path(path: str, tiny_dir: str | Path, tiny_seed: int, resolution: int) -> str:
    """Empty: the tiny random backbone, built once in ``tiny_dir``; anything else as given: ``builtin:toy`` /
    ``builtin:toy-places`` (the shipped trained toy backbones, which :class:`Backbone` resolves, so TPM files record
    the name and work in any clone), a local diffusers folder or a hub id."""
    if path:
        return path
    return str(ensure_tiny_backbone(tiny_dir, seed=tiny_seed, sample_size=min(resolution, 128)))


def run_backbone_path(cfg: Config, output: str | Path) -> str:
    """The backbone a run into ``output`` loads: :func:`resolve_backbone_path` with ``backbone.tiny_dir`` (default
    ``<output>/tiny_backbone``). The applications (``tpdm-rl train``, a sweep trial) resolve it for the
    :class:`~tpdm_rl.training.controller.Controller`, which imports no builder."""
    tiny_dir = cfg.backbone.tiny_dir or str(Path(output) / "tiny_backbone")
    return resolve_backbone_path(cfg.backbone.path, str(Path(tiny_dir).resolve()), cfg.backbone.tiny_seed,
                                 cfg.backbone.resolution)
