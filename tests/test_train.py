import json
import subprocess
import sys

import pytest
import torch
from conftest import run_cli_in_process, small_overrides
from safetensors.torch import load_file

from tpdm_rl.algorithm.messages import LearnBatch
from tpdm_rl.core.config_io import load_config
from tpdm_rl.core.metrics_reader import read_metrics
from tpdm_rl.training.controller import Controller, plan_iteration
from tpdm_rl.training.learner import policy_terms

CORE_KEYS = ["iteration", "reward/total", "reward/fidelity", "steps/mean", "steps/min", "steps/max", "loss/policy",
             "policy/clipfrac", "policy/approx_kl", "time/rollout_s", "time/reward_s", "time/learn_s"]


def _trainer(tmp_path, tiny_backbone_dir, name="run", resume=None, **extra):
    cfg = load_config("configs/tiny.yaml", small_overrides(tiny_backbone_dir, **extra))
    return Controller(cfg, output=tmp_path / name, resume=resume)


def test_training_writes_metrics_checkpoints_and_tensorboard(tmp_path, tiny_backbone_dir):
    tr = _trainer(tmp_path, tiny_backbone_dir, **{"logging.tensorboard": True, "checkpoint.keep_last": 1,
                                                  "train.iterations": 3})
    tr.train()
    out = tmp_path / "run"
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    for k in CORE_KEYS:
        assert all(isinstance(r[k], (int, float)) for r in recs), k
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_3"
    ck = out / "checkpoints" / "step_3"
    assert {p.name for p in ck.iterdir()} >= {"tpm.safetensors", "trainer_state.json", "config.yaml"}
    assert json.loads((ck / "trainer_state.json").read_text())["iteration"] == 3
    # keep_last=1 rotated the older ones away
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step_3"]
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_first_epoch_ratio_is_one(tmp_path, tiny_backbone_dir):
    tr = _trainer(tmp_path, tiny_backbone_dir)
    plan = plan_iteration(tr.cfg, tr.sampler, tr.prompts, 0)
    trajs = tr.executor.worker.generate(plan.prompts, plan.noise_seeds, plan.sample_keys)
    rows = trajs.step_rows()
    batch = LearnBatch.from_rows([(rows, 0, len(rows), torch.ones(trajs.num_trajectories))]).to(torch.device("cpu"))
    with torch.no_grad():
        logp = policy_terms(tr.policy, batch)[0]
    torch.testing.assert_close(logp, trajs.logp, rtol=0, atol=1e-5)
    m = tr.run_iteration(0)
    assert m["policy/first_step_clipfrac"] == 0.0
    assert m["policy/behaviour_logp_err"] < 1e-5


def test_same_seed_gives_identical_runs_and_resume_is_exact(tmp_path, tiny_backbone_dir):
    """With a KL term (kl_coef > 0) too: the resumed run's KL reference is the run's initial TPM, rebuilt from the
    seed, not the checkpoint it resumes from (before the fix the reference moved by up to 0.071)."""
    kl = {"algorithm.kl_coef": 0.5}
    a = _trainer(tmp_path, tiny_backbone_dir, "a", **{"train.iterations": 4}, **kl)
    a.train()
    b = _trainer(tmp_path, tiny_backbone_dir, "b", **{"train.iterations": 4}, **kl)
    b.train()
    # interrupted run: 2 iterations, then resume for the remaining 2
    c = _trainer(tmp_path, tiny_backbone_dir, "c", **{"train.iterations": 2}, **kl)
    c.train()
    c2 = _trainer(tmp_path, tiny_backbone_dir, "c", resume="auto", **{"train.iterations": 4}, **kl)
    assert c2.start_iteration == 2
    c2.train()
    ra, rb, rc = (read_metrics(tmp_path / n / "metrics.jsonl") for n in "abc")
    for k in ("reward/total", "reward/fidelity", "steps/mean", "steps/min", "steps/max", "loss/policy", "loss/kl_ref"):
        assert [r[k] for r in ra] == [r[k] for r in rb] == [r[k] for r in rc], k
    assert ra[3]["loss/kl_ref"] > 0  # the KL term is live
    wa, wb, wc = (load_file(str(tmp_path / n / "checkpoints" / "step_4" / "tpm.safetensors")) for n in "abc")
    assert all(torch.equal(wa[k], wb[k]) and torch.equal(wa[k], wc[k]) for k in wa)
    assert [r["iteration"] for r in rc] == [0, 1, 2, 3]


def test_nan_reward_skips_the_update_and_continues(tmp_path, tiny_backbone_dir):
    tr = _trainer(tmp_path, tiny_backbone_dir, **{"train.iterations": 2})
    fidelity = tr.executor.reward_workers["fidelity"]
    orig = fidelity.model.score_details
    before = {k: v.clone() for k, v in tr.policy.state_dict().items()}

    def nan_first(images, prompts, references=None):
        scores, extra = orig(images, prompts, references)
        scores[1] = float("nan")
        return scores, extra

    fidelity.model.score_details = nan_first
    m0 = tr.run_iteration(0)
    assert m0["health/skipped_updates"] == 1 and m0["health/nonfinite_reward"].startswith("fidelity=nan")
    assert all(torch.equal(before[k], v) for k, v in tr.policy.state_dict().items())
    fidelity.model.score_details = orig
    m1 = tr.run_iteration(1)
    assert m1["health/skipped_updates"] == 1
    assert any(not torch.equal(before[k], v) for k, v in tr.policy.state_dict().items())


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tpdm_rl.cli", *args], capture_output=True, text=True, cwd=cwd)


def _one_line_error(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln
             and not ln.startswith("tpdm-rl: warning")]  # warnings (e.g. truncated prompts) are not errors
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_cli_bad_inputs_give_one_line_errors(tmp_path, tiny_backbone_dir):
    over = [a for kv in small_overrides(tiny_backbone_dir) for a in ("--set", kv)]
    bad_prompts = tmp_path / "p.jsonl"
    bad_prompts.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    line = _one_line_error(run_cli_in_process("train", "--config", "configs/tiny.yaml", "--output", str(tmp_path / "r1"), *over,
                                "--set", f"rollout.prompts={bad_prompts}"))
    assert "p.jsonl" in line and ":2" in line
    line = _one_line_error(run_cli_in_process("train", "--config", "configs/tiny.yaml", "--output", str(tmp_path / "r2"), *over,
                                "--resume", str(tmp_path / "missing_ckpt")))
    assert "missing_ckpt" in line
    ck = tmp_path / "corrupt"
    ck.mkdir()
    (ck / "tpm.safetensors").write_bytes(b"garbage" * 10)
    (ck / "trainer_state.json").write_text("{}")
    line = _one_line_error(run_cli_in_process("train", "--config", "configs/tiny.yaml", "--output", str(tmp_path / "r3"), *over,
                                "--resume", str(ck)))
    assert "tpm.safetensors" in line and "corrupt" in line
    line = _one_line_error(run_cli_in_process("train", "--config", str(tmp_path / "nope.yaml")))
    assert "nope.yaml" in line
    line = _one_line_error(run_cli_in_process("train", "--config", "configs/tiny.yaml", "--set", "backbone.path=/no/such/dir",
                                "--output", str(tmp_path / "r4")))
    assert "/no/such/dir" in line


def test_truncated_or_foreign_checkpoint_is_a_one_line_error(tmp_path, tiny_backbone_dir):
    over = [a for kv in small_overrides(tiny_backbone_dir, **{"train.iterations": 1}) for a in ("--set", kv)]
    run = tmp_path / "run"
    r = _cli("train", "--config", "configs/tiny.yaml", "--output", str(run), *over)
    assert r.returncode == 0, r.stderr[-2000:]
    ck = run / "checkpoints" / "step_1"
    optim = ck / "optimizer.pt"
    good = optim.read_bytes()
    optim.write_bytes(good[: len(good) // 2])  # torn write
    line = _one_line_error(run_cli_in_process("train", "--config", "configs/tiny.yaml", "--output", str(run), *over,
                                              "--set", "train.iterations=2", "--resume", "auto"))
    assert "optimizer.pt" in line and "corrupt" in line
    # ZeRO-partitioned optimizer state (from a distributed learner group) cannot go into one process
    torch.save({"zero": {"stage": 1, "world": 2, "ranks": [{}, {}]}}, optim)
    line = _one_line_error(run_cli_in_process("train", "--config", "configs/tiny.yaml", "--output", str(run), *over,
                                              "--set", "train.iterations=2", "--resume", "auto"))
    assert "ZeRO-1" in line and "2 learner ranks" in line and "step_1" in line
    assert len(read_metrics(run / "metrics.jsonl")) == 1  # nothing lost


def test_paper_formulation_and_stop_ratio_both_train(tmp_path, tiny_backbone_dir):
    """The paper's formulation (Beta ratio on the official inputs, 1+exp head, stop below sigma_min) still trains;
    the stop-ratio action trains too, with its stored log-probs recomputed exactly on the first epoch, trajectories
    that end by a stop action (sigma 0 straight from a sigma well above sigma_min), and a learned spread."""
    paper = _trainer(tmp_path, tiny_backbone_dir, "paper", **{"policy.inputs": "paper", "policy.action": "beta"})
    paper.train()
    recs = read_metrics(tmp_path / "paper" / "metrics.jsonl")
    assert len(recs) == 2 and all(r["policy/behaviour_logp_err"] < 1e-5 for r in recs)
    assert paper.policy.spec.inputs == "paper" and paper.policy.spec.action == "beta"

    stop = _trainer(tmp_path, tiny_backbone_dir, "stop", **{"policy.action": "stop-ratio",
                                                             "policy.init_table": "[1,0.8,0.5,0]"})
    plan = plan_iteration(stop.cfg, stop.sampler, stop.prompts, 0)
    trajs = stop.executor.worker.generate(plan.prompts, plan.noise_seeds, plan.sample_keys)
    stops = trajs.action == 0
    assert bool(stops.any())  # some trajectories end by the stop head ...
    assert float(trajs.sigma[stops].min()) > stop.cfg.rollout.sigma_min  # ... from a sigma far above sigma_min
    assert float(trajs.steps.double().mean()) == pytest.approx(3.0, abs=1.0)  # near the 3-step table at init
    before = {k: v.clone() for k, v in stop.policy.state_dict().items()}
    stop.train()
    recs = read_metrics(tmp_path / "stop" / "metrics.jsonl")
    assert all(r["policy/behaviour_logp_err"] < 1e-5 and r["policy/first_step_clipfrac"] == 0.0 for r in recs)
    assert any(not torch.equal(before[k], v) for k, v in stop.policy.state_dict().items())
