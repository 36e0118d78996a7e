"""Known-optimum world (tpdm_rl/training/sanity.py): which settings let the learning find a per-class step count.

Each row trains one TPM per seed with the config's defaults (stop-ratio action) changed in one setting, and reports
per-class mean NFE on held-out prompts under deterministic (`mode`) and sampled (`sample`) inference, the share of
the optimum's gain over the best single schedule, and how many seeds pass the test's bar (NFE within 0.5 of the
optimum per class and >= 90% of the gain). Writes ``benchmarks/results/known_optimum.json``.

    python benchmarks/known_optimum.py --threads 1 --seeds 5
"""

from __future__ import annotations

import argparse
import dataclasses
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
#: a world shaped like the places experiment (one class in three best at 1 step, the others at 2; the per-class rule
#: is worth +0.022 over the best single schedule at price 0.065) with noisy rewards (std 0.15, 7x that gain), trained as
#: configs/toy_places.yaml is (global advantage std, groups of 8). Equal trajectory budgets: 8 prompts x 240
#: iterations = 16 x 120 = 32 x 60.
def _kwargs(world: SanityWorld) -> dict:
    """A named world as the keyword arguments a row stores (and rebuilds it from)."""
    return {f.name: getattr(world, f.name) for f in dataclasses.fields(world)}


PLACES_LIKE = _kwargs(SanityWorld.places_like())
_PL = {"algorithm.adv_std": "global"}
ROWS += [
    ("places-like, noisy: 8 prompts x 240 it", PLACES_LIKE, {**_PL, "train.iterations": 240}),
    ("places-like, noisy: 8 prompts x 240 it, 1 minibatch", PLACES_LIKE,
     {**_PL, "train.iterations": 240, "algorithm.minibatches": 1}),
    ("places-like, noisy: 8 prompts x 240 it, lr 3e-4", PLACES_LIKE, {**_PL, "train.iterations": 240, "optim.lr": 3e-4}),
    ("places-like, noisy: 8 prompts x 240 it, entropy_coef 0.01", PLACES_LIKE,
     {**_PL, "train.iterations": 240, "algorithm.entropy_coef": 0.01}),
    ("places-like, noisy: 16 prompts x 120 it", PLACES_LIKE,
     {**_PL, "train.iterations": 120, "rollout.prompts_per_iteration": 16}),
    ("places-like, noisy: 16 prompts x 120 it, 4 minibatches", PLACES_LIKE,
     {**_PL, "train.iterations": 120, "rollout.prompts_per_iteration": 16, "algorithm.minibatches": 4}),
    ("places-like, noisy: 16 prompts x 120 it, entropy_coef 0.01", PLACES_LIKE,
     {**_PL, "train.iterations": 120, "rollout.prompts_per_iteration": 16, "algorithm.entropy_coef": 0.01}),
    ("places-like, noisy: 32 prompts x 60 it", PLACES_LIKE,
     {**_PL, "train.iterations": 60, "rollout.prompts_per_iteration": 32}),
]
#: the places world's own step landscape (training-split table scores; 2 steps worse than 1 and 3 for all-placed
#: prompts), reward noise 0.15, trained as configs/toy_places.yaml is (16 prompts x 120 iterations unless said)
VALLEY = _kwargs(SanityWorld.places_valley())
_PV = {**_PL, "train.iterations": 120, "rollout.prompts_per_iteration": 16}
ROWS += [
    ("places valley: start at the 3-step table", VALLEY, _PV),
    ("places valley: start at 3 steps, stop_sharpness 2", VALLEY, {**_PV, "policy.stop_sharpness": 2.0}),
    ("places valley: start at 3 steps, stop_sharpness 1.5", VALLEY, {**_PV, "policy.stop_sharpness": 1.5}),
    ("places valley: start at 3 steps, stop_sharpness 2, lr 3e-3", VALLEY,
     {**_PV, "policy.stop_sharpness": 2.0, "optim.lr": 3e-3}),
    ("places valley: start at 1 step (init_stop_steps 1)", VALLEY, {**_PV, "policy.init_stop_steps": 1}),
    ("places valley: start at 1 step, 8 prompts x 240 it", VALLEY,
     {**_PV, "policy.init_stop_steps": 1, "rollout.prompts_per_iteration": 8, "train.iterations": 240}),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rows", default="", help="only the rows whose name contains this text")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "known_optimum.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, world_kw, overrides in [r for r in ROWS if args.rows in r[0]]:
        world = SanityWorld(**world_kw)
        runs = []
        t0 = time.perf_counter()
        for seed in range(args.seeds):
            res = train_sanity(world, sanity_config(world, seed=seed, **overrides))
            runs.append({"seed": seed, "per_class_nfe": res.per_class_steps, "gain_share": res.gain_share,
                         "passes": {m: res.passes(m) for m in ("mode", "sample")},
                         "nfe_right": {m: res.passes(m, share=-1e9) for m in ("mode", "sample")}})
        rows.append({"row": name, "world": world_kw, "overrides": overrides, "optimum": world.optimum(),
                     "passes_mode": sum(r["passes"]["mode"] for r in runs),
                     "passes_sample": sum(r["passes"]["sample"] for r in runs),
                     "nfe_right_mode": sum(r["nfe_right"]["mode"] for r in runs),
                     "median_gain_share_mode": statistics.median(r["gain_share"]["mode"] for r in runs),
                     "median_gain_share_sample": statistics.median(r["gain_share"]["sample"] for r in runs),
                     "seconds_per_seed": round((time.perf_counter() - t0) / args.seeds, 2), "runs": runs})
        print(f"{name}: passes {rows[-1]['passes_mode']}/{args.seeds} (mode), {rows[-1]['passes_sample']}/"
              f"{args.seeds} (sample); per-class NFE right {rows[-1]['nfe_right_mode']}/{args.seeds} (mode); "
              f"median gain share {rows[-1]['median_gain_share_mode']:.2f}", flush=True)
    for row in rows:
        row.update(command="python benchmarks/known_optimum.py " + " ".join(argv or sys.argv[1:]),
                   threads=args.threads, seeds=args.seeds)
    out = Path(args.out)
    if args.rows and out.is_file():  # a partial call keeps the other rows of the file (each row says how it was run)
        done = {r["row"] for r in rows}
        old = json.loads(out.read_text())
        keep = [r for r in old["rows"] if r["row"] not in done]
        for r in keep:  # files written before rows carried their own command
            for k in ("command", "threads", "seeds"):
                r.setdefault(k, old.get(k))
        order = [name for name, *_ in ROWS]
        rows = sorted(keep + rows, key=lambda r: order.index(r["row"]) if r["row"] in order else len(order))
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)", "rows": rows}
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
