"""The first hour on a GPU in one command: CUDA tests, SD3-Medium rollout timings and a 3-iteration one-GPU training.

On a machine with one CUDA GPU and no network (about 8 minutes on an H100; ``--time-limit`` stops it earlier,
keeping what it has), it runs, most important first, each step a subprocess of the existing code:

1. ``pytest -m gpu``: the CUDA-only tests;
2. ``benchmarks/real_size.py --device cuda --sections backbone`` at 1024 px, the first ``--batch-sizes`` (it builds the random
   SD3-Medium folder, full depth, bf16, no T5, with ``make_random_backbone``: what ``tpdm-rl make-random-backbone``
   runs); seconds per backbone call, time shares, peak memory;
3. ``tpdm-rl make-tiny-rewards`` and ``tpdm-rl train --config configs/sd3_medium_1gpu.yaml`` for 3 iterations on
   that folder (bf16, DeepSpeed on NCCL, one rank; 2 prompt groups of 8 per iteration): seconds per iteration
   split into rollout, rewards, learner and sync (``metrics.jsonl``), and the peak device memory per role
   (every process of the run sampled every 0.5 s, mapped to its Ray role by its process title);
4. the same real_size rows at the other batch sizes, by default 2, 4 and 8 (one subprocess each, the folder reused);
5. with ``--flux``: FLUX.1-schnell rows at 1024 px, batch 1 and 2, when at least ``FLUX_MIN_S`` seconds are left.

It prints a line at least every 10 s, and writes ``gpu_check_<gpu-name>.json`` and ``.md`` (default
``benchmarks/results/``). ``--dry-run`` runs the same steps on the CPU at tiny size (smoke widths, 64 px, the
one-GPU layout placed on a Ray instance that declares one GPU): ``tests/test_gpu_check.py`` runs it, so the
script cannot rot.

    python benchmarks/gpu_check.py [--flux] [--time-limit 470] [--workdir DIR] [--out-dir DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
CONFIG = "configs/sd3_medium_1gpu.yaml"
HEARTBEAT_S = 10.0
#: seconds kept back from the time limit for writing the report
RESERVE_S = 10.0
#: the FLUX.1-schnell step (a 12B random build) starts only with this much time left
FLUX_MIN_S = 150.0
#: Ray process titles -> role
ROLES = {"RolloutWorker": "rollout", "RewardWorker": "reward", "LearnerRank": "learner"}


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- processes
def descendants(root: int) -> list[int]:
    """``root`` and every process below it (read from /proc; Ray's actors are children of the run's raylet)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return out


def role_of(pid: int, root: int) -> str:
    """The Ray role of a process by its title (``ray::RolloutWorker.run_task``), the controller for ``root``."""
    if pid == root:
        return "controller"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    for title, role in ROLES.items():
        if f"ray::{title}" in cmd:
            return role
    return "ray-system" if "ray" in cmd else "other"


class MemorySampler:
    """Peak memory per role of a process tree, sampled every ``every`` s: device memory per process through NVML
    on a GPU (it includes each process's CUDA context), resident memory (VmRSS) on the CPU."""

    def __init__(self, root: int, gpu: bool, every: float = 0.5) -> None:
        self.root, self.gpu, self.every = root, gpu, every
        self.peak: dict[str, int] = {}
        self.device_peak = 0
        self.kind = "VmRSS (resident host memory)"
        self._nvml: Any = None
        if gpu:
            try:
                import ray._private.thirdparty.pynvml as nvml  # vendored by Ray: no extra dependency

                nvml.nvmlInit()
                self._nvml, self._handle = nvml, nvml.nvmlDeviceGetHandleByIndex(0)
                self.kind = "NVML used GPU memory per process (CUDA context included)"
            except Exception as exc:  # noqa: BLE001 - no NVML: only the training's own metrics remain
                self.kind = f"unavailable ({type(exc).__name__}: {exc})"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        pids = set(descendants(self.root))
        per_pid: dict[int, int] = {}
        if self._nvml is not None:
            n = self._nvml
            self.device_peak = max(self.device_peak, int(n.nvmlDeviceGetMemoryInfo(self._handle).used))
            for p in n.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if p.pid in pids and p.usedGpuMemory:
                    per_pid[p.pid] = int(p.usedGpuMemory)
        elif not self.gpu:
            for pid in pids:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            per_pid[pid] = int(line.split()[1]) * 1024
                except OSError:
                    continue
        by_role: dict[str, int] = {}
        for pid, used in per_pid.items():
            role = role_of(pid, self.root)
            by_role[role] = by_role.get(role, 0) + used
        for role, used in by_role.items():
            self.peak[role] = max(self.peak.get(role, 0), used)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a process that ends between reads
                continue

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def report(self) -> dict:
        out = {"kind": self.kind, "peak_bytes_by_role": dict(sorted(self.peak.items()))}
        if self._nvml is not None:
            out["device_used_peak_bytes"] = self.device_peak
            if not self.peak:
                out["note"] = ("NVML listed no process of the run (a container with its own PID namespace): only "
                               "the whole device's peak is known")
        return out


def run_step(name: str, cmd: list[str], deadline: float, log_file: Path, env: dict | None = None,
             watch: Callable[[int], Any] | None = None) -> dict:
    """Run ``cmd`` until it ends or ``deadline`` (then SIGINT, and SIGKILL of its process group 20 s later), its
    output in ``log_file``; a heartbeat line every ``HEARTBEAT_S`` with its last output line."""
    left = deadline - time.monotonic()
    if left <= 5:
        log(f"{name}: skipped, the time limit is reached")
        return {"status": "skipped (time limit)", "command": shlex.join(cmd)}
    log(f"{name}: {shlex.join(cmd)}")
    t0 = time.monotonic()
    last = [""]
    with open(log_file, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, bufsize=1)

        def pump() -> None:
            for line in proc.stdout:  # type: ignore[union-attr]
                fh.write(line)
                if line.strip():
                    last[0] = line.strip()[-160:]

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        ctx = watch(proc.pid) if watch else None
        if ctx is not None:
            ctx.__enter__()
        timed_out = False
        try:
            while proc.poll() is None:
                try:
                    proc.wait(timeout=min(HEARTBEAT_S, max(0.1, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
                if proc.poll() is None and time.monotonic() >= deadline:
                    timed_out = True
                    log(f"{name}: time limit reached, stopping it")
                    _stop(proc)
                    break
                if proc.poll() is None:
                    log(f"{name}: running ({time.monotonic() - t0:.0f} s) {last[0]}")
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
            reader.join(timeout=10)
    seconds = time.monotonic() - t0
    status = "timed out" if timed_out else ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})")
    log(f"{name}: {status} in {seconds:.1f} s")
    out: dict[str, Any] = {"status": status, "seconds": round(seconds, 2), "command": shlex.join(cmd),
                           "log": str(log_file)}
    if status != "ok":
        out["tail"] = log_file.read_text()[-2000:]
    if ctx is not None:
        out["memory"] = ctx.report()
    return out


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT first (a run stops its own Ray instance), then SIGKILL of the process group it leads."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=20)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# ---------------------------------------------------------------------------- the steps
def gpu_test_files() -> list[str]:
    """The test files that hold a ``@pytest.mark.gpu`` test (collecting only them keeps the step short)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def pytest_counts(text: str) -> dict[str, int]:
    """``{"passed": 5, "skipped": 0, ...}`` from pytest's closing summary line."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error|deselected)", ln)]
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                             lines[-1] if lines else "")}


def real_size_cmd(a: argparse.Namespace, preset: str, batch: int, out: Path) -> list[str]:
    cmd = [PY, "benchmarks/real_size.py", "--preset", preset, "--sections", "backbone", "--batch-sizes", str(batch),
           "--repeats", "1", "--trajectories-per-slot", "2", "--workdir", str(a.workdir), "--out", str(out)]
    if a.dry_run:
        return cmd + ["--device", "cpu", "--smoke", "--resolutions", "64", "--threads", "1"]
    return cmd + ["--device", "cuda", "--resolutions", "1024"]


def train_cmd(a: argparse.Namespace, backbone: Path, fixtures: Path, out: Path) -> list[str]:
    sets = {"backbone.path": backbone, "train.iterations": 3, "rollout.prompts_per_iteration": 2,
            "checkpoint.every": 3, "logging.progress": "false", "logging.tensorboard": "false",
            "rewards.hpsv2.checkpoint": fixtures / "hpsv2" / "HPS_v2.1_compressed.pt",
            "rewards.hpsv2.model_name": fixtures / "hpsv2" / "tiny-clip.json",
            "rewards.aesthetic.checkpoint": fixtures / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth",
            "rewards.aesthetic.clip_checkpoint": fixtures / "aesthetic" / "open_clip_pytorch_model.bin",
            "rewards.aesthetic.clip_model_name": fixtures / "aesthetic" / "tiny-clip.json"}
    if a.dry_run:  # the same layout, every tensor on the CPU, the smoke build's depth and size
        sets |= {"backbone.device": "cpu", "train.device": "cpu", "rewards.hpsv2.device": "cpu",
                 "rewards.aesthetic.device": "cpu", "backbone.feature_blocks": "[0,-1]", "backbone.resolution": 64,
                 "backbone.max_sequence_length": 32, "backbone.feature_grid": 4, "policy.hidden": 16,
                 "rollout.group_size": 4, "rollout.batch_size": 4, "rollout.max_steps": 6, "train.threads": 1,
                 "distributed.threads_per_actor": 1, "distributed.learner.backend": "gloo"}
    else:
        sets |= {"distributed.learner.backend": "nccl"}
    cmd = [PY, "-m", "tpdm_rl.cli", "train", "--config", CONFIG, "--output", str(out), "--overwrite"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def read_rows(path: Path) -> list[dict]:
    """The rows of one real_size JSON, reduced to what the report shows."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    out = []
    for r in data.get("rows", []):
        if "error" in r:
            out.append({"resolution": r.get("resolution"), "batch_size": r.get("batch_size"), "error": r["error"]})
            continue
        out.append({"resolution": r["resolution"], "batch_size": r["batch_size"],
                    "seconds_per_call": r["seconds_per_call"], "shares": r["step"]["shares"],
                    "peak_memory_bytes": r["peak_memory_bytes"], "peak_memory_kind": r["peak_memory_kind"],
                    "bytes_per_step": r["bytes_per_step"]})
    return out


def read_iterations(path: Path) -> list[dict]:
    keys = {"iteration_s": "time/iteration_s", "rollout_s": "time/rollout_s", "rewards_s": "time/reward_s",
            "reward_wait_s": "time/reward_wait_s", "learner_s": "time/learn_s", "sync_s": "time/sync_s",
            "steps_mean": "steps/mean", "trajectories": "rollout/trajectories"}
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out.append({"iteration": rec["iteration"], **{k: rec.get(v) for k, v in keys.items()}})
    return out


def device_info(dry_run: bool) -> dict:
    import torch

    if dry_run or not torch.cuda.is_available():
        return {"name": "cpu-dry-run" if dry_run else "no-cuda", "cuda": None, "total_memory_bytes": None}
    p = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "total_memory_bytes": p.total_memory,
            "torch": torch.__version__}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# ---------------------------------------------------------------------------- report
def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(res: dict) -> str:
    lines = [f"# GPU check: {res['device']['name']}", "",
             f"{'Dry run on the CPU at tiny size: the numbers mean nothing. ' if res['dry_run'] else ''}"
             f"{res['elapsed_s']:.0f} s of {res['time_limit_s']:.0f} s; "
             f"{'stopped at the time limit' if res['stopped_at_time_limit'] else 'every step ran'}.", "",
             "| step | status | seconds |", "|---|---|---:|"]
    for name, st in res["steps"].items():
        lines.append(f"| {name} | {st['status']} | {_s(st.get('seconds'))} |")
    t = res["steps"].get("gpu_tests", {})
    if "counts" in t:
        lines += ["", "CUDA-only tests: " + ", ".join(f"{n} {k}" for k, n in t["counts"].items())]
    rows = [r | {"model": m} for m in ("sd3-medium", "flux-schnell") for r in res.get("rows", {}).get(m, [])]
    if rows:
        lines += ["", "| model | px | batch | s/call | transformer | pooling | TPM | decode | peak memory |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['resolution']} | {r['batch_size']} | error: {r['error']} |||||")
                continue
            sh = r["shares"]
            pct = " | ".join(f"{100 * sh[k]:.0f}%" for k in ("transformer", "pooling", "tpm", "decode"))
            lines.append(f"| {r['model']} | {r['resolution']} | {r['batch_size']} | {r['seconds_per_call']:.3f} | "
                         f"{pct} | {_gb(r['peak_memory_bytes'])} |")
    its = res.get("training", {}).get("iterations", [])
    if its:
        lines += ["", f"Training ({CONFIG}, 3 iterations):", "",
                  "| iteration | total s | rollout s | rewards s (busy) | reward wait s | learner s | sync s | steps |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for i in its:
            lines.append(f"| {i['iteration']} | {_s(i['iteration_s'])} | {_s(i['rollout_s'])} | {_s(i['rewards_s'])} "
                         f"| {_s(i['reward_wait_s'])} | {_s(i['learner_s'])} | {_s(i['sync_s'])} | "
                         f"{_s(i['steps_mean'])} |")
    mem = res["steps"].get("train", {}).get("memory")
    if mem:
        lines += ["", f"Peak memory per role ({mem['kind']}): " + (", ".join(
            f"{k} {_gb(v)}" for k, v in mem["peak_bytes_by_role"].items()) or "none recorded")]
        if "device_used_peak_bytes" in mem:
            lines.append(f"Whole device, peak used: {_gb(mem['device_used_peak_bytes'])}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main
def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers, e.g. 1,2,4,8")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny size (tests)")
    ap.add_argument("--flux", action="store_true", help="add FLUX.1-schnell rows if time is left")
    ap.add_argument("--batch-sizes", default="1,2,4,8", type=_batch_sizes,
                    help="SD3-Medium real_size batches, the first before the training (default %(default)s)")
    ap.add_argument("--time-limit", type=float, default=470.0, help="seconds for everything (default %(default)s)")
    ap.add_argument("--workdir", default="", help="random backbones, fixtures, runs and logs (default: a new "
                    "temporary folder, kept)")
    ap.add_argument("--out-dir", default="", help="where gpu_check_<gpu>.json/.md go (default benchmarks/results; "
                    "the workdir for --dry-run)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + a.time_limit - RESERVE_S
    a.workdir = Path(a.workdir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    a.workdir.mkdir(parents=True, exist_ok=True)
    device = device_info(a.dry_run)
    if not a.dry_run and device["cuda"] is None:
        log("no CUDA device: run on a GPU machine, or pass --dry-run")
        return 2
    out_dir = Path(a.out_dir) if a.out_dir else (a.workdir if a.dry_run else REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAY_ADDRESS="")
    if a.dry_run:  # a CPU-only machine that declares one GPU to Ray (tests/test_one_gpu.py does the same)
        env |= {"OMP_NUM_THREADS": "1", "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 8, "GPU": 1})}
    res: dict[str, Any] = {"dry_run": a.dry_run, "device": device, "time_limit_s": a.time_limit,
                           "command": "python " + shlex.join(sys.argv), "python": platform.python_version(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workdir": str(a.workdir),
                           "steps": {}, "rows": {}}
    logs = a.workdir / "logs"
    logs.mkdir(exist_ok=True)

    def step(name: str, cmd: list[str], **kw: Any) -> dict:
        res["steps"][name] = run_step(name, cmd, deadline, logs / f"{name}.log", env=env, **kw)
        return res["steps"][name]

    st = step("gpu_tests", [PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *gpu_test_files()])
    if "log" in st:
        st["counts"] = pytest_counts(Path(st["log"]).read_text())
        if st["status"].startswith("failed") and st["counts"].get("failed", 0) == 0 and a.dry_run:
            st["status"] = "ok"  # exit 5 (all skipped/deselected) on a CPU

    def rows(preset: str, batch: int) -> None:
        out = a.workdir / f"real_size_{preset}_b{batch}.json"
        step(f"real_size_{preset}_b{batch}", real_size_cmd(a, preset, batch, out))
        res["rows"].setdefault(preset, []).extend(read_rows(out))

    first, *rest = a.batch_sizes
    rows("sd3-medium", first)
    backbone = a.workdir / "sd3-medium"
    fixtures = a.workdir / "reward_fixtures"
    if (backbone / "model_index.json").exists():
        st = step("reward_fixtures", [PY, "-m", "tpdm_rl.cli", "make-tiny-rewards", str(fixtures)]) \
            if not (fixtures / "hpsv2").exists() else {"status": "ok"}
        if st["status"] == "ok":
            run = a.workdir / "train_1gpu"
            step("train", train_cmd(a, backbone, fixtures, run),
                 watch=lambda pid: MemorySampler(pid, gpu=not a.dry_run))
            res["training"] = {"config": CONFIG, "iterations": read_iterations(run / "metrics.jsonl")}
    else:
        res["steps"]["train"] = {"status": f"skipped (no backbone folder: see real_size_sd3-medium_b{first})"}
    for batch in rest:
        rows("sd3-medium", batch)
    if a.flux:
        if deadline - time.monotonic() >= FLUX_MIN_S or a.dry_run:
            for batch in (1, 2):
                rows("flux-schnell", batch)
        else:
            res["steps"]["real_size_flux-schnell"] = {"status": f"skipped (less than {FLUX_MIN_S:g} s left)"}
    res["elapsed_s"] = time.monotonic() - t_start
    res["stopped_at_time_limit"] = any(s["status"].startswith(("timed out", "skipped (time", "skipped (less"))
                                       for s in res["steps"].values())
    name = slug(device["name"])
    path = out_dir / f"gpu_check_{name}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    table = markdown(res)
    path.with_suffix(".md").write_text(table)
    print(table)
    log(f"wrote {path} and {path.with_suffix('.md').name}")
    return 0 if all(s["status"] == "ok" for s in res["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
