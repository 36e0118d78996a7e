"""benchmarks/real_size.py end to end at smoke size (tiny widths, CPU): every section runs and records sane numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@pytest.mark.slow
def test_real_size_smoke_run_records_every_section(tmp_path):
    out = tmp_path / "real_size.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "real_size.py"), "--smoke", "--device", "cpu",
                        "--threads", "1", "--out", str(out), "--workdir", str(tmp_path / "work")],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| px | batch | s/call |" in r.stdout  # the Markdown table
    d = json.loads(out.read_text())
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
