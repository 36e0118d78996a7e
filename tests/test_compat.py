"""Compatibility: checkpoints written by earlier versions still resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import small_overrides

from tpdm_rl.config import load_config
from tpdm_rl.controller import Controller
from tpdm_rl.utils import read_metrics

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_v0_1"


def test_checkpoint_written_before_the_redesign_resumes(tmp_path, tiny_backbone_dir):
    """A 0.1.0 checkpoint (tests/fixtures/legacy_v0_1, made before the one-loop redesign) resumes, and the
    iteration it generates is the one 0.1.0 generated from the same weights."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(FIXTURE / "step_2", run / "checkpoints" / "step_2")
    (run / "checkpoints" / "latest").write_text("step_2\n")
    legacy = read_metrics(FIXTURE / "metrics.jsonl")
    (run / "metrics.jsonl").write_text((FIXTURE / "metrics.jsonl").read_text())
    over = small_overrides(tiny_backbone_dir, **{"train.iterations": 3, "checkpoint.every": 2,
                                                 "algorithm.kl_coef": 0.1, "train.threads": 1,
                                                 "rewards.fidelity.max_psnr": 100.0})
    ctl = Controller(load_config("configs/tiny.yaml", over), output=run, resume="auto")
    assert ctl.start_iteration == 2 and ctl.policy_version == 2
    ctl.train()
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    assert recs[:2] == legacy[:2]  # the lines before the checkpoint are kept as they were
    new, old = recs[2], legacy[2]
    for k in ("steps/mean", "steps/min", "steps/max", "rollout/backbone_calls"):
        assert new[k] == old[k], k
    assert new["reward/fidelity"] == pytest.approx(old["reward/fidelity"], abs=1e-4)
    assert new["policy/behaviour_logp_err"] < 1e-5
    assert (run / "checkpoints" / "step_3" / "tpm.safetensors").is_file()
