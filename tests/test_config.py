import subprocess
import sys
from pathlib import Path

import pytest

from tpdm_rl.core.config import ConfigError
from tpdm_rl.core.config_io import load_config


def _err(tmp_path, text, overrides=()):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_tiny_config_validate():
    cfg = load_config("configs/tiny.yaml")
    assert cfg.rollout.group_size == 8 and "fidelity" in cfg.rewards
    assert load_config(None).step_penalty.mode == "additive"


def test_unknown_key_names_the_path(tmp_path):
    msg = _err(tmp_path, "rollout:\n  group_sise: 4\n")
    assert "rollout.group_sise" in msg and "unknown key" in msg


def test_wrong_type_and_out_of_range(tmp_path):
    assert "rollout.group_size" in _err(tmp_path, "rollout:\n  group_size: many\n")
    msg = _err(tmp_path, "rollout:\n  group_size: 1\n")
    assert "rollout.group_size" in msg and "got 1" in msg
    assert "optim.lr" in _err(tmp_path, "optim:\n  lr: -1\n")


def test_overrides_are_validated(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["rollout.group_size=4", "rewards.fidelity.weight=0.5"])
    assert cfg.rollout.group_size == 4 and cfg.rewards["fidelity"].weight == 0.5
    with pytest.raises(ConfigError, match="algorithm.clip_epz"):
        load_config("configs/tiny.yaml", ["algorithm.clip_epz=0.1"])
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        load_config("configs/tiny.yaml", ["oops"])


def test_discount_refused_with_rewards_that_can_be_negative(tmp_path):
    # fidelity (PSNR) is non-negative: allowed
    load_config(None, ["step_penalty.mode=discount"])
    # a normalised component can be negative: the gamma^k discount would reward more steps
    with pytest.raises(ConfigError, match="discount"):
        load_config(None, ["step_penalty.mode=discount", "rewards.fidelity.normalize=group"])
    with pytest.raises(ConfigError, match="unknown reward"):
        load_config(None, ["rewards.nonsense.weight=1"])


def test_policy_init_must_give_beta_parameters_above_one():
    with pytest.raises(ConfigError, match="policy"):
        load_config(None, ["policy.init_ratio=0.95", "policy.init_concentration=10"])


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  group_sise: 4\n")
    r = subprocess.run([sys.executable, "-m", "tpdm_rl.cli", "train", "--config", str(bad), "--output",
                        str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "WARNING" not in ln]
    assert len(lines) == 1 and "rollout.group_sise" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_shipped_configs_validate():
    for name in ("configs/tiny.yaml", "configs/tiny_rewards.yaml", "configs/sd3_medium.yaml"):
        cfg = load_config(name)
        assert cfg.rewards
    sd3 = load_config("configs/sd3_medium.yaml")
    assert sd3.distributed.enabled and sd3.backbone.resolution == 1024
    assert set(sd3.rewards) == {"hpsv2", "aesthetic"} and sd3.step_penalty.mode == "additive"
    assert sd3.reward_pool("hpsv2").num_gpus == 0.5


@pytest.mark.parametrize("name,family,blocks", [("flux_dev", "flux", [18, 56]), ("flux_schnell", "flux", [18, 56]),
                                                  ("sd35_medium", "sd3", [11, 23])])
def test_backbone_family_configs_validate_with_the_cli(name, family, blocks):
    """`tpdm-rl config` accepts the real-size SD3.5 and FLUX.1 configs (GPU-oriented: nothing is loaded)."""
    path = Path(__file__).parent.parent / "configs" / f"{name}.yaml"
    r = subprocess.run([sys.executable, "-m", "tpdm_rl.cli", "config", "--config", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cfg = load_config(str(path))
    assert cfg.backbone.family == family and cfg.backbone.feature_blocks == blocks
    assert cfg.backbone.resolution == 1024 and cfg.backbone.dtype == "bfloat16" and cfg.distributed.enabled
    assert f"family: {family}" in r.stdout


def test_backbone_family_typo_names_the_value():
    with pytest.raises(ConfigError, match=r"backbone\.family"):
        load_config(None, ["backbone.family=flx"])


def test_unknown_reward_option_names_the_key():
    with pytest.raises(ConfigError, match=r"rewards\.hpsv2\.chekpoint: unknown option"):
        load_config(None, ["rewards.hpsv2.chekpoint=/x.pt"])


def test_every_config_key_is_documented_and_docs_are_current():
    from tpdm_rl.commands.config import config_reference, markdown_reference

    rows = config_reference()
    assert len(rows) > 60
    missing = [r["key"] for r in rows if not r["description"]]
    assert not missing, missing
    keys = {r["key"] for r in rows}
    assert {"rollout.group_size", "distributed.learner.zero_stage", "rewards.<name>.weight", "train.threads"} <= keys
    bounds = {r["key"]: r["bounds"] for r in rows}
    assert bounds["rollout.group_size"] == ">= 2" and bounds["policy.init_ratio"] == "> 0.0, < 1.0"
    # docs/config.md opens with this table (the whole file is checked in tests/test_docs.py)
    doc = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    table = markdown_reference().split("\n| key |", 1)[1]
    assert table in doc, "docs/config.md is stale: run python -m tpdm_rl.commands.reference"


def test_config_explain_cli():
    r = subprocess.run([sys.executable, "-m", "tpdm_rl.cli", "config", "--explain"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("rollout.group_size "))
    assert "int" in line and "default 8" in line and ">= 2" in line and "GRPO" in line


def test_tpdm_penalty_mode_needs_non_negative_rewards(tmp_path):
    """Like the plain discount, the official formula would reward more steps when a reward can be negative."""
    assert load_config(None, ["step_penalty.mode=tpdm"]).step_penalty.mode == "tpdm"  # fidelity: non-negative
    with pytest.raises(ConfigError, match="tpdm"):
        load_config(None, ["step_penalty.mode=tpdm", "rewards.fidelity.normalize=group"])


def test_the_places_experiment_config_validates_and_evaluates_on_held_out_places_prompts():
    from tpdm_rl.core.config_io import load_config

    cfg = load_config("configs/toy_places.yaml")
    assert cfg.backbone.path == "builtin:toy-places" and cfg.rollout.prompts == "builtin:toy-places-train"
    assert cfg.eval.enabled and cfg.eval.prompts == "builtin:toy-places-heldout" and cfg.eval.seeds == 2
    assert cfg.eval.tables == "builtin:toy-places" and "tpm-mean" in cfg.eval.methods
    assert cfg.policy.action == "stop-ratio" and cfg.policy.stop_sharpness == 3.0
