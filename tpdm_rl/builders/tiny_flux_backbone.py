"""Build a tiny, random, fully offline FLUX.1 pipeline folder (the FLUX counterpart of ``tiny_backbone``).

It has FLUX.1's structure where it matters to a sampler: 16 latent channels packed by the pipeline into
2 x 2 patches (64 transformer input channels, patch size 1), an 8x VAE, double-stream then single-stream
blocks with rotary positions over three axes, a CLIP text encoder read through its pooled output only,
a T5 encoder for the token sequence, and (``guidance_embeds``, as FLUX.1-dev) a guidance embedding; but
widths of a few dozen, so a denoising step costs milliseconds on a CPU. It is written with diffusers' own
``save_pretrained`` so that ``FluxPipeline.from_pretrained(dir)`` loads it like a real checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from tpdm_rl.builders.random_backbone import scheduler_config
from tpdm_rl.builders.tiny_backbone import tiny_clip_tokenizer, tiny_t5_tokenizer, tiny_vae
from tpdm_rl.core.files import replace_folder

TINY_FLUX_HEADS = 2
TINY_FLUX_HEAD_DIM = 16  # rotary axes (4, 6, 6) fill it, as (16, 56, 56) fill FLUX.1's 128
TINY_FLUX_CLIP_HIDDEN = 16  # = pooled_projection_dim (FLUX reads CLIP's pooled output only)
TINY_FLUX_T5_HIDDEN = 32  # = joint_attention_dim
MARKER = "tpdm_tiny_flux.json"


def build_tiny_flux_pipeline(seed: int = 0, sample_size: int = 128, guidance_embeds: bool = True) -> FluxPipeline:
    """Return a random tiny ``FluxPipeline`` (deterministic for a given seed; the global torch RNG is restored).

    ``guidance_embeds``: a guidance-distilled transformer with FLUX.1-dev's scheduler (shift growing with the
    image's token count); without it FLUX.1-schnell's (no guidance input, no shift). ``sample_size`` is the
    VAE's nominal image size in pixels; ``FluxPipeline`` itself defaults to 1024 px whatever the folder says,
    so pass ``height`` and ``width`` (multiples of 16).
    """
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=TINY_FLUX_HEAD_DIM,
            num_attention_heads=TINY_FLUX_HEADS, joint_attention_dim=TINY_FLUX_T5_HIDDEN,
            pooled_projection_dim=TINY_FLUX_CLIP_HIDDEN, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
        )
        vae = tiny_vae(sample_size, shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's latent scaling
        clip_tok, clip_vocab = tiny_clip_tokenizer()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=clip_vocab, hidden_size=TINY_FLUX_CLIP_HIDDEN, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=TINY_FLUX_CLIP_HIDDEN,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id, hidden_act="quick_gelu",
        ))
        t5_tok, t5_vocab = tiny_t5_tokenizer()
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=t5_vocab, d_model=TINY_FLUX_T5_HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        ))
        scheduler = FlowMatchEulerDiscreteScheduler(
            **scheduler_config("flux-dev" if guidance_embeds else "flux-schnell"))
    finally:
        torch.random.set_rng_state(gen_state)
    for m in (transformer, vae, text_encoder, text_encoder_2):
        m.eval()
    return FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
    )


def make_tiny_flux_backbone(directory: str | os.PathLike, seed: int = 0, sample_size: int = 128,
                            guidance_embeds: bool = True) -> Path:
    """Write the tiny FLUX.1 pipeline to ``directory`` (replacing what is there, never half written) and return
    its path; ``MARKER`` records the arguments."""
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_flux_pipeline(seed=seed, sample_size=sample_size, guidance_embeds=guidance_embeds)
    with replace_folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER).write_text(json.dumps(
            {"seed": seed, "sample_size": sample_size, "guidance_embeds": guidance_embeds}) + "\n")
    return out
