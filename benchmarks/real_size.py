"""Real-size readiness: SD3 / FLUX.1 (random weights) rollout, learner, weight sync and reward-model timings.

Builds the random pipeline folder of ``--preset`` (sd3-medium, the default; sd3.5-medium; flux-dev;
flux-schnell) with ``make_random_backbone`` (the real configurations, random weights, bf16, no T5 unless
``--t5``) in a temporary folder and measures, per resolution and batch size:
seconds per backbone call, the time shares of a rollout (transformer, feature pooling, TPM, VAE decode,
bookkeeping), static vs continuous batching with a TPM whose step counts vary (interleaved A/B repeats,
medians), slot utilisation, peak memory and the bytes stored per step. Then, with the settings of the
preset's config (``CONFIGS``: configs/sd3_medium.yaml, sd35_medium.yaml, flux_dev.yaml, flux_schnell.yaml):
the learner update of one iteration on features of the real shape, the TPM weight sync (pickled as Ray's
object store does), the memory the text-encoder offload frees (SD3: CLIP-L + CLIP-G + T5-XXL; FLUX.1: CLIP-L +
T5-XXL), and the reward models (HPSv2 ViT-H-14, the aesthetic ViT-L/14 + MLP, ImageReward BLIP-L) at real size
with random bf16 weights.

``--layers N`` reduces the depth (SD3: N joint blocks of 24; FLUX.1: N double-stream and 2N single-stream
blocks of 19 + 38); the config's feature blocks are then moved to the same relative depth (``scaled_blocks``),
for the backbone's hooks and the learner's TPM alike.

GPU defaults: 512 and 1024 px, batch 1-16. CPU defaults: 256 px, batch 1 and 2 (the GPU rows are then
marked pending in the JSON). ``--smoke`` shrinks every width (tests only: its numbers mean nothing).
Every section is guarded: a failure is recorded as an error string and the others still run.

    python benchmarks/real_size.py [--preset sd3-medium|sd3.5-medium|flux-dev|flux-schnell]
        [--device auto|cpu|cuda] [--threads N] [--resolutions 512,1024]
        [--batch-sizes 1,2,4,8,16] [--repeats R] [--layers N] [--t5] [--learner-rows N]
        [--sections learner,weight_sync,backbone,rewards] [--workdir DIR]
        [--out benchmarks/results/real_size_<device>[_<preset>].json] [--smoke]

The default output is ``real_size_<device>.json`` for sd3-medium and ``real_size_<device>_<preset>.json`` for
the other presets.

A long GPU run can be split (each part its own ``--out``): ``--workdir DIR`` keeps the built folder and a later
run with the same settings loads it instead of building it again.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pickle
import platform
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# keep this folder off the import path (benchmarks/rollout.py and rewards.py are named like packages)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
#: ``--preset`` -> the config whose settings the run uses (the first is the default)
CONFIGS = {"sd3-medium": "sd3_medium.yaml", "sd3.5-medium": "sd35_medium.yaml", "flux-dev": "flux_dev.yaml",
           "flux-schnell": "flux_schnell.yaml"}
DEFAULT_PRESET = "sd3-medium"
STORAGE_DTYPE = torch.bfloat16  # every preset's config: backbone.dtype and backbone.feature_dtype
PROMPTS = [f"a photo of benchmark subject {i}, detailed, natural light" for i in range(8)]

#: ``--smoke``: every width tiny (2 heads of 16 = hidden 32), so the script runs in about a minute on a CPU
SMOKE_HEAD_DIM = SMOKE_SAMPLE_SIZE = 16
SMOKE_LAYERS = 2  # FLUX.1: 2 double-stream + 4 single-stream blocks


def config_path(preset: str) -> Path:
    return REPO / "configs" / CONFIGS[preset]


def gpu_pending(preset: str) -> str:
    flag = "" if preset == DEFAULT_PRESET else f" --preset {preset}"
    return (f"pending: run `python benchmarks/real_size.py{flag} --device cuda` on a GPU machine "
            "(512 and 1024 px, batch 1-16)")


def transformer_depth(tr_cfg: dict) -> int:
    """The blocks a transformer configuration has that ``feature_blocks`` can index (FLUX.1: double-stream plus
    single-stream)."""
    return int(tr_cfg["num_layers"]) + int(tr_cfg.get("num_single_layers", 0))

#: ImageReward v1.0: BLIP ViT-L/16 at 224 px (what ``vision_config_from_state`` reads off ImageReward.pt) and
#: BLIP's BERT-base ``med_config.json``
BLIP_L_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 16}
BLIP_MED = {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "max_position_embeddings": 512, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "pad_token_id": 0}


# ---------------------------------------------------------------------------- small helpers
def log(message: str) -> None:
    print(f"[real_size] {message}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def attempt(label: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[bool, Any]:
    """``(True, fn(...))``, or ``(False, {"error": "Type: message"})`` when it fails (traceback on stderr)."""
    log(f"{label} ...")
    t0 = time.perf_counter()
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a benchmark section must not stop the others
        traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = f"{type(exc).__name__}: {first}"[:500]
        log(f"{label} failed: {error}")
        return False, {"error": error}
    log(f"{label} done ({time.perf_counter() - t0:.1f} s)")
    return True, value


def guarded(results: dict, key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``results[key] = fn(...)`` or the error record; returns the value (None on failure)."""
    ok, value = attempt(key, fn, *args, **kwargs)
    results[key] = value
    return value if ok else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """GPU: ``torch.cuda.max_memory_allocated`` since the last reset; CPU: ``ru_maxrss`` (the process's peak so
    far, which never goes down)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "ru_maxrss (process peak so far)"}


def version_of(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # noqa: BLE001 - optional package
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def scaled_blocks(blocks: list[int], depth: int, full_depth: int) -> list[int]:
    """The config's feature blocks (of the full ``full_depth``) at the same relative depth in ``depth`` blocks."""
    if depth == full_depth:
        return list(blocks)
    return [(b % full_depth) * depth // full_depth for b in blocks]


def expected_steps(init_ratio: float, concentration: float, sigma_min: float, max_steps: int,
                   n: int = 20000, seed: int = 0) -> dict:
    """Step counts of an untrained TPM (r ~ Beta(m k, (1 - m) k) every step, independent of the image): a
    trajectory ends at the first step whose proposed sigma falls below ``sigma_min``, or at ``max_steps``."""
    k = concentration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        r = torch.distributions.Beta(torch.tensor(init_ratio * k), torch.tensor((1 - init_ratio) * k)).sample(
            (n, max_steps))
    below = torch.cumsum(torch.log(r.clamp_min(1e-12)), dim=1) < torch.log(torch.tensor(sigma_min))
    steps = torch.where(below.any(1), below.float().argmax(1) + 1, torch.tensor(max_steps))
    return {"mean": float(steps.float().mean()), "min": int(steps.min()), "max": int(steps.max()),
            "forced_by_budget": float((~below.any(1)).float().mean())}


# ---------------------------------------------------------------------------- settings and environment
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=DEFAULT_PRESET, choices=list(CONFIGS),
                    help="which random backbone, with its config's settings (default: %(default)s)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: the CPUs available)")
    ap.add_argument("--resolutions", default="", help="comma-separated px (default: GPU 512,1024; CPU 256)")
    ap.add_argument("--batch-sizes", default="", help="comma-separated slots (default: GPU 1,2,4,8,16; CPU 1,2)")
    ap.add_argument("--repeats", type=int, default=0, help="interleaved repeats per measurement (default: GPU 3, "
                    "CPU 1, smoke 2); medians are reported")
    ap.add_argument("--layers", type=int, default=None, help="transformer depth: SD3 N joint blocks, FLUX.1 N "
                    "double-stream + 2N single-stream blocks (default: the real 24, or 19 + 38)")
    ap.add_argument("--t5", action="store_true", help="build the T5-XXL encoder too (default: no T5, as the "
                    "rollout workers offload the text encoders anyway)")
    ap.add_argument("--trajectories-per-slot", type=int, default=0, help="trajectories per row = this x batch "
                    "size (default: GPU 4, CPU 2)")
    ap.add_argument("--max-steps", type=int, default=0, help="step budget of the benchmark TPM (default: GPU the "
                    "config's 28, CPU 8)")
    ap.add_argument("--init-ratio", type=float, default=0.0, help="benchmark TPM's mean ratio (default: GPU 0.75, "
                    "CPU 0.4)")
    ap.add_argument("--init-concentration", type=float, default=0.0, help="benchmark TPM's Beta concentration, low "
                    "for varied step counts (default: GPU 6, CPU 5)")
    ap.add_argument("--learner-rows", type=int, default=0, help="learner rows (default: GPU the real count of one "
                    "iteration of the preset's config; CPU 256; smoke 32)")
    ap.add_argument("--reward-batch", type=int, default=0, help="images per reward forward (default: GPU 32, CPU 2)")
    ap.add_argument("--sections", default="learner,weight_sync,backbone,rewards",
                    help="which sections to run (comma-separated)")
    ap.add_argument("--workdir", default="", help="where the random backbone is built and kept, reused by a later "
                    "run with the same settings (default: a temporary folder, removed at the end)")
    ap.add_argument("--out", default="", help="results JSON (default: benchmarks/results/real_size_<device>.json, "
                    "real_size_<device>_<preset>.json for a preset other than sd3-medium; with --smoke a file in "
                    "the temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="tiny widths and few steps (tests only)")
    return ap.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def settings(args: argparse.Namespace, device: torch.device, cfg) -> dict:
    """Every knob of the run, device-dependent defaults filled in."""
    from tpdm_rl.builders.random_backbone import configs, is_flux, shrunk_overrides

    gpu = device.type == "cuda"
    preset = args.preset
    layers = args.layers if args.layers is not None else (SMOKE_LAYERS if args.smoke else None)
    tail = "" if preset == DEFAULT_PRESET else f"_{preset}"
    out = args.out or (str(Path(tempfile.gettempdir()) / f"real_size_{device.type}{tail}_smoke.json") if args.smoke
                       else f"benchmarks/results/real_size_{device.type}{tail}.json")
    overrides = shrunk_overrides(SMOKE_HEAD_DIM, SMOKE_SAMPLE_SIZE, preset=preset) if args.smoke else {}
    depth = transformer_depth(configs(preset, no_t5=not args.t5, layers=layers, overrides=overrides)["transformer"])
    full_depth = transformer_depth(configs(preset)["transformer"])
    return {
        "preset": preset, "family": "flux" if is_flux(preset) else "sd3", "dtype": "bfloat16",
        "no_t5": not args.t5, "layers": layers, "transformer_depth": depth, "full_depth": full_depth,
        "smoke": args.smoke, "overrides": overrides,
        "resolutions": _ints(args.resolutions) or ([512, 1024] if gpu else [256]),
        "batch_sizes": _ints(args.batch_sizes) or ([1, 2, 4, 8, 16] if gpu else [1, 2]),
        "repeats": args.repeats or (2 if args.smoke else 3 if gpu else 1),
        "trajectories_per_slot": args.trajectories_per_slot or (4 if gpu else 2),
        "max_steps": args.max_steps or (cfg.rollout.max_steps if gpu else 8),
        "init_ratio": args.init_ratio or (0.75 if gpu else 0.4),
        "init_concentration": args.init_concentration or (6.0 if gpu else 5.0),
        "sigma_min": cfg.rollout.sigma_min,
        "learner_rows": args.learner_rows or (0 if gpu and not args.smoke else 32 if args.smoke else 256),
        "reward_batch": args.reward_batch or (32 if gpu else 2),
        "sections": [s for s in args.sections.split(",") if s],
        "config_file": str(config_path(preset).relative_to(REPO)),
        "guidance_scale": cfg.backbone.guidance_scale,
        "max_sequence_length": cfg.backbone.max_sequence_length,
        "feature_grid": cfg.backbone.feature_grid,
        "config_feature_blocks": list(cfg.backbone.feature_blocks),
        "feature_blocks": scaled_blocks(list(cfg.backbone.feature_blocks), depth, full_depth),
        "tpm_hidden": cfg.policy.hidden,
        "decode_batch_size": cfg.rollout.decode_batch_size,
        "storage_dtype": "bfloat16",
        "out": out,
    }


def environment(device: torch.device) -> dict:
    return {
        "command": "python " + shlex.join(sys.argv), "cwd": os.getcwd(),
        "device": str(device), "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": {m: version_of(m) for m in ("torch", "diffusers", "transformers", "open_clip", "ray")},
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------------------- learner and weight sync
def learn_batch(rows: int, channels: int, grid: int, temb_dim: int, seed: int = 0):
    """A LearnBatch of ``rows`` random steps, features and temb in the storage dtype (built in chunks)."""
    from tpdm_rl.algorithm.messages import LearnBatch

    g = torch.Generator().manual_seed(seed)
    features = torch.empty(rows, channels, grid, grid, dtype=STORAGE_DTYPE)
    for lo in range(0, rows, 64):
        hi = min(rows, lo + 64)
        features[lo:hi] = torch.randn(hi - lo, channels, grid, grid, generator=g).to(STORAGE_DTYPE)
    return LearnBatch(features=features, temb=torch.randn(rows, temb_dim, generator=g).to(STORAGE_DTYPE),
                      sigma=torch.rand(rows, generator=g) * 0.9 + 0.05,
                      action=torch.rand(rows, generator=g) * 0.8 + 0.1, old_logp=torch.full((rows,), -1.0),
                      advantage=torch.randn(rows, generator=g), mask=torch.ones(rows, dtype=torch.bool))


def measure_learner(cfg, s: dict, hidden: int, n_blocks: int, device: torch.device) -> dict:
    """Time and peak memory of ``Learner.update`` on one iteration's rows (features of the real shape)."""
    from tpdm_rl.algorithm.policy import build_policy
    from tpdm_rl.training.learner import Learner

    steps = expected_steps(cfg.policy.init_ratio, cfg.policy.init_concentration, cfg.rollout.sigma_min,
                           cfg.rollout.max_steps)
    real_rows = round(cfg.rollout.prompts_per_iteration * cfg.rollout.group_size * steps["mean"])
    rows = s["learner_rows"] or real_rows
    channels, grid = n_blocks * hidden, cfg.backbone.feature_grid
    learner = Learner(build_policy(cfg, channels, hidden), cfg.optim, cfg.algorithm, cfg.seed, device)
    learner.update(learn_batch(min(rows, 4 * cfg.algorithm.minibatches), channels, grid, hidden), 0)  # warm-up
    batch = learn_batch(rows, channels, grid, hidden, seed=1)
    stored = batch.features.numel() * batch.features.element_size() + batch.temb.numel() * batch.temb.element_size()
    reset_peak_memory(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for r in range(s["repeats"]):
        sync(device)
        t0 = time.perf_counter()
        metrics = learner.update(batch, r + 1)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = peak_memory(device)
    seconds = median(times)
    return {
        "rows": rows, "real_rows": real_rows,
        "real_rows_formula": (f"prompts_per_iteration {cfg.rollout.prompts_per_iteration} x group_size "
                              f"{cfg.rollout.group_size} x mean steps {steps['mean']:.2f} (the config's untrained "
                              "TPM, simulated)"),
        "feature_shape": [channels, grid, grid], "feature_blocks": list(cfg.backbone.feature_blocks),
        "temb_dim": hidden, "dtype": "bfloat16",
        "epochs": cfg.algorithm.epochs, "minibatches": cfg.algorithm.minibatches,
        "tpm_params": sum(p.numel() for p in learner.policy.parameters()),
        "stored_bytes": stored, "stored_bytes_real_rows": stored * real_rows // rows,
        "seconds": seconds, "seconds_per_row": seconds / rows,
        "seconds_scaled_to_real_rows": seconds * real_rows / rows,
        "peak_memory_bytes": peak["peak_memory_bytes"], "peak_memory_kind": peak["peak_memory_kind"],
        "peak_memory_growth_bytes": max(0, peak["peak_memory_bytes"] - before),
        "skipped_steps": metrics["health/skipped_steps"],
    }


def measure_weight_sync(cfg, s: dict, hidden: int, n_blocks: int) -> dict:
    """Serialising the TPM's CPU state dict as Ray's object store does (cloudpickle dumps + loads)."""
    from tpdm_rl.algorithm.policy import build_policy

    try:
        from ray import cloudpickle as serializer
        name = "ray.cloudpickle"
    except ImportError:
        serializer, name = pickle, "pickle"
    policy = build_policy(cfg, n_blocks * hidden, hidden)
    state = {k: v.detach().cpu().clone() for k, v in policy.state_dict().items()}
    dumps, loads, blob = [], [], b""
    for _ in range(max(3, s["repeats"])):
        t0 = time.perf_counter()
        blob = serializer.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        t1 = time.perf_counter()
        serializer.loads(blob)
        dumps.append(t1 - t0)
        loads.append(time.perf_counter() - t1)
    return {"serializer": name, "bytes": len(blob), "params": sum(v.numel() for v in state.values()),
            "dumps_s": median(dumps), "loads_s": median(loads), "seconds": median(dumps) + median(loads)}


# ---------------------------------------------------------------------------- the backbone
def build_backbone(s: dict, cfg, workdir: Path, device: torch.device) -> tuple[Any, dict]:
    """Write the random folder (bf16) and load it as the rollout workers do."""
    from tpdm_rl.rollout.backbone import Backbone

    from tpdm_rl.builders.random_backbone import estimate, make_random_backbone

    preset = s["preset"]
    est = estimate(preset, no_t5=s["no_t5"], dtype=s["dtype"], layers=s["layers"], overrides=s["overrides"])
    t0 = time.perf_counter()
    path, reused = workdir / preset, _same_build(workdir / preset, s)
    if not reused:
        make_random_backbone(path, preset, no_t5=s["no_t5"], dtype=s["dtype"], seed=0, layers=s["layers"],
                             overrides=s["overrides"], progress=log)
    t1 = time.perf_counter()
    bb = Backbone(path, device=str(device), dtype=s["dtype"], guidance_scale=s["guidance_scale"],
                  feature_blocks=tuple(s["feature_blocks"]), feature_grid=s["feature_grid"],
                  max_sequence_length=s["max_sequence_length"], negative_prompt=cfg.backbone.negative_prompt,
                  family=s["family"])
    if bb.num_blocks != s["transformer_depth"]:
        raise RuntimeError(f"the built transformer has {bb.num_blocks} blocks, expected {s['transformer_depth']}")
    info = {"preset": preset, "family": bb.family.name,
            "reused_folder": reused, "build_s": t1 - t0, "load_s": time.perf_counter() - t1, "params": est["params"],
            "weights_bytes": est["weights_bytes"],
            "components": {k: {"params": c["params"], "bytes": c["bytes"]} for k, c in est["components"].items()},
            "transformer_layers": s["transformer_depth"], "full_depth": s["full_depth"], "hidden": bb.hidden_size, "feature_blocks": list(bb.feature_blocks),
            "feature_channels": bb.feature_channels, "temb_dim": bb.temb_dim, "feature_grid": bb.feature_grid}
    return bb, info


def _same_build(path: Path, s: dict) -> bool:
    """Whether ``path`` already holds the random backbone this run asks for (``--workdir`` reuse across runs)."""
    from tpdm_rl.builders.random_backbone import MARKER
    from tpdm_rl.core.files import read_json

    marker = read_json(path / MARKER)
    if not isinstance(marker, dict):
        return False
    want = {"preset": s["preset"], "seed": 0, "dtype": s["dtype"], "no_t5": s["no_t5"], "layers": s["layers"],
            "overrides": json.loads(json.dumps(s["overrides"]))}
    return all(marker.get(k) == v for k, v in want.items())


def measure_offload(bb, s: dict) -> dict:
    """Bytes the text-encoder offload frees on the accelerator (the estimate where nothing is freed: CPU, or T5
    not built)."""
    from tpdm_rl.builders.random_backbone import estimate

    full = estimate(s["preset"], no_t5=False, dtype=s["dtype"], layers=s["layers"], overrides=s["overrides"])
    names = tuple(n for n in full["components"] if n.startswith("text_encoder"))  # SD3: 3; FLUX.1: CLIP-L and T5
    by_name = {n: full["components"][n]["bytes"] for n in names}
    t0 = time.perf_counter()
    freed = bb.offload_text_encoders(PROMPTS)
    seconds = time.perf_counter() - t0
    built = [n for n in names if getattr(bb.pipe, n, None) is not None]
    return {"measured_bytes_freed": freed, "measured": bb.device.type != "cpu", "seconds": seconds,
            "text_encoders_built": built, "estimate_bytes_built": sum(by_name[n] for n in built),
            "estimate_bytes_with_t5": sum(by_name.values()), "estimate_bytes_by_encoder": by_name,
            "encoder_classes": {n: full["components"][n]["class"] for n in names}}


class SectionTimer:
    """Seconds spent inside wrapped callables (the GPU synchronised around each call)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[name] += time.perf_counter() - t0

        return timed


@contextlib.contextmanager
def instrumented(bb, schedule, timer: SectionTimer) -> Iterator[None]:
    """Time ``Backbone.step``, ``Backbone.decode`` and the TPM's ``propose`` inside an engine run (instance
    attributes shadow the methods; removed afterwards)."""
    bb.step = timer.wrap("backbone", bb.step)
    bb.decode = timer.wrap("decode", bb.decode)
    schedule.propose = timer.wrap("tpm", schedule.propose)
    try:
        yield
    finally:
        del bb.step, bb.decode


def measure_call(bb, res: int, bs: int, repeats: int) -> dict:
    """Seconds per guided backbone call at full batch, with and without the feature hooks' pooling (interleaved)."""
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(bs, *bb.latent_shape(res, res), generator=g)
    sigma = torch.full((bs,), 0.7)
    embeds, pooled = bb.encode_prompts([PROMPTS[i % len(PROMPTS)] for i in range(bs)])
    bb.step(latents, sigma, embeds, pooled, need_features=True)  # warm-up
    bb.step(latents, sigma, embeds, pooled, need_features=False)
    bb.decode(latents[:1])
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(repeats):
        for need in ((True, False) if r % 2 == 0 else (False, True)):
            sync(bb.device)
            t0 = time.perf_counter()
            bb.step(latents, sigma, embeds, pooled, need_features=need)
            sync(bb.device)
            times[need].append(time.perf_counter() - t0)
    with_f, without = median(times[True]), median(times[False])
    return {"seconds_per_call": with_f, "seconds_per_call_no_features": without,
            "pooling_s_per_call": max(0.0, with_f - without),
            "pooling_fraction": max(0.0, with_f - without) / with_f if with_f > 0 else 0.0}


def make_tpm(bb, s: dict) -> torch.nn.Module:
    from tpdm_rl.algorithm.policy import TimePredictionModule, TPMSpec

    torch.manual_seed(0)
    spec = TPMSpec(in_channels=bb.feature_channels, temb_dim=bb.temb_dim, grid=bb.feature_grid,
                   hidden=s["tpm_hidden"], feature_blocks=bb.feature_blocks, init_ratio=s["init_ratio"],
                   init_concentration=s["init_concentration"])
    return TimePredictionModule(spec).to(bb.device).eval()


def run_once(bb, tpm, res: int, bs: int, continuous: bool, s: dict) -> dict:
    """One instrumented engine run (decoded) over ``trajectories_per_slot x bs`` trajectories."""
    from tpdm_rl.rollout.engine import SamplingEngine
    from tpdm_rl.rollout.schedules import TPMSchedule

    from tpdm_rl.core.rng import derive_key

    n = s["trajectories_per_slot"] * bs
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    seeds = [derive_key(0, i) for i in range(n)]
    keys = torch.tensor([derive_key(1, i) for i in range(n)])
    engine = SamplingEngine(bb, res, res, batch_size=bs, max_steps=s["max_steps"], continuous=continuous,
                            record_features=True, feature_dtype=STORAGE_DTYPE,
                            decode_batch_size=s["decode_batch_size"])
    schedule = TPMSchedule(tpm, s["sigma_min"], feature_dtype=STORAGE_DTYPE)
    timer = SectionTimer(bb.device)
    with instrumented(bb, schedule, timer):
        sync(bb.device)
        t0 = time.perf_counter()
        tr = engine.run(prompts, seeds, keys, schedule, decode=True)
        sync(bb.device)
        total = time.perf_counter() - t0
    parts = {k: timer.seconds.get(k, 0.0) for k in ("backbone", "tpm", "decode")}
    return {"n": n, "seconds": total, **{f"{k}_s": v for k, v in parts.items()},
            "bookkeeping_s": max(0.0, total - sum(parts.values())),
            "backbone_calls": engine.stats["backbone_calls"], "slot_steps": engine.stats["slot_steps"],
            "steps": tr.steps.clone(),
            "features_bytes": tr.features[0].numel() * tr.features.element_size(),
            "features_dtype": str(tr.features.dtype).replace("torch.", ""), "features_shape": list(tr.features.shape[1:]),
            "temb_bytes": tr.temb[0].numel() * tr.temb.element_size(),
            "temb_dtype": str(tr.temb.dtype).replace("torch.", ""), "temb_shape": list(tr.temb.shape[1:])}


def summarise_mode(runs: list[dict], bs: int) -> dict:
    first, n = runs[0], runs[0]["n"]
    med = {k: median([r[k] for r in runs]) for k in ("seconds", "backbone_s", "tpm_s", "decode_s", "bookkeeping_s")}
    sampling = median([r["seconds"] - r["decode_s"] for r in runs])
    steps = first["steps"]
    return {
        "trajectories": n, **med, "sampling_seconds": sampling,
        "trajectories_per_s": n / med["seconds"], "sampling_trajectories_per_s": n / sampling,
        "backbone_calls": first["backbone_calls"], "slot_steps": first["slot_steps"],
        "slot_utilisation": first["slot_steps"] / (first["backbone_calls"] * bs),
        "steps_mean": float(steps.float().mean()), "steps_min": int(steps.min()), "steps_max": int(steps.max()),
        "steps_histogram": {str(k): v for k, v in sorted(Counter(steps.tolist()).items())},
    }


def measure_batching(bb, tpm, res: int, bs: int, s: dict) -> dict:
    """Static vs continuous batching, alternating A/B then B/A over the repeats; medians."""
    runs: dict[str, list[dict]] = {"static": [], "continuous": []}
    for r in range(s["repeats"]):
        order = ("static", "continuous") if r % 2 == 0 else ("continuous", "static")
        for mode in order:
            runs[mode].append(run_once(bb, tpm, res, bs, mode == "continuous", s))
    out = {mode: summarise_mode(rs, bs) for mode, rs in runs.items()}
    out["continuous_over_static"] = out["continuous"]["trajectories_per_s"] / out["static"]["trajectories_per_s"]
    out["continuous_over_static_sampling"] = (out["continuous"]["sampling_trajectories_per_s"]
                                              / out["static"]["sampling_trajectories_per_s"])
    out["same_step_counts"] = bool(torch.equal(runs["static"][0]["steps"], runs["continuous"][0]["steps"]))
    one = runs["continuous"][0]
    out["storage"] = {k: one[k] for k in ("features_bytes", "features_dtype", "features_shape", "temb_bytes",
                                          "temb_dtype", "temb_shape")}
    out["bytes_per_step"] = one["features_bytes"] + one["temb_bytes"]
    return out


def step_shares(call: dict, batching: dict) -> dict:
    """Where the time of a continuous-batching rollout goes: the instrumented run's backbone time split into
    transformer and pooling by the per-call ratio; shares of the whole run (decode included)."""
    c = batching["continuous"]
    frac = call["pooling_fraction"]
    seconds = {"transformer": c["backbone_s"] * (1 - frac), "pooling": c["backbone_s"] * frac, "tpm": c["tpm_s"],
               "decode": c["decode_s"], "bookkeeping": c["bookkeeping_s"]}
    total = c["seconds"]
    calls = c["backbone_calls"]
    return {"shares": {k: v / total for k, v in seconds.items()},
            "seconds_per_call": {k: seconds[k] / calls for k in ("transformer", "pooling", "tpm", "bookkeeping")},
            "decode_s_per_image": c["decode_s"] / c["trajectories"],
            "rollout_step_s": (total - c["decode_s"]) / calls}


def measure_row(bb, tpm, res: int, bs: int, s: dict) -> dict:
    reset_peak_memory(bb.device)
    call = measure_call(bb, res, bs, s["repeats"])
    batching = measure_batching(bb, tpm, res, bs, s)
    return {"resolution": res, "batch_size": bs, **call, "step": step_shares(call, batching),
            "static": batching["static"], "continuous": batching["continuous"],
            "continuous_over_static": batching["continuous_over_static"],
            "continuous_over_static_sampling": batching["continuous_over_static_sampling"],
            "same_step_counts": batching["same_step_counts"],
            "slot_utilisation": {m: batching[m]["slot_utilisation"] for m in ("static", "continuous")},
            "bytes_per_step": batching["bytes_per_step"], "storage": batching["storage"], **peak_memory(bb.device)}


def backbone_section(results: dict, s: dict, cfg, device: torch.device, workdir: Path) -> None:
    """Build and load the backbone, offload its text encoders, then one row per (resolution, batch size)."""
    results["rows"] = []
    ok, built = attempt("backbone", build_backbone, s, cfg, workdir, device)
    if not ok:
        results["backbone"] = built
        return
    bb, results["backbone"] = built
    guarded(results, "text_encoder_offload", measure_offload, bb, s)
    tpm = make_tpm(bb, s)
    results["benchmark_tpm"] = {
        "init_ratio": s["init_ratio"], "init_concentration": s["init_concentration"], "max_steps": s["max_steps"],
        "sigma_min": s["sigma_min"], "hidden": s["tpm_hidden"],
        "expected_steps": expected_steps(s["init_ratio"], s["init_concentration"], s["sigma_min"], s["max_steps"])}
    for res in s["resolutions"]:
        for bs in s["batch_sizes"]:
            ok, row = attempt(f"row {res} px, batch {bs}", measure_row, bb, tpm, res, bs, s)
            results["rows"].append(row if ok else {"resolution": res, "batch_size": bs, **row})
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- reward models
def bare_reward(cls: type, device: torch.device, batch: int, **attrs: Any):
    """An instance of reward class ``cls`` with ``attrs`` set in place of its checkpoint loading: the class's own
    preprocessing and scoring code on random bf16 weights."""
    from tpdm_rl.rewards.base import RewardModel

    reward = cls.__new__(cls)
    RewardModel.__init__(reward, device=device, dtype="bfloat16", batch_size=batch)
    reward.__dict__.update(attrs)
    return reward


def random_open_clip(name: str, device: torch.device):
    from tpdm_rl.rewards.hpsv2 import create_open_clip

    from tpdm_rl.builders.random_backbone import default_dtype

    with default_dtype(STORAGE_DTYPE):
        model = create_open_clip(name, "real_size benchmark")
    return model.to(device, STORAGE_DTYPE).eval().requires_grad_(False)


def build_hpsv2(device: torch.device, batch: int, smoke: bool):
    import open_clip
    from tpdm_rl.rewards.hpsv2 import HPSv2Reward, image_size_of
    from tpdm_rl.rewards.preprocess import PromptFeatureCache

    name = "ViT-H-14"
    if smoke:
        from tpdm_rl.builders.reward_fixtures import register_tiny_open_clip
        name = register_tiny_open_clip()
    model = random_open_clip(name, device)
    return name, bare_reward(HPSv2Reward, device, batch, model=model, model_name=name, version="v2.1",
                             checkpoint="<random>", tokenizer=open_clip.get_tokenizer(name),
                             image_size=image_size_of(model.visual), text_cache=PromptFeatureCache(4096))


def build_aesthetic(device: torch.device, batch: int, smoke: bool):
    from tpdm_rl.rewards.aesthetic import AestheticReward, RewardMLP
    from tpdm_rl.rewards.hpsv2 import image_size_of

    name = "ViT-L-14-quickgelu"
    if smoke:
        from tpdm_rl.builders.reward_fixtures import register_tiny_open_clip
        name = register_tiny_open_clip()
    visual = random_open_clip(name, device).visual
    mlp = RewardMLP(int(visual.output_dim)).to(device, torch.float32).eval().requires_grad_(False)
    return name + " visual + MLP", bare_reward(AestheticReward, device, batch, visual=visual, mlp=mlp,
                                               clip_model_name=name, image_size=image_size_of(visual))


def build_imagereward(device: torch.device, batch: int, smoke: bool):
    from tpdm_rl.rewards.aesthetic import RewardMLP
    from tpdm_rl.rewards.imagereward import ImageRewardReward, text_config_from_med
    from transformers import BertTokenizer, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from tpdm_rl.builders.random_backbone import default_dtype
    from tpdm_rl.builders.reward_fixtures import TINY_IR_MED, TINY_IR_VISION, tiny_bert_vocab

    vocab = tiny_bert_vocab()  # token ids only: the real BERT vocabulary is not needed to time a forward
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=512)
    if smoke:
        v = TINY_IR_VISION
        vision_kw = {"hidden_size": v["width"], "intermediate_size": v["mlp"], "num_hidden_layers": v["layers"],
                     "num_attention_heads": v["width"] // 64, "image_size": v["image"], "patch_size": v["patch"]}
        med = dict(TINY_IR_MED, vocab_size=len(vocab) + 2)
    else:
        vision_kw, med = BLIP_L_VISION, BLIP_MED
    vcfg = BlipVisionConfig(**vision_kw, hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)
    tcfg = text_config_from_med(med, vcfg.hidden_size, "<random>")
    with default_dtype(STORAGE_DTYPE):
        vision, text = BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False)
    mlp = RewardMLP(tcfg.hidden_size).to(device, torch.float32).eval().requires_grad_(False)
    width = "L" if vcfg.hidden_size == 1024 else str(vcfg.hidden_size)
    name = f"BLIP ViT-{width}/{vcfg.patch_size} + BERT ({tcfg.num_hidden_layers} layers)"
    return name, bare_reward(ImageRewardReward, device, batch, tokenizer=tokenizer, image_size=int(vcfg.image_size),
                             vision=vision.to(device, STORAGE_DTYPE).eval().requires_grad_(False),
                             text=text.to(device, STORAGE_DTYPE).eval().requires_grad_(False), mlp=mlp,
                             checkpoint="<random>", med_config="<random>")


REWARD_BUILDERS = {"hpsv2": build_hpsv2, "aesthetic": build_aesthetic, "imagereward": build_imagereward}


def measure_reward(name: str, s: dict, device: torch.device, resolution: int) -> dict:
    """One reward model at real size: build with random bf16 weights, time ``score`` on a batch (text features
    recomputed every repeat; one prompt per group of 8 images, as in an RL group)."""
    reset_peak_memory(device)
    t0 = time.perf_counter()
    model_name, reward = REWARD_BUILDERS[name](device, s["reward_batch"], s["smoke"])
    build_s = time.perf_counter() - t0
    batch = s["reward_batch"]
    images = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)).to(device)
    prompts = [PROMPTS[i // 8 % len(PROMPTS)] for i in range(batch)]
    reward.score(images, prompts)  # warm-up
    times = []
    for _ in range(s["repeats"]):
        cache = getattr(reward, "text_cache", None)
        if cache is not None:
            cache.clear()
        sync(device)
        t1 = time.perf_counter()
        reward.score(images, prompts)
        sync(device)
        times.append(time.perf_counter() - t1)
    seconds = median(times)
    params = sum(p.numel() for m in vars(reward).values() if isinstance(m, torch.nn.Module) for p in m.parameters())
    return {"model": model_name, "params": params, "dtype": "bfloat16", "batch": batch,
            "input_resolution": resolution, "build_s": build_s, "seconds": seconds, "images_per_s": batch / seconds,
            **peak_memory(device)}


def rewards_section(results: dict, s: dict, device: torch.device) -> None:
    results["rewards"] = {}
    for name in REWARD_BUILDERS:
        guarded(results["rewards"], name, measure_reward, name, s, device, max(s["resolutions"]))
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- report
def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def markdown(results: dict) -> str:
    lines = ["| px | batch | s/call | transformer | pooling | TPM | decode | bookkeeping | static traj/s | "
             "continuous traj/s | cont/static | slots static/cont | peak mem | bytes/step |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.get("rows", []):
        if "error" in r:
            lines.append(f"| {r['resolution']} | {r['batch_size']} | error: {r['error']} |" + " |" * 11)
            continue
        sh = r["step"]["shares"]
        pct = " | ".join(f"{100 * sh[k]:.0f}%" for k in ("transformer", "pooling", "tpm", "decode", "bookkeeping"))
        lines.append(
            f"| {r['resolution']} | {r['batch_size']} | {r['seconds_per_call']:.3f} | {pct} | "
            f"{r['static']['trajectories_per_s']:.3f} | {r['continuous']['trajectories_per_s']:.3f} | "
            f"{r['continuous_over_static']:.2f}x | {r['slot_utilisation']['static']:.2f}/"
            f"{r['slot_utilisation']['continuous']:.2f} | {_gb(r['peak_memory_bytes'])} | {r['bytes_per_step']:,} |")
    if results.get("gpu_rows"):
        lines.append(f"\nGPU rows: {results['gpu_rows']}")
    lines += ["", "| item | result |", "|---|---|"]
    ln = results.get("learner", {})
    if "error" in ln:
        lines.append(f"| learner update | error: {ln['error']} |")
    elif ln:
        lines.append(f"| learner update ({ln['rows']} rows of {ln['real_rows']} real, {ln['feature_shape']} bf16) | "
                     f"{ln['seconds']:.2f} s ({ln['seconds_scaled_to_real_rows']:.2f} s scaled to real rows), "
                     f"peak {_gb(ln['peak_memory_bytes'])} ({ln['peak_memory_kind']}) |")
    ws = results.get("weight_sync", {})
    if "error" in ws:
        lines.append(f"| weight sync | error: {ws['error']} |")
    elif ws:
        lines.append(f"| weight sync ({ws['serializer']}, {ws['params']:,} params) | {ws['bytes'] / 1e6:.2f} MB, "
                     f"dumps {1e3 * ws['dumps_s']:.1f} ms + loads {1e3 * ws['loads_s']:.1f} ms |")
    off = results.get("text_encoder_offload", {})
    if "error" in off:
        lines.append(f"| text-encoder offload | error: {off['error']} |")
    elif off:
        what = f"{_gb(off['measured_bytes_freed'])} freed" if off["measured"] else "not measured (CPU)"
        encoders = " + ".join(off.get("encoder_classes", {}).values())
        lines.append(f"| text-encoder offload ({encoders}) | {what}; estimate {_gb(off['estimate_bytes_built'])} built, "
                     f"{_gb(off['estimate_bytes_with_t5'])} with T5 |")
    for name, rw in results.get("rewards", {}).items():
        if "error" in rw:
            lines.append(f"| reward {name} | error: {rw['error']} |")
        else:
            lines.append(f"| reward {name} ({rw['model']}, bf16, batch {rw['batch']}) | "
                         f"{rw['images_per_s']:.1f} images/s, peak {_gb(rw['peak_memory_bytes'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tpdm_rl.builders.random_backbone import configs
    from tpdm_rl.core.config_io import load_config
    from tpdm_rl.core.devices import resolve_device
    from tpdm_rl.core.files import write_json_atomic
    from tpdm_rl.core.threads import apply_threads

    device = resolve_device(args.device)
    apply_threads(args.threads, "benchmark")
    cfg = load_config(config_path(args.preset))
    s = settings(args, device, cfg)
    # the learner's TPM and the backbone's hooks read the config's feature blocks moved to the reduced depth
    cfg.backbone.feature_blocks = list(s["feature_blocks"])
    results: dict[str, Any] = {"environment": environment(device), "settings": s}
    if device.type != "cuda":
        results["gpu_rows"] = gpu_pending(s["preset"])
    t0 = time.perf_counter()
    tr_cfg = configs(s["preset"], no_t5=s["no_t5"], layers=s["layers"], overrides=s["overrides"])["transformer"]
    hidden = tr_cfg["num_attention_heads"] * tr_cfg["attention_head_dim"]
    n_blocks = len(s["feature_blocks"])
    if "learner" in s["sections"]:  # first: on the CPU its ru_maxrss growth is only meaningful before the backbone
        guarded(results, "learner", measure_learner, cfg, s, hidden, n_blocks, device)
    if "weight_sync" in s["sections"]:
        guarded(results, "weight_sync", measure_weight_sync, cfg, s, hidden, n_blocks)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="real_size_"))
    try:
        if "backbone" in s["sections"]:
            backbone_section(results, s, cfg, device, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if "rewards" in s["sections"]:
        rewards_section(results, s, device)
    results["environment"]["elapsed_s"] = time.perf_counter() - t0
    results["errors"] = sorted(_errors(results))
    results["notes"] = notes(results, s, device)
    out = Path(s["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, results)
    print(markdown(results))
    for note in results["notes"]:
        print(f"- {note}")
    print(f"\nwrote {out}")
    return 0


def notes(results: dict, s: dict, device: torch.device) -> list[str]:
    """Caveats a reader of the numbers needs."""
    out = []
    if s["smoke"]:
        out.append("smoke run: tiny widths, the numbers mean nothing")
    if s["transformer_depth"] != s["full_depth"]:
        out.append(f"{s['preset']} at reduced depth: {s['transformer_depth']} of its {s['full_depth']} transformer "
                   f"blocks; the config's feature blocks {s['config_feature_blocks']} moved to {s['feature_blocks']}")
    if device.type != "cuda":
        out.append("CPU peak memory is ru_maxrss, the process's peak so far: it never goes down between rows")
    dtypes = {r["storage"]["temb_dtype"] for r in results.get("rows", []) if "storage" in r}
    if dtypes - {"bfloat16"}:
        out.append(f"the engine stores temb in {', '.join(sorted(dtypes))} (only the features in the storage dtype "
                   "bfloat16); bytes_per_step counts what it stores")
    ln = results.get("learner", {})
    if "rows" in ln and ln["rows"] != ln["real_rows"]:
        out.append(f"learner timed on {ln['rows']} of the {ln['real_rows']} rows of a real iteration; "
                   "seconds_scaled_to_real_rows assumes linear scaling")
    return out


def _errors(node: Any, path: str = "") -> list[str]:
    """Paths of every section that recorded an error."""
    if isinstance(node, dict):
        if "error" in node and isinstance(node["error"], str):
            return [path or "."]
        return [e for k, v in node.items() for e in _errors(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [e for i, v in enumerate(node) for e in _errors(v, f"{path}[{i}]")]
    return []


if __name__ == "__main__":
    sys.exit(main())
