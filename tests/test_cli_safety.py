"""What a new user runs into: run folders, changed configs, bad values, warnings, exact resume of the logs."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import time
import types

import pytest
import torch
from conftest import run_cli_in_process, small_overrides

from tpdm_rl.cli import main
from tpdm_rl.core.config_io import load_config
from tpdm_rl.core.metrics_reader import read_metrics
from tpdm_rl.training.controller import Controller
from tpdm_rl.training.runfolder import RunFolder


def _sets(over: list[str]) -> list[str]:
    return [a for kv in over for a in ("--set", kv)]


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "tpdm_rl.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_line(r, code=None):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln
             and not ln.startswith("tpdm-rl: warning")]
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def test_a_run_folder_is_never_silently_reused(tmp_path, tiny_backbone_dir):
    out = tmp_path / "run"
    args = ["train", "--config", "configs/tiny.yaml", "--output", str(out),
            *_sets(small_overrides(tiny_backbone_dir, **{"train.iterations": 2}))]
    assert main(args) == 0
    first = (out / "metrics.jsonl").read_text()
    r = run_cli_in_process(*args)
    line = _one_line(r, 1)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (out / "metrics.jsonl").read_text() == first  # nothing lost
    r = run_cli_in_process(*args, "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").read_text() == first
    assert "moved to" in r.stderr and str(moved[0]) in r.stderr
    events = [json.loads(ln)["event"] for ln in (out / "history.jsonl").read_text().splitlines()]
    assert events == ["start"]


def test_a_run_folder_in_use_is_refused_with_its_owner(tmp_path, tiny_backbone_dir):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tpdm_rl.training.runfolder import RunFolder; "
                               f"held = RunFolder({str(out)!r}).acquire(resume=True, overwrite=False); print('held', "
                               "flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli_in_process("train", "--config", "configs/tiny.yaml", "--output", str(out), "--resume", "auto",
                               *_sets(small_overrides(tiny_backbone_dir)))
        line = _one_line(r, 1)
        assert "in use by pid" in line and str(holder.pid) in line
    finally:
        holder.kill()
        holder.wait()
    RunFolder(out).acquire(resume=True, overwrite=False).release()  # a dead owner leaves no stale lock


@pytest.mark.parametrize("kv", ["optim.lr=.inf", "rewards.fidelity.weight=.nan", "step_penalty.coef=.inf",
                                "backbone.guidance_scale=.inf", "rewards.fidelity.max_psnr=.nan"])
def test_non_finite_settings_are_rejected(kv):
    r = run_cli_in_process("train", "--config", "configs/tiny.yaml", "--set", kv, "--output", "/nonexistent/never")
    line = _one_line(r, 2)
    assert kv.split("=")[0] in line and ("finite" in line or "inf" in line or "nan" in line)


def test_most_updates_skipped_ends_non_zero_and_the_summary_shows_it(tmp_path, tiny_backbone_dir, monkeypatch,
                                                                      capsys):
    from tpdm_rl.rewards.fidelity import FidelityReward

    monkeypatch.setattr(FidelityReward, "_score_batch", lambda self, images, prompts, refs: torch.full(
        (images.shape[0],), float("nan")))
    out = tmp_path / "nan"
    code = main(["train", "--config", "configs/tiny.yaml", "--output", str(out),
                 *_sets(small_overrides(tiny_backbone_dir, **{"train.iterations": 2}))])
    err = capsys.readouterr()
    assert code == 1 and "2 of 2 updates were skipped" in err.err
    assert "health/skipped_updates" in err.out and "health/skipped_updates" in (out / "summary.txt").read_text()


def test_resume_with_a_changed_objective_needs_consent_and_is_recorded(tmp_path, tiny_backbone_dir):
    out = tmp_path / "run"
    base = small_overrides(tiny_backbone_dir, **{"train.iterations": 1})
    assert main(["train", "--config", "configs/tiny.yaml", "--output", str(out), *_sets(base)]) == 0
    more = small_overrides(tiny_backbone_dir, **{"train.iterations": 2, "optim.lr": 0.01, "step_penalty.coef": 2.0})
    r = run_cli_in_process("train", "--config", "configs/tiny.yaml", "--output", str(out), "--resume", "auto",
                           *_sets(more))
    line = _one_line(r, 2)
    assert "optim.lr: 0.001 -> 0.01" in line and "step_penalty.coef: 1.0 -> 2.0" in line
    assert "--allow-config-change" in line
    assert len(read_metrics(out / "metrics.jsonl")) == 1
    assert main(["train", "--config", "configs/tiny.yaml", "--output", str(out), "--resume", "auto", *_sets(more),
                 "--allow-config-change", "optim.lr", "step_penalty.coef"]) == 0
    hist = [json.loads(ln) for ln in (out / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in hist] == ["start", "resume"]
    assert hist[1]["config_changes"] == {"optim.lr": [0.001, 0.01], "step_penalty.coef": [1.0, 2.0]}
    # more iterations alone is not a change of objective
    longer = small_overrides(tiny_backbone_dir, **{"train.iterations": 3, "optim.lr": 0.01, "step_penalty.coef": 2.0})
    assert main(["train", "--config", "configs/tiny.yaml", "--output", str(out), "--resume", "auto",
                 *_sets(longer)]) == 0


def test_bad_paths_and_values_are_one_line_errors(tmp_path, tiny_backbone_dir):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    over = _sets(small_overrides(tiny_backbone_dir))
    assert "is a file" in _one_line(run_cli_in_process("train", "--config", "configs/tiny.yaml", "--output", str(a_file), *over), 1)
    assert "is a folder" in _one_line(run_cli_in_process("train", "--config", str(tmp_path)), 2)
    assert "cuda" in _one_line(run_cli_in_process("train", "--config", "configs/tiny.yaml", "--output", str(tmp_path / "c"),
                                    "--set", "train.device=cuda", *over), 2)
    ck = tmp_path / "ck"
    ck.mkdir()
    from tpdm_rl.algorithm.policy import TimePredictionModule, TPMSpec
    from tpdm_rl.training.tpm_file import save_tpm

    save_tpm(TimePredictionModule(TPMSpec(in_channels=64, temb_dim=32, grid=4, hidden=16)), ck / "tpm.safetensors")
    (ck / "trainer_state.json").write_text("[1, 2]")
    line = _one_line(run_cli_in_process("train", "--config", "configs/tiny.yaml", "--output", str(tmp_path / "r"), "--resume",
                          str(ck), *over), 1)
    assert "trainer_state.json" in line and "corrupt" in line
    t0 = time.perf_counter()
    line = _one_line(_cli("train", "--config", "configs/tiny.yaml", "--output", str(tmp_path / "a"), "--address",
                          "127.0.0.1:1", *over, timeout=120), 1)
    assert "127.0.0.1:1" in line and time.perf_counter() - t0 < 60


def test_sample_checks_its_output_and_size_before_sampling(tmp_path):
    for extra, what in ((["--output", str(tmp_path / "x.xyz")], ".xyz"),
                        (["--output", str(tmp_path / "x.png"), "--size", "-16"], "--size"),
                        (["--output", str(tmp_path / "x.png"), "--size", "0"], "--size")):
        line = _one_line(run_cli_in_process("sample", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "a cat", *extra), 2)
        assert what in line


def test_quiet_acceptance_now_warns(tmp_path, tiny_backbone_dir):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    dup = tmp_path / "dup.yaml"
    dup.write_text("rollout:\n  group_size: 4\n  group_size: 6\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na cat\na cat\n")
    for args, needle in (([ "--config", str(empty)], "is empty"),
                         (["--config", "configs/tiny.yaml", "--set", f"rollout.prompts={prompts}"], "same prompt")):
        r = run_cli_in_process("config", *args)
        assert r.returncode == 0 and needle in r.stderr, r.stderr
    # a duplicate key is no longer a warning but an error naming the key and its line (tests/test_bad_inputs.py)
    r = run_cli_in_process("config", "--config", str(dup))
    assert r.returncode != 0 and "dup.yaml:3: key 'group_size' is given twice" in r.stderr, r.stderr


def test_long_prompts_are_counted_once_and_a_foreign_backbone_warns(tmp_path, tiny_backbone_dir, capsys):
    from tpdm_rl.rollout.backbone import Backbone

    bb = Backbone(tiny_backbone_dir, device="cpu", feature_grid=4, max_sequence_length=8)
    bb.encode_prompts(["a cat", "a very long prompt " * 10, "another very long prompt " * 10])
    err = capsys.readouterr().err
    assert err.count("tpdm-rl: warning") == 1 and "2 of 3 distinct prompts are longer" in err
    from tpdm_rl.builders.tiny_backbone import make_tiny_backbone

    other = Backbone(str(make_tiny_backbone(tmp_path / "other", seed=1)), device="cpu", feature_grid=4)
    assert other.fingerprint() != bb.fingerprint() and bb.fingerprint() == Backbone(
        tiny_backbone_dir, device="cpu", feature_grid=4).fingerprint()


def test_hub_reward_without_a_local_file_fails_fast_offline(monkeypatch):
    from tpdm_rl.rewards import checkpoints

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(checkpoints, "HUB_HOST", "127.0.0.1")  # nothing listens on 443 here: "no network"
    t0 = time.perf_counter()
    with pytest.raises(checkpoints.RewardError, match="not reachable"):
        checkpoints.resolve_file(None, "hpsv2", "hub xswu/HPSv2", hub_repo="xswu/HPSv2",
                                 hub_file="HPS_v2.1_compressed.pt")
    assert time.perf_counter() - t0 < 10


def test_tensorboard_and_wandb_resume_exactly(tmp_path, tiny_backbone_dir, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    inits = []

    class FakeRun:
        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    fake = types.ModuleType("wandb")  # a stand-in that records how the run was opened (no W&B account here)
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: inits.append(kw) or FakeRun()
    fake.util = types.SimpleNamespace(generate_id=lambda: "run123")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    over = small_overrides(tiny_backbone_dir, **{"train.iterations": 3, "checkpoint.every": 2,
                                                 "logging.tensorboard": True, "logging.wandb_project": "p"})
    out = tmp_path / "run"
    Controller(load_config("configs/tiny.yaml", over), output=out).train()
    state = json.loads((out / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state["wandb_run_id"] == "run123"
    # resume from step_2: iteration 2 is redone; the stale TensorBoard point of iteration 2 is purged
    Controller(load_config("configs/tiny.yaml", over), output=out,
               resume=str(out / "checkpoints" / "step_2")).train()
    assert inits[1]["id"] == "run123" and inits[1]["resume"] == "allow"
    acc = EventAccumulator(str(out / "tb"))  # the folder, read as TensorBoard reads it (purges applied)
    acc.Reload()
    steps = [e.step for e in acc.Scalars("reward/total")]
    assert sorted(steps) == [0, 1, 2], steps  # one point per iteration, no stale duplicate
    assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1, 2]
    assert os.path.exists(out / "history.jsonl")
