"""Which copy of ``tpdm_rl.rollout`` / ``tpdm_rl.rewards`` a process imports (docs/design.md, "Source tree and
import names").

One mechanism maps the repository folders ``rollout/`` and ``rewards/`` to those names at run time: the finder in
``tpdm_rl/__init__.py``, active whenever ``tpdm_rl`` is imported from a source tree, and always ahead of any other
finder (an editable install's own finder knows the names too, but is never asked). A wheel has the two folders
inside ``tpdm_rl/`` and no finder. These tests prove each case, and that a Ray job's uploaded ``working_dir`` wins
over an installed copy in the workers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from own_ray import run_own_ray, short_temp_dir

REPO = Path(__file__).resolve().parents[1]

#: prints, as JSON: where tpdm_rl, tpdm_rl.rollout, tpdm_rl.rewards and one submodule come from, the marker
#: each subpackage carries (None in the repository's own copy), and which finder on sys.meta_path answers first
PROBE = textwrap.dedent("""
    import importlib, json, sys
    import tpdm_rl
    first = {}
    for name in ("tpdm_rl.rollout", "tpdm_rl.rewards"):
        for finder in sys.meta_path:
            spec = finder.find_spec(name, None)
            if spec is not None:
                first[name] = type(finder).__name__
                break
    sub = {n: importlib.import_module(n) for n in ("tpdm_rl.rollout", "tpdm_rl.rewards", "tpdm_rl.rollout.flow")}
    print(json.dumps({"tpdm_rl": tpdm_rl.__file__, **{n: m.__file__ for n, m in sub.items()},
                      "markers": [getattr(sub[n], "COPY_MARKER", None) for n in ("tpdm_rl.rollout", "tpdm_rl.rewards")],
                      "first_finder": first}))
""")


def _copy_tree(dest: Path, marker: str, tpdm_init_only: bool = True) -> Path:
    """A copy of the source tree (what a Ray job uploads) whose rollout/ and rewards/ carry ``marker``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.safetensors", "data")
    (dest / "tpdm_rl").mkdir(parents=True)
    if tpdm_init_only:
        shutil.copy(REPO / "tpdm_rl" / "__init__.py", dest / "tpdm_rl" / "__init__.py")
    else:
        shutil.copytree(REPO / "tpdm_rl", dest / "tpdm_rl", ignore=ignore, dirs_exist_ok=True)
    for folder in ("rollout", "rewards"):
        shutil.copytree(REPO / folder, dest / folder, ignore=ignore)
        with open(dest / folder / "__init__.py", "a") as fh:
            fh.write(f"\nCOPY_MARKER = {marker!r}\n")
    return dest


def _probe(first_on_path: Path | None, cwd: Path) -> dict:
    env = dict(os.environ)
    if first_on_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(first_on_path), env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_copy_first_on_pythonpath_imports_its_own_folders(tmp_path):
    """A source tree put first on PYTHONPATH (a Ray working_dir does exactly this) beside the installed copy:
    tpdm_rl, both subpackages and their submodules all come from that tree, through tpdm_rl's own finder."""
    upload = _copy_tree(tmp_path / "upload", "upload")
    got = _probe(upload, cwd=tmp_path)
    assert Path(got["tpdm_rl"]) == upload / "tpdm_rl" / "__init__.py"
    assert Path(got["tpdm_rl.rollout"]) == upload / "rollout" / "__init__.py"
    assert Path(got["tpdm_rl.rewards"]) == upload / "rewards" / "__init__.py"
    assert Path(got["tpdm_rl.rollout.flow"]) == upload / "rollout" / "flow.py"
    assert got["markers"] == ["upload", "upload"]
    assert got["first_finder"] == {"tpdm_rl.rollout": "_SourceTreeFinder", "tpdm_rl.rewards": "_SourceTreeFinder"}


def test_the_installed_source_tree_answers_through_the_same_finder(tmp_path):
    """The environment's own install (editable in CI and in the quick start) outside the checkout: the finder of
    tpdm_rl/__init__.py answers first, ahead of the editable install's finder, and maps the siblings."""
    got = _probe(None, cwd=tmp_path)
    root = Path(got["tpdm_rl"]).parent.parent
    if (root / "tpdm_rl" / "rollout").is_dir():
        pytest.skip("tpdm-rl is installed from a wheel here (no source tree)")
    assert Path(got["tpdm_rl.rollout"]) == root / "rollout" / "__init__.py"
    assert Path(got["tpdm_rl.rewards"]) == root / "rewards" / "__init__.py"
    assert got["first_finder"] == {"tpdm_rl.rollout": "_SourceTreeFinder", "tpdm_rl.rewards": "_SourceTreeFinder"}


def test_a_wheel_layout_needs_no_finder(tmp_path):
    """Installed from a wheel, rollout/ and rewards/ are inside tpdm_rl/: the finder stays off, even with stray
    rollout/ and rewards/ folders beside the package."""
    site = tmp_path / "site"
    (site / "tpdm_rl").mkdir(parents=True)
    shutil.copy(REPO / "tpdm_rl" / "__init__.py", site / "tpdm_rl" / "__init__.py")
    for folder, marker in (("rollout", "wheel"), ("rewards", "wheel")):
        shutil.copytree(REPO / folder, site / "tpdm_rl" / folder, ignore=shutil.ignore_patterns("__pycache__"))
        with open(site / "tpdm_rl" / folder / "__init__.py", "a") as fh:
            fh.write(f"\nCOPY_MARKER = {marker!r}\n")
        (site / folder).mkdir()
        (site / folder / "__init__.py").write_text("COPY_MARKER = 'stray'\n")
    got = _probe(site, cwd=tmp_path)
    assert got["markers"] == ["wheel", "wheel"]
    assert Path(got["tpdm_rl.rollout.flow"]) == site / "tpdm_rl" / "rollout" / "flow.py"
    assert "_SourceTreeFinder" not in got["first_finder"].values()


RAY_DRIVER = textwrap.dedent("""
    import json, os, sys
    import ray
    runtime_env = json.loads(sys.argv[1])
    ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env=runtime_env, log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Probe:  # a role actor, as RolloutWorker and RewardWorker are
        def where(self):
            import importlib
            import tpdm_rl
            mods = {n: importlib.import_module(n) for n in ("tpdm_rl.rollout", "tpdm_rl.rewards", "tpdm_rl.rollout.flow")}
            return {"cwd": os.getcwd(), "tpdm_rl": tpdm_rl.__file__, **{n: m.__file__ for n, m in mods.items()},
                    "markers": [getattr(mods[n], "COPY_MARKER", None) for n in ("tpdm_rl.rollout", "tpdm_rl.rewards")]}

    import tpdm_rl.rollout
    driver = {"tpdm_rl.rollout": tpdm_rl.rollout.__file__}
    worker = ray.get(Probe.remote().where.remote())
    ray.shutdown()
    print(json.dumps({"driver": driver, "worker": worker}))
""")


@pytest.mark.ray
@pytest.mark.slow
def test_ray_workers_import_the_uploaded_working_dir_not_the_installed_copy(tmp_path, request):
    """A job started with cluster/runtime_env.yaml's upload rules from a modified copy of the repository, next to
    the installed copy: the actors import tpdm_rl, tpdm_rl.rollout and tpdm_rl.rewards from the upload."""
    upload = _copy_tree(tmp_path / "upload", "upload", tpdm_init_only=False)
    shutil.copy(REPO / "pyproject.toml", upload / "pyproject.toml")
    spec = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    runtime_env = {"working_dir": str(upload), "excludes": spec["excludes"],
                   "env_vars": {k: v for k, v in spec.get("env_vars", {}).items() if k != "HF_HOME"}}
    ray_tmp = short_temp_dir()  # kept until the end of the test: the actor's unpacked upload lies inside it
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    r = run_own_ray([sys.executable, "-c", RAY_DRIVER, json.dumps(runtime_env)], cwd=tmp_path, timeout=300,
                    temp_dir=ray_tmp)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    worker, cwd = got["worker"], Path(got["worker"]["cwd"])
    # Ray unpacks the upload into its own folder and starts the actor there, first on its PYTHONPATH
    assert cwd != upload and (cwd / "rollout" / "__init__.py").is_file()
    assert Path(worker["tpdm_rl"]) == cwd / "tpdm_rl" / "__init__.py"
    assert Path(worker["tpdm_rl.rollout"]) == cwd / "rollout" / "__init__.py"
    assert Path(worker["tpdm_rl.rewards"]) == cwd / "rewards" / "__init__.py"
    assert Path(worker["tpdm_rl.rollout.flow"]) == cwd / "rollout" / "flow.py"
    assert worker["markers"] == ["upload", "upload"]
    # the driver of this test runs the installed copy, which is not the upload
    assert Path(got["driver"]["tpdm_rl.rollout"]).parent.parent != upload
