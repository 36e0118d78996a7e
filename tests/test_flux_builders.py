"""FLUX.1 pipeline folders built offline: the tiny random one, and the real-configuration presets.

The full-size checks (flux-dev, flux-schnell: 11.9e9 transformer parameters) run on the meta device. The build
that writes and loads keeps the real widths of the transformer (3072 = 24 heads x 128, rotary axes (16, 56, 56),
T5-width context embedder 4096 -> 3072), of CLIP-L (768) and of the VAE, with 1 double-stream and 2
single-stream blocks (``layers=1``), 1 CLIP layer and no T5 (~0.82e9 parameters, ~1.6 GB in bfloat16), as the
SD3 real-width test in tests/test_random_backbone.py does. The T5 path (real vocabulary and tokenizer,
text_encoder_2 saved and loaded) is covered by a build shrunk to tiny widths that also denoises.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open
from tpdm_rl.rollout.backbone import Backbone, null_components

from tpdm_rl.builders import random_backbone as rb
from tpdm_rl.builders.random_backbone import (
    MARKER,
    PresetError,
    RandomBackboneError,
    configs,
    estimate,
    flux_rope_axes,
    make_random_backbone,
    scheduler_config,
    shrunk_overrides,
)
from tpdm_rl.builders.tiny_flux_backbone import build_tiny_flux_pipeline, make_tiny_flux_backbone
from tpdm_rl.core.defaults import FLUX_PRESETS, PRESETS

WEIGHTS = ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
           "text_encoder/model.safetensors", "text_encoder_2/model.safetensors")


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _generate(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                max_sequence_length=32, generator=torch.Generator().manual_seed(seed)).images


def test_tiny_flux_folder_loads_and_generates_deterministically(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = torch.random.get_rng_state()
    a = make_tiny_flux_backbone(tmp_path / "a", seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left as it was
    b = make_tiny_flux_backbone(tmp_path / "b", seed=0)
    c = make_tiny_flux_backbone(tmp_path / "c", seed=1)
    assert [_digest(a / f) for f in WEIGHTS] == [_digest(b / f) for f in WEIGHTS]
    assert _digest(a / WEIGHTS[0]) != _digest(c / WEIGHTS[0])
    assert json.loads((a / "tpdm_tiny_flux.json").read_text()) == {"seed": 0, "sample_size": 128,
                                                                   "guidance_embeds": True}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left behind
    assert json.loads((a / "model_index.json").read_text())["_class_name"] == "FluxPipeline"

    pipe = FluxPipeline.from_pretrained(a)
    tr = pipe.transformer
    assert (tr.config.patch_size, tr.config.in_channels, tr.config.num_layers, tr.config.num_single_layers) == (
        1, 64, 2, 2)
    assert (tr.config.num_attention_heads, tr.config.attention_head_dim, tuple(tr.config.axes_dims_rope)) == (
        2, 16, (4, 6, 6))
    assert (tr.config.joint_attention_dim, tr.config.pooled_projection_dim, tr.config.guidance_embeds) == (32, 16, True)
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    assert pipe.text_encoder.config.hidden_size == 16 and pipe.text_encoder_2.config.d_model == 32
    assert pipe.tokenizer_2.model_max_length == 32
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.max_shift == 1.15
    first = _generate(pipe)
    assert first.shape == (1, 3, 64, 64) and torch.isfinite(first).all()
    assert torch.equal(first, _generate(pipe))
    assert torch.equal(first, _generate(FluxPipeline.from_pretrained(b)))
    assert not torch.equal(first, _generate(FluxPipeline.from_pretrained(c)))

    schnell = build_tiny_flux_pipeline(seed=0, guidance_embeds=False)
    assert not schnell.transformer.config.guidance_embeds
    assert not schnell.scheduler.config.use_dynamic_shifting and schnell.scheduler.config.shift == 1.0
    assert _generate(schnell).shape == (1, 3, 64, 64)


def test_flux_presets_carry_the_real_configurations():
    assert set(FLUX_PRESETS) == {"flux-dev", "flux-schnell"} and set(FLUX_PRESETS) <= set(PRESETS)
    for preset in FLUX_PRESETS:
        c = configs(preset)
        assert list(c) == ["text_encoder", "text_encoder_2", "vae", "transformer"]
        assert c["transformer"] == {
            "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": preset == "flux-dev", "axes_dims_rope": (16, 56, 56)}
        vae = c["vae"]
        assert vae["down_block_types"] == ("DownEncoderBlock2D",) * 4 and vae["up_block_types"] == (
            "UpDecoderBlock2D",) * 4
        assert (vae["block_out_channels"], vae["layers_per_block"], vae["latent_channels"], vae["norm_num_groups"]) == (
            (128, 256, 512, 512), 2, 16, 32)
        assert (vae["scaling_factor"], vae["shift_factor"], vae["sample_size"]) == (0.3611, 0.1159, 1024)
        assert vae["use_quant_conv"] is False and vae["use_post_quant_conv"] is False
        te = c["text_encoder"]
        assert (te["hidden_size"], te["num_hidden_layers"], te["num_attention_heads"], te["intermediate_size"]) == (
            768, 12, 12, 3072)
        assert (te["hidden_act"], te["max_position_embeddings"], te["projection_dim"], te["vocab_size"]) == (
            "quick_gelu", 77, 768, 49408)
        t5 = c["text_encoder_2"]
        assert (t5["d_model"], t5["d_ff"], t5["d_kv"], t5["num_heads"], t5["num_layers"], t5["vocab_size"]) == (
            4096, 10240, 64, 64, 24, 32128)
        assert (t5["feed_forward_proj"], t5["relative_attention_num_buckets"],
                t5["relative_attention_max_distance"]) == ("gated-gelu", 32, 128)
    seq = {"num_train_timesteps": 1000, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
           "max_shift": 1.15}
    assert scheduler_config("flux-dev") == {**seq, "shift": 3.0, "use_dynamic_shifting": True}
    assert scheduler_config("flux-schnell") == {**seq, "shift": 1.0, "use_dynamic_shifting": False}
    # --layers N: N double-stream and 2N single-stream blocks; --no-t5 drops text_encoder_2
    small = configs("flux-schnell", layers=3, no_t5=True)
    assert (small["transformer"]["num_layers"], small["transformer"]["num_single_layers"]) == (3, 6)
    assert "text_encoder_2" not in small
    with torch.device("meta"):
        dev = rb._construct("transformer", configs("flux-dev")["transformer"], flux=True)
        schnell = rb._construct("transformer", configs("flux-schnell")["transformer"], flux=True)
    assert len(dev.transformer_blocks) == 19 and len(dev.single_transformer_blocks) == 38
    assert dev.context_embedder.weight.shape == (3072, 4096) and dev.x_embedder.weight.shape == (3072, 64)
    assert hasattr(dev.time_text_embed, "guidance_embedder") and not hasattr(schnell.time_text_embed,
                                                                             "guidance_embedder")
    with pytest.raises(PresetError, match="unknown preset 'nope'.*flux-schnell"):
        configs("nope")
    with pytest.raises(PresetError, match="axes_dims_rope must add up to attention_head_dim"):
        configs("flux-dev", overrides={"transformer": {"attention_head_dim": 64}})
    with pytest.raises(PresetError, match="pooled_projection_dim"):
        configs("flux-dev", overrides={"text_encoder": {"hidden_size": 32}})
    with pytest.raises(PresetError, match="unknown component 'text_encoder_3'"):  # an SD3 component
        configs("flux-dev", overrides={"text_encoder_3": {"d_model": 32}})
    with pytest.raises(PresetError, match="no configuration key"):
        configs("flux-dev", overrides={"transformer": {"caption_projection_dim": 32}})


def test_flux_parameter_counts_and_resource_checks_on_the_meta_device(tmp_path, monkeypatch):
    dev, schnell = estimate("flux-dev"), estimate("flux-schnell")
    p = {k: v["params"] for k, v in dev["components"].items()}
    assert abs(p["transformer"] / 11.90e9 - 1) < 0.005  # "12B": 11,901,408,320
    assert abs(p["text_encoder_2"] / 4.76e9 - 1) < 0.01  # T5-XXL encoder
    assert abs(p["text_encoder"] / 123.06e6 - 1) < 0.01  # CLIP ViT-L/14 text, no projection
    assert abs(p["vae"] / 83.82e6 - 1) < 0.01
    guidance = p["transformer"] - schnell["components"]["transformer"]["params"]
    assert guidance == 256 * 3072 + 3072 + 3072 * 3072 + 3072  # dev's guidance embedder (two linears)
    assert dev["largest"] == "transformer" and dev["components"]["transformer"]["buffer_elements"] == 0
    assert dev["components"]["transformer"]["bytes"] == p["transformer"] * 2 and dev["disk_bytes"] > 33e9
    assert estimate("flux-dev", dtype="float32", no_t5=True)["weights_bytes"] == 4 * sum(
        v for k, v in p.items() if k != "text_encoder_2")
    one = estimate("flux-dev", layers=1)["components"]["transformer"]["params"]
    assert 0.6e9 < one < 0.75e9  # 1 double + 2 single blocks at width 3072
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(rb.shutil, "disk_usage", lambda _p: Usage(10**12, 0, 10**12))
    monkeypatch.setattr(rb, "available_memory", lambda: 16 * 10**9)
    out = tmp_path / "new" / "flux"
    with pytest.raises(RandomBackboneError, match=r"random flux-dev backbone .*\(transformer, 23\.8 GB\) but 16\.0"):
        make_random_backbone(out, "flux-dev")
    assert not (tmp_path / "new").exists()


def test_shrunk_flux_overrides_keep_the_rotary_axes_filling_the_head():
    for head in (6, 8, 16, 32, 64, 128):
        axes = flux_rope_axes(head)
        assert sum(axes) == head and all(a > 0 and a % 2 == 0 for a in axes), (head, axes)
        over = shrunk_overrides(head, 8, "flux-dev")
        tr = configs("flux-dev", layers=1, overrides=over)["transformer"]
        assert sum(tr["axes_dims_rope"]) == tr["attention_head_dim"] == head
    assert flux_rope_axes(128) == (16, 56, 56) and flux_rope_axes(16) == (4, 6, 6)
    with pytest.raises(PresetError, match="even integer"):
        flux_rope_axes(7)
    assert shrunk_overrides(8, 8) == shrunk_overrides(8, 8, "sd3-medium")  # the SD3 default is unchanged


def test_flux_real_width_build_writes_and_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = make_random_backbone(tmp_path / "fluxdev", "flux-dev", no_t5=True, dtype="bfloat16", seed=1, layers=1,
                               overrides={"text_encoder": {"num_hidden_layers": 1}})
    marker = json.loads((out / MARKER).read_text())
    assert marker["preset"] == "flux-dev" and marker["layers"] == 1 and marker["no_t5"] is True
    assert "text_encoder_2" not in marker["params"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in keys) == marker["params"]["transformer"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == [None, None] and index["tokenizer_2"] == [None, None]
    assert {"text_encoder_2", "tokenizer_2"} <= set(null_components(out))
    pipe = FluxPipeline.from_pretrained(out, dtype=torch.bfloat16, **null_components(out))
    assert pipe.text_encoder_2 is None and pipe.tokenizer_2 is None
    tr = pipe.transformer
    assert len(tr.transformer_blocks) == 1 and len(tr.single_transformer_blocks) == 2
    assert tr.config.num_attention_heads * tr.config.attention_head_dim == 3072 == tr.inner_dim
    assert tuple(tr.config.axes_dims_rope) == (16, 56, 56) and tr.config.guidance_embeds
    assert tr.context_embedder.weight.shape == (3072, 4096) and tr.dtype == torch.bfloat16
    assert sum(p.numel() for p in tr.parameters()) == marker["params"]["transformer"]
    assert pipe.text_encoder.config.hidden_size == 768 and pipe.text_encoder.config.num_hidden_layers == 1
    assert pipe.vae.config.block_out_channels == [128, 256, 512, 512] and pipe.vae.config.scaling_factor == 0.3611
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.shift_factor == 0.1159
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 3.0
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("a red circle").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407
    del pipe, tr
    # our rollout on the same folder: one bf16 step at 64 px with the TPM's hooks (T5 left out: zeros in its place)
    bb = Backbone(str(out), device="cpu", dtype="bfloat16", guidance_scale=3.5, feature_blocks=(0, -1),
                  feature_grid=2, max_sequence_length=16)
    assert bb.family.name == "flux" and bb.num_blocks == 3 and bb.hidden_size == 3072
    embeds, pooled = bb.encode_prompts(["a red circle"])
    assert embeds.shape == (1, 16, 4096) and not embeds.any() and pooled.shape == (1, 768)
    step = bb.step(torch.randn(1, *bb.latent_shape(64, 64)), torch.tensor([0.9]), embeds, pooled)
    assert step.velocity.shape == (1, 16, 8, 8) and torch.isfinite(step.velocity).all()
    assert step.features.shape == (1, 2 * 3072, 2, 2) and step.temb.shape == (1, 3072)


def test_shrunk_flux_build_with_t5_denoises_and_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    over = shrunk_overrides(16, 8, "flux-schnell")
    a = make_random_backbone(tmp_path / "a", "flux-schnell", dtype="float32", seed=3, layers=1, overrides=over)
    b = make_random_backbone(tmp_path / "b", "flux-schnell", dtype="float32", seed=3, layers=1, overrides=over)
    assert [_digest(a / f) for f in WEIGHTS] == [_digest(b / f) for f in WEIGHTS]
    pipe = FluxPipeline.from_pretrained(a)
    assert len(pipe.tokenizer_2) == 32100 and pipe.text_encoder_2.config.vocab_size == 32128
    assert pipe.tokenizer_2.model_max_length == 512 and pipe.tokenizer_2("a cat").input_ids[-1] == 1
    assert not pipe.transformer.config.guidance_embeds and not pipe.scheduler.config.use_dynamic_shifting
    assert (pipe.transformer.config.num_layers, pipe.transformer.config.num_single_layers) == (1, 2)
    assert _generate(pipe).shape == (1, 3, 64, 64)


def test_cli_help_lists_the_flux_presets():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tpdm_rl.cli", "make-random-backbone", "--help"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "flux-dev" in text and "flux-schnell" in text and "sd3-medium" in text
    assert "which SD3 or FLUX.1 checkpoint to imitate" in text
    assert "N double-stream and 2N single-stream blocks" in text


def test_the_flux_shift_is_diffusers_formula_but_not_its_rounding():
    """Issue 29 item 8: ``flux_shift_mu`` stays rather than diffusers' ``calculate_shift``. The same line through
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), but diffusers evaluates it as
    ``m * n + (base - m * base_n)``: the last bit differs for about a quarter of the token counts (64 tokens, a
    128 px FLUX image, among them), so the swap would change sigma tables and results."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from tpdm_rl.rollout.families import flux_shift_mu

    ours = [flux_shift_mu({}, n) for n in range(1, 20000)]
    theirs = [calculate_shift(n) for n in range(1, 20000)]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-15  # the same formula
    assert sum(a != b for a, b in zip(ours, theirs)) > 1000 and ours[63] != theirs[63]  # not the same bits
