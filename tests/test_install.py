"""Installation: the distribution installs one top-level package, ``tpdm_rl`` (wheel and editable)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_only_the_tpdm_rl_namespace(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("tpdm_rl-*.whl"))).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tpdm_rl"}
    for f in ("tpdm_rl/rollout/engine.py", "tpdm_rl/rewards/shapes.py", "tpdm_rl/executors/local.py",
              "tpdm_rl/data/prompts_train.txt", "tpdm_rl/data/toy_backbone/model_index.json",
              "tpdm_rl/data/toy_backbone/transformer/diffusion_pytorch_model.safetensors"):
        assert f in names, f
    # every module of the source tree is in the wheel (an explicit package list can forget a subpackage)
    mapping = {"tpdm_rl": "tpdm_rl", "rollout": "tpdm_rl/rollout", "rewards": "tpdm_rl/rewards"}
    missing = [str(p) for folder, dest in mapping.items() for p in (ROOT / folder).rglob("*.py")
               if f"{dest}/{p.relative_to(ROOT / folder).as_posix()}" not in names]
    assert not missing, missing


def test_editable_install_maps_the_same_names(tmp_path):
    """Outside the checkout (no repository folder on sys.path) only ``tpdm_rl.*`` resolves."""
    code = ("import importlib.util as u, tpdm_rl.rollout.engine as e, tpdm_rl.rewards.shapes as s;"
            "print(u.find_spec('rollout'), u.find_spec('rewards'), e.__file__, s.__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    none1, none2, engine, shapes = r.stdout.split()
    assert none1 == none2 == "None"
    assert Path(engine) == ROOT / "rollout" / "engine.py" and Path(shapes) == ROOT / "rewards" / "shapes.py"
