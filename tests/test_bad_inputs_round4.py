"""Issue 30's BAD and WEAK inputs (round 4): each is one line naming the bad value and what was expected, a
non-zero exit, no traceback and no lost data; or a silence / wrong word that is now fixed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli_in_process, small_overrides

ROOT = Path(__file__).resolve().parent.parent


def _sets(over: list[str]) -> list[str]:
    return [a for kv in over for a in ("--set", kv)]


def _one_line(r, code=None) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("tpdm-rl: warning")]
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    return lines[0]


#: a 1-iteration run on the shipped toy backbone, as small as it gets
TOY_SMALL = ["train.iterations=1", "rollout.prompts_per_iteration=1", "rollout.group_size=2", "rollout.batch_size=2",
             "rollout.max_steps=6", "eval.enabled=false", "logging.progress=false", "logging.tensorboard=false",
             "train.threads=1", "policy.hidden=16", "checkpoint.every=1"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished 1-iteration run on ``builtin:toy`` (tests copy it before they change it)."""
    out = tmp_path_factory.mktemp("toy") / "run"
    r = run_cli_in_process("train", "--config", "configs/toy.yaml", "--output", str(out), *_sets(TOY_SMALL))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_backbone_dir):
    out = tmp_path_factory.mktemp("tiny") / "run"
    r = run_cli_in_process("train", "--config", "configs/tiny.yaml", "--output", str(out),
                           *_sets(small_overrides(tiny_backbone_dir, **{"train.iterations": 1})))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


# ---------------------------------------------------------------------------- BAD 1: two evals into one folder
def test_a_second_eval_into_a_folder_in_use_is_refused_at_once(tiny_run, tmp_path):
    from tpdm_rl.runfolder import lock_folder, unlock_folder

    out = tmp_path / "eval"
    held = lock_folder(out, "eval folder", "wait")  # what a running `tpdm-rl eval` holds (another open file)
    try:
        start = time.perf_counter()
        r = run_cli_in_process("eval", "--checkpoint", str(tiny_run), "--output", str(out), "--methods", "fixed:2",
                               "--pareto-steps", "2", "--limit", "1", "--no-progress", "--threads", "1")
        line = _one_line(r, 1)
        assert "eval folder" in line and "is in use by pid" in line and str(out) in line, line
        assert time.perf_counter() - start < 5
        assert sorted(p.name for p in out.iterdir()) == [".tpdm-rl.lock"]  # nothing written beside the owner
    finally:
        unlock_folder(held)
    # once the owner is gone the folder is free again, and the evaluation holds the lock while it runs
    seen = {}
    import tpdm_rl.evaluation.run as run_mod

    real = run_mod._evaluate

    def spy(*a, **k):
        try:
            lock_folder(out, "eval folder", "wait")
        except Exception as exc:  # noqa: BLE001
            seen["refused"] = str(exc)
        return real(*a, **k)

    run_mod._evaluate = spy
    try:
        r = run_cli_in_process("eval", "--checkpoint", str(tiny_run), "--output", str(out), "--methods", "fixed:2",
                               "--pareto-steps", "2", "--limit", "1", "--no-progress", "--threads", "1")
    finally:
        run_mod._evaluate = real
    assert r.returncode == 0, r.stderr[-2000:]
    assert "is in use by pid" in seen.get("refused", ""), seen
    assert (out / "COMPLETE").is_file()


# ---------------------------------------------------------------------------- BAD 2: builtin backbone names
def test_builtin_backbones_are_accepted_and_recorded_by_name(toy_run, tmp_path):
    from tpdm_rl.tpm_file import locate_tpm, read_tpm_meta

    meta = json.loads(read_tpm_meta(locate_tpm(toy_run))["inference"])
    assert meta["backbone_path"] == "builtin:toy", meta["backbone_path"]  # not the clone's absolute path
    png = tmp_path / "s.png"
    r = run_cli_in_process("sample", "--checkpoint", str(toy_run), "--backbone", "builtin:toy", "--prompt",
                           "a red circle on a white background", "--output", str(png), "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert png.is_file()
    ev = tmp_path / "eval"
    r = run_cli_in_process("eval", "--checkpoint", str(toy_run), "--backbone", "builtin:toy", "--output", str(ev),
                           "--prompts", "builtin:toy-heldout", "--limit", "1", "--methods", "tpm,fixed:4",
                           "--pareto-steps", "4", "--rewards", "shapes", "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((ev / "results.json").read_text())["backbone"] == "builtin:toy"
    # an export names the backbone by its builtin name and works from another folder
    exp = tmp_path / "export"
    assert run_cli_in_process("export", "--checkpoint", str(toy_run), "--output", str(exp)).returncode == 0
    cfg = json.loads((exp / "tpdm_config.json").read_text())
    assert cfg["inference"]["backbone_path"] == "builtin:toy"
    assert str(ROOT) not in (exp / "tpdm_config.json").read_text().split('"training_config"')[0]
    moved = tmp_path / "elsewhere" / "export"
    shutil.copytree(exp, moved)
    code = ("from tpdm_rl.rollout.pipeline import TPDMPipeline; "
            f"p = TPDMPipeline.from_pretrained(tpm={str(moved)!r}, device='cpu'); "
            "print('backbone', p.settings['backbone_path'])")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                         timeout=300)
    assert "backbone builtin:toy" in res.stdout, res.stderr[-2000:]


def test_older_tpm_files_naming_the_shipped_folder_are_read_as_the_builtin_name(tmp_path):
    from tpdm_rl.rollout.toy import builtin_name, shipped_toy_dir

    assert builtin_name(str(shipped_toy_dir("builtin:toy"))) == "builtin:toy"
    assert builtin_name("/home/someone/clone/tpdm_rl/data/toy_places_backbone") == "builtin:toy-places"
    assert builtin_name("builtin:toy") == "builtin:toy" and builtin_name("/tmp/x") is None


def test_an_unknown_builtin_backbone_is_one_line(toy_run, tmp_path):
    r = run_cli_in_process("sample", "--checkpoint", str(toy_run), "--backbone", "builtin:toys", "--prompt",
                           "a red circle on a white background", "--output", str(tmp_path / "s.png"))
    line = _one_line(r)
    assert "'builtin:toys'" in line and "builtin:toy-places" in line, line
