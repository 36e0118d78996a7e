"""Issue 4 end to end: HPSv2 + aesthetic (tiny fixtures in the real formats) + step penalty."""

import subprocess
import sys

import pytest
from conftest import small_overrides
from tpdm_rl.rewards import RewardError

from tpdm_rl.builders.reward_fixtures import make_all
from tpdm_rl.core.config_io import load_config
from tpdm_rl.core.metrics_reader import read_metrics
from tpdm_rl.training.controller import Controller


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("reward_fixtures"))


def _reward_overrides(fx: dict) -> list[str]:
    out = []
    for name in ("hpsv2", "aesthetic"):
        for k, v in fx[name].items():
            out.append(f"rewards.{name}.{k}={v}")
    return out + ["rewards.aesthetic.weight=0.1", "rewards.aesthetic.normalize=running", "step_penalty.coef=0.01"]


def test_hpsv2_aesthetic_and_step_penalty_train_end_to_end(fixtures, tiny_backbone_dir, tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("rewards:\n  hpsv2: {weight: 1.0}\n  aesthetic: {weight: 0.1}\n")
    cfg = load_config(p, small_overrides(tiny_backbone_dir) + _reward_overrides(fixtures))
    assert set(cfg.rewards) == {"hpsv2", "aesthetic"}
    Controller(cfg, output=tmp_path / "run").train()
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(recs) == 2
    for r in recs:
        for k in ("reward/hpsv2", "reward/aesthetic", "reward/total", "reward/step_penalty", "steps/mean"):
            assert isinstance(r[k], float), k
        assert -1.0 <= r["reward/hpsv2"] <= 1.0  # a cosine
        # total = 1.0 * hpsv2 + 0.1 * running-normalised aesthetic - 0.01 * steps
        assert r["reward/step_penalty"] == pytest.approx(0.01 * r["steps/mean"])
    state = (tmp_path / "run" / "checkpoints" / "step_2" / "trainer_state.json").read_text()
    assert '"aesthetic"' in state and '"count"' in state  # running normalisation statistics are checkpointed


def test_missing_reward_checkpoint_fails_before_the_first_rollout(fixtures, tiny_backbone_dir, tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("rewards:\n  hpsv2: {weight: 1.0}\n")
    over = small_overrides(tiny_backbone_dir) + [f"rewards.hpsv2.model_name={fixtures['hpsv2']['model_name']}",
                                                 f"rewards.hpsv2.checkpoint={tmp_path / 'nope' / 'HPS.pt'}"]
    cfg = load_config(p, over)
    with pytest.raises(RewardError, match="nope/HPS.pt"):
        Controller(cfg, output=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint" * 100)
    args = [sys.executable, "-m", "tpdm_rl.cli", "train", "--config", str(p), "--output", str(tmp_path / "run2")]
    for o in over[:-1] + [f"rewards.hpsv2.checkpoint={corrupt}"]:
        args += ["--set", o]
    r = subprocess.run(args, capture_output=True, text=True)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln
             and not ln.startswith("tpdm-rl: warning")]  # warnings (e.g. truncated prompts) are not errors
    assert r.returncode == 1 and len(lines) == 1 and "corrupt.pt" in lines[0], r.stderr
    assert not (tmp_path / "run2" / "metrics.jsonl").exists()


def test_reward_actor_scores_queued_requests_as_one_batch(fixtures):
    import torch
    from tpdm_rl.rewards.worker import RewardWorker

    from tpdm_rl.algorithm.messages import ImageBatch

    actor = RewardWorker("hpsv2", fixtures["hpsv2"])
    g = torch.Generator().manual_seed(0)
    packs = [ImageBatch(torch.rand(n, 3, 64, 64, generator=g), [f"p{i}" for i in range(n)]) for n in (3, 5)]
    together = actor.score_many(*packs).scores
    alone = [actor.score_many(p).scores[0] for p in packs]
    assert [t.shape[0] for t in together] == [3, 5]
    for t, a in zip(together, alone):
        torch.testing.assert_close(t, a, rtol=1e-5, atol=1e-5)
