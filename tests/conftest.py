"""Shared fixtures: one tiny offline backbone per test session, small fast configs."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    from tpdm_rl.builders.tiny_backbone import make_tiny_backbone

    return str(make_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"), seed=0, sample_size=128))


@pytest.fixture(scope="session")
def backbone(tiny_backbone_dir):
    from tpdm_rl.rollout.backbone import Backbone

    return Backbone(tiny_backbone_dir, device="cpu", feature_blocks=(0, -1), feature_grid=4, max_sequence_length=32)


def small_overrides(backbone_dir: str, **extra) -> list[str]:
    """Overrides that make a training run take a few seconds."""
    base = {
        "backbone.path": backbone_dir,
        "backbone.resolution": 64,
        "backbone.feature_grid": 4,
        "rollout.prompts_per_iteration": 2,
        "rollout.group_size": 4,
        "rollout.batch_size": 4,
        "rollout.max_steps": 12,
        "rollout.reference_steps": 12,
        "policy.hidden": 16,
        "policy.init_ratio": 0.7,
        "policy.init_concentration": 10,
        "step_penalty.coef": 1.0,
        "train.iterations": 2,
        "checkpoint.every": 1,
        "logging.progress": False,
        "logging.tensorboard": False,
        "train.threads": 1,  # fixed: 0 (auto) follows the machine's load, and results agree only at equal counts
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """``tpdm-rl ARGS`` through ``tpdm_rl.cli.main`` in this process: its exit code, stdout and stderr.

    For error paths that fail before any real work: it skips the ~8 s of interpreter start and imports that a
    subprocess pays. An exception that escapes ``main`` fails the test (as a traceback would). Other tests keep
    running the real ``python -m tpdm_rl.cli`` end to end."""
    from tpdm_rl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def cli_sets(over: list[str]) -> list[str]:
    """``--set K=V`` pairs for a CLI call."""
    return [a for kv in over for a in ("--set", kv)]


def one_line_error(r, code=None) -> str:
    """The single stderr line of a failed CLI run (warnings aside); asserts no traceback and the exit code."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("tpdm-rl: warning")]
    assert r.returncode != 0 and (code is None or r.returncode == code), (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    return lines[0]
