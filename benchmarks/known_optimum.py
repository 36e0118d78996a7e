"""Known-optimum world (tpdm_rl/training/sanity.py): which settings let the learning find a per-class step count.

Each row trains one TPM per seed with the config's defaults (stop-ratio action) changed in one setting, and reports
per-class mean NFE on held-out prompts under deterministic (`mode`) and sampled (`sample`) inference, the share of
the optimum's gain over the best single schedule, and how many seeds pass the test's bar (NFE within 0.5 of the
optimum per class and >= 90% of the gain). Writes ``benchmarks/results/known_optimum.json``.

    python benchmarks/known_optimum.py --threads 1 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tpdm_rl.training.sanity import SanityWorld, sanity_config, train_sanity

ROOT = Path(__file__).resolve().parent.parent

#: (row name, world changes, config overrides)
ROWS: list[tuple[str, dict, dict]] = [
    ("defaults (stop_sharpness 3), 40 it", {}, {}),
    ("former stop_sharpness 8, 40 it", {}, {"policy.stop_sharpness": 8.0}),
    ("former stop_sharpness 8, 100 it", {}, {"policy.stop_sharpness": 8.0, "train.iterations": 100}),
    ("stop_sharpness 2, 40 it", {}, {"policy.stop_sharpness": 2.0}),
    ("adv_std global, 40 it", {}, {"algorithm.adv_std": "global"}),
    ("4 prompts x 16 per iteration, 40 it", {}, {"rollout.prompts_per_iteration": 4, "rollout.group_size": 16}),
    ("lr 3e-4, 40 it", {}, {"optim.lr": 3e-4}),
    ("class hard to see (nuisance 1.0: 76% linear accuracy), 40 it", {"nuisance": 1.0}, {}),
    ("class hidden (class_signal 0), 40 it", {"class_signal": 0.0}, {}),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "known_optimum.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, world_kw, overrides in ROWS:
        world = SanityWorld(**world_kw)
        runs = []
        t0 = time.perf_counter()
        for seed in range(args.seeds):
            res = train_sanity(world, sanity_config(world, seed=seed, **overrides))
            runs.append({"seed": seed, "per_class_nfe": res.per_class_steps, "gain_share": res.gain_share,
                         "passes": {m: res.passes(m) for m in ("mode", "sample")}})
        rows.append({"row": name, "world": world_kw, "overrides": overrides, "optimum": world.optimum(),
                     "passes_mode": sum(r["passes"]["mode"] for r in runs),
                     "passes_sample": sum(r["passes"]["sample"] for r in runs),
                     "median_gain_share_mode": statistics.median(r["gain_share"]["mode"] for r in runs),
                     "median_gain_share_sample": statistics.median(r["gain_share"]["sample"] for r in runs),
                     "seconds_per_seed": round((time.perf_counter() - t0) / args.seeds, 2), "runs": runs})
        print(f"{name}: passes {rows[-1]['passes_mode']}/{args.seeds} (mode), {rows[-1]['passes_sample']}/"
              f"{args.seeds} (sample); median gain share {rows[-1]['median_gain_share_mode']:.2f}", flush=True)
    report = {"command": "python benchmarks/known_optimum.py " + " ".join(argv or sys.argv[1:]),
              "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
              "seeds": args.seeds, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
