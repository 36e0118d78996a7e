"""The generated references in docs/ are current, and the metric catalogue describes what an iteration logs."""

from __future__ import annotations

import shutil

import pytest
from conftest import small_overrides

from tpdm_rl.commands.reference import GENERATED, ROOT, config_markdown, main, stale
from tpdm_rl.core.config_io import load_config
from tpdm_rl.core.metrics_reader import read_metrics
from tpdm_rl.core.reward_registry import BUILTIN_MODULES, reward_names
from tpdm_rl.training.controller import Controller
from tpdm_rl.training.metrics import METRICS, metric_info, metric_unit
from tpdm_rl.training.summary import summary_unit

#: catalogue keys an ordinary iteration without faults does not log
CONDITIONAL = {"health/nonfinite_reward", "reward/<name>_<extra>"}


def test_generated_references_are_current():
    if set(reward_names()) != set(BUILTIN_MODULES):
        pytest.skip("an optional reward dependency is missing here: the reward tables would differ")
    assert stale() == [], "stale generated reference: run python -m tpdm_rl.commands.reference"


def test_the_staleness_check_sees_an_edit(tmp_path):
    for f in GENERATED:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, tmp_path / f)
    assert main(["--root", str(tmp_path)]) == 0  # regenerates both
    assert stale(tmp_path) == []
    (tmp_path / "docs" / "metrics.md").write_text((tmp_path / "docs" / "metrics.md").read_text().replace("| s |", "| ms |"))
    assert stale(tmp_path) == ["docs/metrics.md"]
    assert main(["--check", "--root", str(tmp_path)]) == 1


def test_config_reference_lists_resume_keys_and_reward_options():
    doc = config_markdown()
    assert "- `rollout.batch_size`" in doc and "- `rewards.*.num_workers`" in doc
    assert "- `optim.lr`" not in doc  # needs --allow-config-change
    assert "| `fidelity` | dB | `batch_size` | `256` |" in doc
    assert "|  |  | `max_psnr` | `55.0` |" in doc


def test_every_key_a_real_iteration_logs_is_in_the_catalogue(tmp_path, tiny_backbone_dir):
    cfg = load_config("configs/tiny.yaml", small_overrides(tiny_backbone_dir, **{"train.iterations": 1}))
    seen: list[tuple[int, dict]] = []
    Controller(cfg, output=tmp_path / "run").train(on_iteration=lambda it, m: seen.append((it, m)))
    (rec,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [it for it, _ in seen] == [0] and seen[0][1]["reward/total"] == rec["reward/total"]  # the callback
    unknown = [k for k in rec if metric_info(k) is None]
    assert not unknown, f"metric keys missing from tpdm_rl/training/metrics.py METRICS: {unknown}"
    patterns = {metric_info(k).key.replace("fidelity", "<name>") for k in rec}
    never = [m.key for m in METRICS if m.key not in CONDITIONAL and m.key not in patterns]
    assert not never, f"catalogue keys an iteration did not log: {never}"
    # the run summary's units (tpdm_rl/training/summary.py) agree with the catalogue
    for k in rec:
        if summary_unit(k):
            assert metric_unit(k) == summary_unit(k), k
    assert metric_unit("reward/fidelity") == "dB" and metric_unit("time/reward_fidelity_s") == "s"


def test_reward_extras_and_unknown_keys():
    assert metric_info("reward/shapes_exact").unit == "fraction"
    assert metric_info("reward/shapes").unit == "fraction"
    assert metric_info("rewards/shapes_calls").description == "scoring calls made to component `shapes`"
    assert metric_info("reward/clip_score").unit == "cosine"  # a name with "_" is a component, not an extra
    assert metric_info("reward/nonsense") is None and metric_info("time/nothing_s") is None
