"""Deployment files in cluster/: the Ray cluster launcher config, the KubeRay RayJob and its image.

Fast and offline: no cluster, no network, no Docker. The launcher config is checked with Ray's own
schema and config preparation, its setup command is run by bash in a sandbox HOME (with stand-ins for
python3/pip that record the arguments pip would get), and the RayJob is checked against
cluster/Dockerfile, .dockerignore and constraints.txt.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
EXTRAS = "[rewards,distributed]"

# Paths (relative to the repository root) that must never be shipped to nodes / into the image, and
# paths that must be.
MUST_EXCLUDE = [
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    ".venv/bin/python",
    "runs/sd3_medium/checkpoint/model.pt",
    ".git/HEAD",
    "tpdm_rl/__pycache__/cli.cpython-311.pyc",
    "tpdm_rl.egg-info/PKG-INFO",
]
MUST_KEEP = [
    "pyproject.toml",
    "constraints.txt",
    "tpdm_rl/__init__.py",
    "tpdm_rl/cli.py",
    "rollout/__init__.py",
    "rewards/__init__.py",
    "configs/sd3_medium.yaml",
]


def _launcher_config() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def _rayjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()) if d is not None]


def _rayjob() -> dict:
    jobs = [d for d in _rayjob_docs() if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"expected one RayJob in cluster/rayjob.yaml, found {len(jobs)}"
    return jobs[0]


def _pod_specs(job: dict) -> list[dict]:
    cluster = job["spec"]["rayClusterSpec"]
    specs = [cluster["headGroupSpec"]["template"]["spec"]]
    specs += [group["template"]["spec"] for group in cluster.get("workerGroupSpecs", [])]
    return specs


# --------------------------------------------------------------------------------------------------
# cluster/ray-cluster.yaml


def test_launcher_config_validates_against_rays_schema():
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(_launcher_config(), schema)


def test_launcher_config_passes_rays_prepare_and_validate():
    # What `ray up` does before it talks to the cloud: merge the provider's defaults, then validate.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher_config()
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    # The defaults merge must not drop the sync filters.
    assert prepared.get("rsync_exclude") == config["rsync_exclude"]
    assert prepared.get("rsync_filter") == config.get("rsync_filter")


def _fake_bin(root: Path) -> Path:
    """python3 stand-in: `python3 -m venv DIR` creates DIR/bin/pip, which records its arguments."""
    bin_dir = root / "fakebin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(
        "#!/bin/bash\n"
        '[ "$1" = -m ] && [ "$2" = venv ] && [ -n "$3" ] || exit 2\n'
        'mkdir -p "$3/bin"\n'
        'printf \'#!/bin/bash\\nprintf "%%s\\\\0" "$@" > "$PIP_RECORD"\\n\' > "$3/bin/pip"\n'
        'chmod +x "$3/bin/pip"\n'
    )
    python3.chmod(0o755)
    return bin_dir


def _pip_args_of(command: str, tmp_path: Path) -> tuple[Path, list[str]]:
    """Runs a setup command with bash in a sandbox HOME; returns (HOME, the arguments pip received)."""
    home = tmp_path / "home"
    home.mkdir()
    # A decoy that an unquoted `.../tpdm-rl[rewards,distributed]` would glob-expand to.
    (home / "tpdm-rls").write_text("")
    record = tmp_path / "pip_args"
    env = {
        "HOME": str(home),
        "PATH": f"{_fake_bin(tmp_path)}:/usr/bin:/bin",
        "PIP_RECORD": str(record),
    }
    subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", command], cwd=home, env=env, check=True, timeout=30
    )
    assert record.exists(), f"pip was not run by: {command}"
    return home, record.read_text().split("\0")[:-1]


def _option_value(args: list[str], option: str) -> str:
    assert option in args, f"pip got no {option}: {args}"
    return args[args.index(option) + 1]


def _pip_setup_command() -> str:
    commands = [c for c in _launcher_config()["setup_commands"] if "pip install" in c]
    assert len(commands) == 1, commands
    return commands[0]


def test_setup_command_gives_pip_expanded_paths(tmp_path):
    home, args = _pip_args_of(_pip_setup_command(), tmp_path)
    assert not [a for a in args if "~" in a], f"unexpanded ~ reached pip: {args}"
    editable = _option_value(args, "-e")
    assert editable == f"{home}/tpdm-rl{EXTRAS}"
    assert _option_value(args, "-c") == f"{home}/tpdm-rl/constraints.txt"


def test_setup_command_installs_the_file_mounted_repository(tmp_path):
    config = _launcher_config()
    home, args = _pip_args_of(_pip_setup_command(), tmp_path)
    project = PurePosixPath(_option_value(args, "-e").removesuffix(EXTRAS)).relative_to(home)
    remote = f"/home/{config['auth']['ssh_user']}/{project}"
    assert config["file_mounts"].get(remote) == ".", (remote, config["file_mounts"])


@pytest.mark.parametrize(
    "broken",
    [
        'python3 -m venv ~/tpdm && ~/tpdm/bin/pip install -e "~/tpdm-rl[rewards,distributed]"',
        "python3 -m venv ~/tpdm && ~/tpdm/bin/pip install -e $HOME/tpdm-rl[rewards,distributed]",
    ],
)
def test_setup_command_check_catches_broken_forms(tmp_path, broken):
    # The quoted ~ (the audited bug) and an unquoted [..] glob both give pip a wrong requirement.
    home, args = _pip_args_of(broken, tmp_path)
    assert _option_value(args, "-e") != f"{home}/tpdm-rl{EXTRAS}"


def _rsync_pattern_matches(pattern: str, parts: tuple[str, ...], is_dir: bool) -> bool:
    """rsync --exclude semantics (the subset used here): a leading / anchors at the transfer root, a
    trailing / matches directories only, a pattern without an inner / matches the last component."""
    if pattern.endswith("/") and not is_dir:
        return False
    anchored = pattern.startswith("/")
    pat = tuple(pattern.strip("/").split("/"))
    if anchored:
        cands = [parts] if len(parts) == len(pat) else []
    else:
        cands = [parts[-len(pat) :]] if len(parts) >= len(pat) else []
    return any(all(fnmatch.fnmatchcase(p, q) for p, q in zip(c, pat)) for c in cands)


def _rsync_excluded(path: str, patterns: list[str]) -> bool:
    parts = tuple(path.split("/"))
    # rsync does not descend into an excluded directory.
    for i in range(1, len(parts) + 1):
        if any(_rsync_pattern_matches(p, parts[:i], is_dir=i < len(parts)) for p in patterns):
            return True
    return False


def _gitignore_patterns() -> list[str]:
    lines = (REPO / ".gitignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_file_mounts_rsync_excludes_local_artifacts():
    config = _launcher_config()
    excludes = list(config.get("rsync_exclude") or [])
    assert excludes, "no rsync_exclude: file_mounts would push .venv/ and runs/ to every node"
    for path in [*MUST_EXCLUDE, "benchmarks/results/bench.json"]:
        assert _rsync_excluded(path, excludes), f"rsync_exclude does not cover {path}"
    # rsync_filter: .gitignore applies the repository's .gitignore as excludes as well.
    effective = excludes + (
        _gitignore_patterns() if ".gitignore" in (config.get("rsync_filter") or []) else []
    )
    for path in MUST_KEEP:
        assert not _rsync_excluded(path, effective), f"{path} would not be synced to the nodes"


# --------------------------------------------------------------------------------------------------
# cluster/rayjob.yaml, cluster/Dockerfile, .dockerignore


def test_rayjob_volumes_use_a_defined_read_write_many_claim():
    docs = _rayjob_docs()
    claims = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    referenced = []
    for spec in _pod_specs(_rayjob()):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"volumeMount {mount['name']} has no volume"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                referenced.append(volume["persistentVolumeClaim"]["claimName"])
    assert referenced, "no Pod mounts a PersistentVolumeClaim"
    for name in referenced:
        assert name in claims, f"PersistentVolumeClaim {name} is not defined in cluster/rayjob.yaml"
        claim = claims[name]
        assert claim["apiVersion"] == "v1"
        # Head and workers run on different nodes and all write to it.
        assert "ReadWriteMany" in claim["spec"]["accessModes"]
        assert claim["spec"]["resources"]["requests"]["storage"]


def test_rayjob_retries_resume_from_the_shared_volume():
    job = _rayjob()
    backoff = job["spec"].get("backoffLimit")
    assert isinstance(backoff, int) and backoff >= 1, f"spec.backoffLimit: {backoff!r}"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert "--resume" in argv and argv[argv.index("--resume") + 1] == "auto", argv
    # Each retry is a new RayCluster: the checkpoints must be on the PVC, which every Pod mounts.
    output = PurePosixPath(argv[argv.index("--output") + 1])
    for spec in _pod_specs(job):
        pvc_volumes = {v["name"] for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
        for container in spec["containers"]:
            mounts = [m for m in container.get("volumeMounts", []) if m["name"] in pvc_volumes]
            assert any(output.is_relative_to(m["mountPath"]) for m in mounts), (
                f"--output {output} is not on a PersistentVolumeClaim in container {container['name']}"
            )


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _dockerfile_layout() -> dict:
    """FROM image, WORKDIR, where `COPY . <dest>` puts the repository, and the pip install commands."""
    layout = {"from": None, "copy_dest": None, "pip": []}
    workdir = PurePosixPath("/")
    for keyword, rest in _dockerfile_instructions():
        if keyword == "FROM":
            layout["from"] = rest.split()[0]
        elif keyword == "WORKDIR":
            workdir = workdir / rest
        elif keyword == "COPY":
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            if args[:-1] == ["."]:
                layout["copy_dest"] = str(workdir / args[-1])
                layout["copy_workdir"] = str(workdir)
        elif keyword == "RUN" and "pip install" in rest:
            layout["pip"].append((str(workdir), shlex.split(rest)))
    return layout


def test_rayjob_working_dir_is_the_images_repository_copy():
    job = _rayjob()
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    layout = _dockerfile_layout()
    assert layout["copy_dest"], "cluster/Dockerfile does not COPY the repository (COPY . DEST)"
    assert runtime_env["working_dir"] == layout["copy_dest"]
    # The entrypoint's config is read relative to the working_dir.
    config = shlex.split(job["spec"]["entrypoint"])
    assert (REPO / config[config.index("--config") + 1]).is_file()


def test_dockerfile_installs_the_copy_with_constraints_and_matching_ray():
    layout = _dockerfile_layout()
    ray_version = _rayjob()["spec"]["rayClusterSpec"]["rayVersion"]
    image, _, tag = layout["from"].partition(":")
    assert image == "rayproject/ray"
    assert tag.split("-")[0] == ray_version and "py311" in tag and "gpu" in tag, tag
    pins = dict(ln.split("==", 1) for ln in (REPO / "constraints.txt").read_text().splitlines() if "==" in ln)
    assert pins["ray"] == ray_version
    installs = [(wd, argv) for wd, argv in layout["pip"] if f"{layout['copy_dest']}{EXTRAS}" in argv]
    assert len(installs) == 1, layout["pip"]
    workdir, argv = installs[0]
    constraints = PurePosixPath(workdir) / _option_value(argv, "-c")
    assert constraints == PurePosixPath(layout["copy_dest"]) / "constraints.txt"
    # Editable: the image holds one copy of the code, both installed and rayjob.yaml's working_dir (what
    # the workers then import is tested in tests/test_source_tree.py).
    assert _option_value(argv, "-e") == f"{layout['copy_dest']}{EXTRAS}"


def test_rayjob_containers_run_the_job_image():
    images = {c["image"] for spec in _pod_specs(_rayjob()) for c in spec["containers"]}
    assert len(images) == 1, f"head and workers run different images: {images}"
    (image,) = images
    assert image.rsplit("/", 1)[-1].split(":")[0] == "tpdm-rl", image


def _dockerignore_excluded(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: patterns relative to the context root, ** spans directories, the last
    matching pattern wins (! re-includes), and excluding a directory excludes its contents."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = regex(raw.lstrip("!").strip().lstrip("/").removeprefix("./").rstrip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_local_artifacts_out_of_the_image():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    for path in [*MUST_EXCLUDE, "rollout/__pycache__/engine.cpython-311.pyc"]:
        assert _dockerignore_excluded(path, patterns), f".dockerignore does not cover {path}"
    for path in [*MUST_KEEP, "cluster/Dockerfile"]:
        assert not _dockerignore_excluded(path, patterns), f".dockerignore drops {path}"
