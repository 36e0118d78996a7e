"""benchmarks/real_size.py end to end at smoke size (tiny widths, CPU): every section runs and records sane numbers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def run_smoke(tmp_path: Path, *extra: str) -> dict:
    """``real_size.py --smoke`` on the CPU with 1 thread; the results JSON."""
    out = tmp_path / "real_size.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "real_size.py"), "--smoke", "--device", "cpu",
                        "--threads", "1", "--out", str(out), "--workdir", str(tmp_path / "work"), *extra],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| px | batch | s/call |" in r.stdout  # the Markdown table
    return json.loads(out.read_text())


def load_real_size():
    spec = importlib.util.spec_from_file_location("real_size_under_test", REPO / "benchmarks" / "real_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_size_presets_pick_their_config_and_output_name():
    import torch

    from tpdm_rl.core.config_io import load_config

    rs = load_real_size()
    want = {"sd3-medium": ("configs/sd3_medium.yaml", "real_size_cpu.json", 24, 24),
            "sd3.5-medium": ("configs/sd35_medium.yaml", "real_size_cpu_sd3.5-medium.json", 24, 24),
            "flux-dev": ("configs/flux_dev.yaml", "real_size_cpu_flux-dev.json", 57, 57),
            "flux-schnell": ("configs/flux_schnell.yaml", "real_size_cpu_flux-schnell.json", 57, 57)}
    assert set(rs.CONFIGS) == set(want) and rs.parse_args([]).preset == "sd3-medium"
    for preset, (config, out, depth, full) in want.items():
        args = rs.parse_args(["--preset", preset])
        s = rs.settings(args, torch.device("cpu"), load_config(rs.config_path(preset)))
        assert (s["preset"], s["config_file"], s["out"]) == (preset, config, f"benchmarks/results/{out}")
        assert (s["transformer_depth"], s["full_depth"]) == (depth, full)
        assert s["feature_blocks"] == s["config_feature_blocks"]  # full depth: unchanged
    # reduced depth: FLUX.1's last double-stream and last single-stream blocks stay the last ones
    args = rs.parse_args(["--preset", "flux-dev", "--layers", "1"])
    s = rs.settings(args, torch.device("cpu"), load_config(rs.config_path("flux-dev")))
    assert (s["transformer_depth"], s["config_feature_blocks"], s["feature_blocks"]) == (3, [18, 56], [0, 2])
    assert "--preset flux-dev" in rs.gpu_pending("flux-dev") and "--preset" not in rs.gpu_pending("sd3-medium")


@pytest.mark.slow
def test_real_size_smoke_run_records_every_section(tmp_path):
    d = run_smoke(tmp_path)
    assert d["errors"] == [], d["errors"]
    env, s = d["environment"], d["settings"]
    assert env["torch_threads"] == 1 and env["device"] == "cpu" and "--smoke" in env["command"]
    assert env["versions"]["torch"] and d["gpu_rows"].startswith("pending")

    # bytes per stored step, from the recorded configuration: features (blocks x hidden x grid^2) in bf16 + temb
    tr = s["overrides"]["transformer"]
    hidden, grid = tr["num_attention_heads"] * tr["attention_head_dim"], s["feature_grid"]
    blocks = len(s["config_feature_blocks"])
    assert d["backbone"]["hidden"] == hidden and d["backbone"]["feature_channels"] == blocks * hidden
    rows = d["rows"]
    assert [(r["resolution"], r["batch_size"]) for r in rows] == [(256, 1), (256, 2)]
    for row in rows:
        assert row["seconds_per_call"] > 0 and row["seconds_per_call_no_features"] > 0
        assert row["continuous_over_static"] > 0 and row["continuous"]["trajectories_per_s"] > 0
        assert 0 < row["slot_utilisation"]["static"] <= 1 and 0 < row["slot_utilisation"]["continuous"] <= 1
        assert abs(sum(row["step"]["shares"].values()) - 1) < 1e-6
        assert row["storage"]["features_bytes"] == 2 * hidden * grid**2 * 2 and blocks == 2
        # 2*hidden*grid^2*2 + hidden*2 when temb is stored in bf16 too (the engine currently keeps it in float32)
        temb_size = ITEMSIZE[row["storage"]["temb_dtype"]]
        assert row["bytes_per_step"] == 2 * hidden * grid**2 * 2 + hidden * temb_size
        assert row["peak_memory_bytes"] > 0

    ln = d["learner"]
    assert ln["rows"] == 32 and ln["real_rows"] > ln["rows"] and ln["seconds"] > 0
    assert ln["peak_memory_bytes"] > 0 and ln["feature_shape"] == [blocks * hidden, grid, grid]
    assert d["weight_sync"]["bytes"] > 0 and d["weight_sync"]["seconds"] > 0
    assert d["text_encoder_offload"]["estimate_bytes_with_t5"] > d["text_encoder_offload"]["estimate_bytes_built"]
    for name in ("hpsv2", "aesthetic", "imagereward"):
        assert d["rewards"][name]["images_per_s"] > 0, name


@pytest.mark.slow
def test_real_size_smoke_run_flux(tmp_path):
    """The same at FLUX.1-dev's layout (tiny widths, 2 double-stream + 4 single-stream blocks): the config's feature
    blocks [18, 56] of 57 move to [1, 5] of 6 for the hooks and the learner; the offload covers CLIP-L and T5."""
    d = run_smoke(tmp_path, "--preset", "flux-dev")
    assert d["errors"] == [], d["errors"]
    s = d["settings"]
    assert (s["preset"], s["family"], s["config_file"]) == ("flux-dev", "flux", "configs/flux_dev.yaml")
    assert "--preset flux-dev" in d["environment"]["command"] and "--preset flux-dev" in d["gpu_rows"]
    assert (s["transformer_depth"], s["full_depth"], s["feature_blocks"]) == (6, 57, [1, 5])

    tr = s["overrides"]["transformer"]
    hidden, grid = tr["num_attention_heads"] * tr["attention_head_dim"], s["feature_grid"]
    bb = d["backbone"]
    assert bb["family"] == "flux" and bb["transformer_layers"] == 6 and bb["feature_blocks"] == [1, 5]
    assert bb["hidden"] == hidden and bb["feature_channels"] == 2 * hidden
    assert [(r["resolution"], r["batch_size"]) for r in d["rows"]] == [(256, 1), (256, 2)]
    for row in d["rows"]:
        assert row["seconds_per_call"] > 0 and row["continuous"]["trajectories_per_s"] > 0
        assert abs(sum(row["step"]["shares"].values()) - 1) < 1e-6
        temb_size = ITEMSIZE[row["storage"]["temb_dtype"]]
        assert row["bytes_per_step"] == 2 * hidden * grid**2 * 2 + hidden * temb_size
        assert row["peak_memory_bytes"] > 0

    ln = d["learner"]
    assert ln["feature_shape"] == [2 * hidden, grid, grid] and ln["feature_blocks"] == [1, 5]
    assert ln["rows"] == 32 and ln["seconds"] > 0
    assert d["weight_sync"]["bytes"] > 0
    off = d["text_encoder_offload"]
    assert off["encoder_classes"] == {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"}
    assert off["text_encoders_built"] == ["text_encoder"]  # no T5 by default
    assert off["estimate_bytes_with_t5"] > off["estimate_bytes_built"] > 0
    for name in ("hpsv2", "aesthetic", "imagereward"):
        assert d["rewards"][name]["images_per_s"] > 0, name
