"""Static vs continuous batching on the tiny backbone: trajectories per second, side by side.

A TPM initialised with a low concentration gives varied step counts (as a partly trained TPM does),
which is exactly when static batching wastes slots waiting for the slowest trajectory. The repeats
alternate the two modes (static, continuous, then continuous, static, ...) so drift in machine load
hits both alike; medians are reported.

    python benchmarks/rollout.py [--trajectories 64] [--batch-size 16] [--repeats 3] [--threads N]
                                 [--output benchmarks/results/rollout.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# this file is named like the `rollout` package: keep its folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="", help="diffusers SD3 folder (default: build the tiny one)")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--trajectories", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=28)
    ap.add_argument("--init-ratio", type=float, default=0.75)
    ap.add_argument("--init-concentration", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode, interleaved; medians reported")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: the CPUs available)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--output", default="benchmarks/results/rollout.json")
    args = ap.parse_args()

    from tpdm_rl.rollout.backbone import Backbone
    from tpdm_rl.rollout.engine import SamplingEngine
    from tpdm_rl.rollout.schedules import TPMSchedule

    from tpdm_rl.algorithm.policy import TimePredictionModule, TPMSpec
    from tpdm_rl.builders.tiny_backbone import make_tiny_backbone
    from tpdm_rl.core.rng import derive_key
    from tpdm_rl.core.threads import apply_threads

    threads = apply_threads(args.threads, "benchmark")  # before any torch work: the backbone load already uses the pool
    path = args.backbone or str(make_tiny_backbone(Path(tempfile.mkdtemp()) / "tiny", seed=0))
    bb = Backbone(path, device=args.device, feature_grid=8, max_sequence_length=32)
    torch.manual_seed(0)
    tpm = TimePredictionModule(TPMSpec(bb.feature_channels, bb.temb_dim, grid=8, init_ratio=args.init_ratio,
                                       init_concentration=args.init_concentration)).to(bb.device).eval()
    n = args.trajectories
    prompts = [f"benchmark prompt {i % 8}" for i in range(n)]
    seeds = [derive_key(0, i) for i in range(n)]
    keys = torch.tensor([derive_key(1, i) for i in range(n)])
    modes = {"static": False, "continuous": True}
    engines = {name: SamplingEngine(bb, args.resolution, args.resolution, batch_size=args.batch_size,
                                    max_steps=args.max_steps, continuous=continuous)
               for name, continuous in modes.items()}
    for eng in engines.values():  # warm-up
        eng.run(prompts[:args.batch_size], seeds[:args.batch_size], keys[:args.batch_size],
                TPMSchedule(tpm, 0.01), decode=False)
    times: dict[str, list[float]] = {name: [] for name in modes}
    last = {}
    for r in range(args.repeats):  # A/B, then B/A, ...: interleaved, never all of one mode first
        for name in (("static", "continuous") if r % 2 == 0 else ("continuous", "static")):
            eng = engines[name]
            eng.stats = {"backbone_calls": 0, "slot_steps": 0}
            t = time.perf_counter()
            tr = eng.run(prompts, seeds, keys, TPMSchedule(tpm, 0.01), decode=False)
            times[name].append(time.perf_counter() - t)
            last[name] = (tr, dict(eng.stats))
    results = {}
    for name in modes:
        tr, stats = last[name]
        med = statistics.median(times[name])
        results[name] = {
            "seconds": med, "seconds_all": times[name], "trajectories_per_s": n / med,
            "backbone_calls": stats["backbone_calls"],
            "slot_utilisation": stats["slot_steps"] / (stats["backbone_calls"] * args.batch_size),
            "steps_mean": float(tr.steps.float().mean()), "steps_min": int(tr.steps.min()),
            "steps_max": int(tr.steps.max()),
        }
    results["speedup_continuous_over_static"] = (results["continuous"]["trajectories_per_s"]
                                                 / results["static"]["trajectories_per_s"])
    results["config"] = vars(args) | {"device": str(bb.device), "torch_threads": threads,
                                      "statistic": "median over interleaved repeats"}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for name in ("static", "continuous"):
        r = results[name]
        print(f"{name:>10}: {r['trajectories_per_s']:.2f} traj/s, {r['backbone_calls']} backbone calls, "
              f"slot utilisation {r['slot_utilisation']:.2f}, steps {r['steps_min']}..{r['steps_max']} "
              f"(mean {r['steps_mean']:.1f})")
    print(f"continuous / static = {results['speedup_continuous_over_static']:.2f}x (medians of {args.repeats} "
          f"interleaved repeats, {threads} threads)  -> {out}")


if __name__ == "__main__":
    main()
