"""The one-GPU layout (configs/sd3_medium_1gpu.yaml) placed on a CPU-only machine that declares one GPU.

Ray's GPU resource is a scheduling label: a local instance started with ``num_gpus=1`` places the layout's
fractional bundles exactly as on a one-GPU workstation, while ``--set`` overrides keep every tensor on the CPU.
Each test starts its own Ray instance and stops only that one (``ray.init`` / ``ray.shutdown`` in this process,
or the ``tpdm-rl train`` subprocess that starts and stops its own local instance).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import small_overrides
from own_ray import run_own_ray

from tpdm_rl.builders.reward_fixtures import make_all
from tpdm_rl.core.config_io import load_config
from tpdm_rl.core.metrics_reader import read_metrics
from tpdm_rl.training.resources import role_bundles, total

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CONFIG = "configs/sd3_medium_1gpu.yaml"
#: what a one-GPU workstation declares: the config's CPU counts (5) fit, and exactly one GPU
DECLARED = {"CPU": 8, "GPU": 1}
#: role -> the GPU share the config gives each of its actors
GPU_SHARES = {"rollout": 0.6, "reward[hpsv2]": 0.1, "reward[aesthetic]": 0.1, "learner": 0.2}


@pytest.fixture(scope="module")
def reward_fixtures(tmp_path_factory) -> dict:
    return make_all(tmp_path_factory.mktemp("reward_fixtures"))


def cpu_overrides(backbone_dir: str, fx: dict, **extra) -> list[str]:
    """The one-GPU config shrunk to the tiny backbone and tiny reward fixtures, every device forced to the CPU;
    the layout (distributed.*) is left as the config has it."""
    out = small_overrides(backbone_dir, **{
        "backbone.device": "cpu", "train.device": "cpu", "backbone.feature_blocks": "[0,-1]",
        "backbone.max_sequence_length": 32, "train.iterations": 1, "distributed.threads_per_actor": 1,
        "distributed.startup_timeout_s": 600, **extra})
    for name in ("hpsv2", "aesthetic"):
        out += [f"rewards.{name}.{k}={v}" for k, v in fx[name].items()] + [f"rewards.{name}.device=cpu"]
    return out


def test_the_one_gpu_configs_ask_for_exactly_one_gpu():
    for path in (CONFIG, "configs/flux_dev_1gpu.yaml"):
        cfg = load_config(path)
        bundles = role_bundles(cfg)
        assert total([b for _, b in bundles])["GPU"] == pytest.approx(1.0), path
        assert {r: b.get("GPU", 0.0) for r, b in bundles} == GPU_SHARES, path
        assert cfg.backbone.dtype == "bfloat16" and cfg.backbone.offload_text_encoders
        assert cfg.distributed.learner.num_ranks == 1 and cfg.distributed.rollout.num_workers == 1


def test_one_gpu_layout_is_placed_and_runs_an_iteration(tiny_backbone_dir, reward_fixtures, tmp_path):
    """One placement group holding every role's GPU share is created on a Ray instance with one GPU, each role
    actor runs inside it with its share, and one iteration of the tiny backbone goes through rollout, both
    rewards and the DeepSpeed learner (gloo on the CPU)."""
    import ray
    from ray.util import placement_group_table

    from tpdm_rl.training.controller import Controller

    cfg = load_config(CONFIG, cpu_overrides(tiny_backbone_dir, reward_fixtures))
    seen: dict = {}

    def inspect(iteration: int, metrics: dict) -> None:
        ex = ctl.executor
        groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
        seen["groups"] = [[b for b in g["bundles"].values()] for g in groups]

        def assigned(handle) -> dict:
            return ray.get(handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_assigned_resources()))

        seen["actors"] = {"rollout": [assigned(a) for a in ex.rollout_pool.actors],
                          **{f"reward[{n}]": [assigned(a) for a in p.actors] for n, p in ex.reward_pools.items()},
                          "learner": [assigned(a) for a in ex.learners]}
        seen["pg"] = ex._gang.pg.id.hex() if ex._gang and ex._gang.pg else None

    ray.init(address="local", num_cpus=DECLARED["CPU"], num_gpus=DECLARED["GPU"], include_dashboard=False,
             log_to_driver=False)
    try:
        assert ray.cluster_resources()["GPU"] == 1.0
        ctl = Controller(cfg, output=tmp_path / "run")
        ctl.train(on_iteration=inspect)
    finally:
        ray.shutdown()
    assert seen["pg"] is not None and len(seen["groups"]) == 1  # one group for every role, reserved up front
    bundles = seen["groups"][0]
    assert sum(b.get("GPU", 0.0) for b in bundles) == pytest.approx(1.0)
    assert sorted(b.get("GPU", 0.0) for b in bundles) == sorted(GPU_SHARES.values())
    for role, share in GPU_SHARES.items():
        (res,) = seen["actors"][role]  # one actor per role
        assert res.get("GPU") == pytest.approx(share), (role, res)
    (rec,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rec["learner/ranks"] == 1 and rec["rollout/trajectories"] == 8
    for k in ("reward/hpsv2", "reward/aesthetic", "time/rollout_s", "time/reward_s", "time/learn_s", "time/sync_s"):
        assert isinstance(rec[k], float), k
    assert rec["policy/version"] == 1 and rec["policy/behaviour_logp_err"] < 1e-4


def test_an_infeasible_layout_is_refused_at_once_in_one_line(tiny_backbone_dir, reward_fixtures, tmp_path):
    """0.6 + 0.1 + 0.1 + 0.7 = 1.5 GPUs on a machine with one: ``tpdm-rl train`` (which starts its own local Ray
    instance, sized by RAY_OVERRIDE_RESOURCES) stops before any actor starts, with one line naming the GPUs."""
    over = cpu_overrides(tiny_backbone_dir, reward_fixtures, **{"distributed.learner.num_gpus": 0.7})
    cmd = [sys.executable, "-m", "tpdm_rl.cli", "train", "--config", CONFIG, "--output", str(tmp_path / "run")]
    for o in over:
        cmd += ["--set", o]
    env = {"RAY_OVERRIDE_RESOURCES": json.dumps(DECLARED), "OMP_NUM_THREADS": "1"}
    r = run_own_ray(cmd, env=env, timeout=300, cwd=Path(__file__).parent.parent)  # a wait for placement: 900 s
    errors = [line for line in r.stderr.splitlines() if line.startswith("tpdm-rl: error:")]
    assert r.returncode == 1, r.stderr[-3000:]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "1.5 GPU (cluster has 1)" in errors[0] and "distributed." in errors[0], errors[0]
    assert "Traceback" not in r.stderr
    assert "reserving" not in r.stderr and "starting 1 rollout" not in r.stderr  # nothing was placed or started
