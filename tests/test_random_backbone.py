"""Random real-size SD3 backbones: real configurations, parameter counts, an offline load, refusals.

The full-size checks run on the meta device (no memory). The build that writes and loads keeps the real
widths of the transformer (1536), both CLIPs (768, 1280) and the VAE but only 2 transformer blocks
and 1 block per CLIP (~0.45e9 parameters, ~0.9 GB in bfloat16) and leaves out T5: a full CLIP-G alone
is 0.69e9 parameters and T5-XXL 4.76e9, too much for a unit test. The T5 path (real vocabulary and
tokenizer, text_encoder_3 saved and loaded) is covered by a build shrunk to tiny widths that also
denoises one step.
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
from diffusers import StableDiffusion3Pipeline
from safetensors import safe_open
from tpdm_rl.rollout.backbone import null_components

from tpdm_rl.builders import random_backbone as rb
from tpdm_rl.builders.random_backbone import (
    MARKER,
    PresetError,
    RandomBackboneError,
    configs,
    estimate,
    make_random_backbone,
)
from tpdm_rl.core.threads import apply_threads

TINY = rb.shrunk_overrides(attention_head_dim=8, sample_size=8)


def _params(est, name):
    return est["components"][name]["params"]


def test_full_size_parameter_counts_on_the_meta_device():
    m3 = estimate("sd3-medium")
    assert abs(_params(m3, "transformer") / 2.03e9 - 1) < 0.01  # 2,028,328,000
    assert abs(_params(m3, "text_encoder_3") / 4.76e9 - 1) < 0.01  # T5-XXL encoder: 4,762,310,656
    assert abs(_params(m3, "text_encoder") / 123.65e6 - 1) < 0.01  # CLIP ViT-L/14 text + projection
    assert abs(_params(m3, "text_encoder_2") / 694.66e6 - 1) < 0.01  # OpenCLIP bigG text + projection
    assert abs(_params(m3, "vae") / 83.82e6 - 1) < 0.01
    # the 192 x 192 x 1536 positional grid is saved with the weights (a persistent buffer)
    assert m3["components"]["transformer"]["buffer_elements"] == 192 * 192 * 1536
    assert m3["components"]["transformer"]["bytes"] == (2028328000 + 192 * 192 * 1536) * 2  # bf16: 4.17 GB
    large = estimate("sd3.5-large")
    assert abs(_params(large, "transformer") / 8.06e9 - 1) < 0.01  # "8.1B": 8,056,627,520
    assert large["largest"] == "transformer"
    m35 = estimate("sd3.5-medium", no_t5=True, dtype="float32")
    assert abs(_params(m35, "transformer") / 2.243e9 - 1) < 0.01  # "2.5B" with its 384 x 384 grid
    assert "text_encoder_3" not in m35["components"]
    assert m35["components"]["vae"]["bytes"] == _params(m35, "vae") * 4
    assert m3["disk_bytes"] > m3["weights_bytes"] > 15e9 and m3["memory_bytes"] > 9.5e9
    # depth override: fewer blocks, same widths
    two = estimate("sd3-medium", layers=2)
    assert 0.15e9 < _params(two, "transformer") < 0.2e9


def test_configurations_carry_the_real_widths():
    c = configs("sd3-medium")
    tr = c["transformer"]
    assert tr["num_attention_heads"] * tr["attention_head_dim"] == 1536 == tr["caption_projection_dim"]
    assert tr["num_layers"] == 24 and tr["pos_embed_max_size"] == 192 and tr["joint_attention_dim"] == 4096
    assert tr["dual_attention_layers"] == () and tr["qk_norm"] is None
    assert (c["text_encoder"]["hidden_size"], c["text_encoder"]["num_hidden_layers"]) == (768, 12)
    assert c["text_encoder"]["hidden_act"] == "quick_gelu" and c["text_encoder_2"]["hidden_act"] == "gelu"
    assert (c["text_encoder_2"]["hidden_size"], c["text_encoder_2"]["num_hidden_layers"]) == (1280, 32)
    assert (c["text_encoder_3"]["d_model"], c["text_encoder_3"]["d_ff"], c["text_encoder_3"]["num_layers"]) == (
        4096, 10240, 24)
    assert c["text_encoder_3"]["vocab_size"] == 32128 and c["vae"]["latent_channels"] == 16
    m35 = configs("sd3.5-medium", layers=5)["transformer"]
    assert m35["pos_embed_max_size"] == 384 and m35["qk_norm"] == "rms_norm"
    assert m35["dual_attention_layers"] == (0, 1, 2, 3, 4) and m35["num_layers"] == 5
    assert configs("sd3.5-medium")["transformer"]["dual_attention_layers"] == tuple(range(13))
    large = configs("sd3.5-large", no_t5=True)
    assert "text_encoder_3" not in large
    assert (large["transformer"]["num_layers"], large["transformer"]["caption_projection_dim"]) == (38, 2432)
    with torch.device("meta"):
        model = rb._construct("transformer", large["transformer"])
    assert len(model.transformer_blocks) == 38 and model.context_embedder.out_features == 2432
    with pytest.raises(PresetError, match="unknown preset 'nope'.*sd3-medium"):
        configs("nope")
    with pytest.raises(PresetError, match="layers"):
        configs("sd3-medium", layers=0)
    with pytest.raises(PresetError, match="inconsistent"):
        configs("sd3-medium", overrides={"text_encoder": {"projection_dim": 32}})
    with pytest.raises(PresetError, match="no configuration key"):
        configs("sd3-medium", overrides={"vae": {"widht": 3}})
    with pytest.raises(PresetError, match="unknown dtype"):
        estimate("sd3-medium", dtype="int8")


def test_scaled_build_writes_and_loads_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = make_random_backbone(tmp_path / "sd3m", "sd3-medium", no_t5=True, dtype="bfloat16", seed=1, layers=2,
                               overrides={"text_encoder": {"num_hidden_layers": 1},
                                          "text_encoder_2": {"num_hidden_layers": 1}})
    marker = json.loads((out / MARKER).read_text())
    assert marker["preset"] == "sd3-medium" and marker["layers"] == 2 and marker["no_t5"] is True
    assert marker["dtype"] == "bfloat16" and "text_encoder_3" not in marker["params"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left behind
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in keys) == (
            marker["params"]["transformer"] + 192 * 192 * 1536)
    # diffusers loads a folder with a null required component only when the caller passes it as None
    assert {"text_encoder_3", "tokenizer_3"} <= set(null_components(out))
    pipe = StableDiffusion3Pipeline.from_pretrained(out, dtype=torch.bfloat16, **null_components(out))
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    tr = pipe.transformer
    assert len(tr.transformer_blocks) == 2 and tr.config.num_layers == 2
    assert tr.config.num_attention_heads * tr.config.attention_head_dim == 1536
    assert tr.context_embedder.weight.shape == (1536, 4096) and tr.pos_embed.pos_embed.shape == (1, 192 * 192, 1536)
    assert pipe.text_encoder.config.hidden_size == 768 and pipe.text_encoder_2.config.hidden_size == 1280
    assert pipe.vae.config.block_out_channels == [128, 256, 512, 512] and pipe.vae.config.scaling_factor == 1.5305
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("a red circle").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and pipe.tokenizer_2.pad_token == "!"
    assert sum(p.numel() for p in tr.parameters()) == marker["params"]["transformer"]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_build_with_t5_denoises_and_is_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = make_random_backbone(tmp_path / "a", "sd3.5-medium", dtype="float32", seed=3, layers=1, overrides=TINY)
    b = make_random_backbone(tmp_path / "b", "sd3.5-medium", dtype="float32", seed=3, layers=1, overrides=TINY)
    c = make_random_backbone(tmp_path / "c", "sd3.5-medium", dtype="float32", seed=4, layers=1, overrides=TINY,
                             no_t5=True)
    files = ["transformer/diffusion_pytorch_model.safetensors", "text_encoder_3/model.safetensors",
             "vae/diffusion_pytorch_model.safetensors"]
    assert [_digest(a / f) for f in files] == [_digest(b / f) for f in files]
    assert _digest(a / files[0]) != _digest(c / files[0])
    pipe = StableDiffusion3Pipeline.from_pretrained(a)
    assert len(pipe.tokenizer_3) == 32100 and pipe.text_encoder_3.config.vocab_size == 32128
    assert pipe.tokenizer_3.model_max_length == 512 and pipe.tokenizer_3("a cat").input_ids[-1] == 1
    assert pipe.transformer.config.dual_attention_layers == [0] and pipe.transformer.config.qk_norm == "rms_norm"
    image = pipe("a red circle", num_inference_steps=1, height=64, width=64, max_sequence_length=16,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_refusals_happen_before_anything_is_written(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(rb.shutil, "disk_usage", lambda _p: Usage(10**12, 10**12 - 10**9, 10**9))
    out = tmp_path / "new" / "sd3"
    with pytest.raises(RandomBackboneError, match=r"needs 15\.6 GB of disk but .* has 1\.0 GB free") as err:
        make_random_backbone(out, "sd3-medium")
    assert "\n" not in str(err.value) and not (tmp_path / "new").exists()
    monkeypatch.setattr(rb.shutil, "disk_usage", lambda _p: Usage(10**12, 0, 10**12))
    monkeypatch.setattr(rb, "available_memory", lambda: 4 * 10**9)
    with pytest.raises(RandomBackboneError, match=r"memory .*text_encoder_3, 9\.5 GB\) but 4\.0 GB") as err:
        make_random_backbone(out, "sd3-medium")
    assert "\n" not in str(err.value) and not (tmp_path / "new").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(RandomBackboneError, match="not an empty folder"):
        make_random_backbone(busy, "sd3-medium", no_t5=True)
    assert [p.name for p in busy.iterdir()] == ["x"]


def test_cli_unknown_preset_is_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "dir"
    proc = subprocess.run([sys.executable, "-m", "tpdm_rl.cli", "make-random-backbone", "--preset", "nope", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "unknown preset 'nope'" in lines[0] and "sd3.5-large" in lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_real_width_rollout_iteration_with_bf16_storage_and_a_learner_update(tmp_path, monkeypatch):
    """SD3-Medium's real width (1536, hooks on blocks 0 and 1 of a 2-block transformer), bf16 backbone and bf16
    stored features: one rollout task with the TPM and one learner update; shapes, dtypes, bytes per step."""
    from tpdm_rl.rollout.worker import RolloutWorker

    from tpdm_rl.algorithm.messages import LearnBatch, RolloutTask
    from tpdm_rl.core.config_io import load_config
    from tpdm_rl.training.learner import Learner

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    apply_threads(2)
    out = make_random_backbone(tmp_path / "sd3m", "sd3-medium", no_t5=True, dtype="bfloat16", seed=0, layers=2,
                               overrides={"text_encoder": {"num_hidden_layers": 1},
                                          "text_encoder_2": {"num_hidden_layers": 1}})
    cfg = load_config("configs/sd3_medium.yaml", [
        f"backbone.path={out}", "backbone.device=cpu", "backbone.resolution=128", "backbone.feature_grid=4",
        "backbone.feature_blocks=[0,-1]", "backbone.max_sequence_length=16", "rollout.max_steps=3",
        "rollout.batch_size=2", "rollout.prompts=builtin:eval", "train.device=cpu", "distributed.enabled=false"])
    assert cfg.backbone.dtype == "bfloat16" and cfg.backbone.feature_dtype == "bfloat16"
    worker = RolloutWorker(cfg, str(out))
    assert worker.backbone.hidden_size == 1536 and worker.backbone.feature_channels == 2 * 1536
    task = RolloutTask(0, 0, 2, ["a red apple", "a lighthouse at dusk"], [1, 2], torch.tensor([5, 6]), False, 0)
    summary, rows, images = worker.run_task(task)
    assert images.images.shape == (2, 3, 128, 128) and images.images.dtype == torch.float32
    assert rows.features.dtype == torch.bfloat16 and rows.features.shape[1:] == (3072, 4, 4)
    assert rows.temb.dtype == torch.bfloat16 and rows.temb.shape[1] == 1536
    per_step = rows.features[0].numel() * 2 + rows.temb[0].numel() * 2
    assert per_step == 3072 * 16 * 2 + 1536 * 2  # bytes per stored step
    assert len(rows) == int(summary.steps.sum()) and 1 <= summary.steps.max() <= 3
    learner = Learner(worker.policy, cfg.optim, cfg.algorithm, cfg.seed, "cpu")
    batch = LearnBatch.from_rows([(rows, 0, len(rows), torch.tensor([1.0, -1.0]))])
    before = {k: v.clone() for k, v in worker.policy.state_dict().items()}
    m = learner.update(batch, 0)
    assert m["policy/behaviour_logp_err"] < 1e-3 and m["health/skipped_steps"] == 0
    assert any(not torch.equal(before[k], v) for k, v in worker.policy.state_dict().items())
