"""The toy backbone's quality bar, on the held-out prompts (``builtin:toy-heldout``, 200 prompts).

For every step count (default 4 and 28, the backbone's default shifted schedule) it samples every held-out
prompt once and scores it with the exact ``shapes`` reward: mean score, exact-match rate, and both by
number of objects. The bar: at 28 steps at least 90% of the 1-object and 60% of the 2-object prompts
exactly right, and the score at 4 steps clearly below 28.

    python benchmarks/toy_quality.py [--backbone builtin:toy] [--steps 4,28] [--threads N]

Writes ``benchmarks/results/toy_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tpdm_rl.rewards.shapes import analyse
from tpdm_rl.rollout.backbone import Backbone
from tpdm_rl.rollout.sampler import MethodSampler
from tpdm_rl.rollout.toy import BUILTIN_TOY, toy_backbone_path, toy_text_len

from tpdm_rl.core.prompts import load_prompts
from tpdm_rl.core.threads import apply_threads
from tpdm_rl.core.toyworld import parse_prompt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default=BUILTIN_TOY, help="builtin:toy or a toy backbone folder")
    ap.add_argument("--prompts", default="builtin:toy-heldout")
    ap.add_argument("--steps", default="4,28", help="comma-separated step counts")
    ap.add_argument("--guidance", type=float, default=4.5, help="CFG scale (configs/toy.yaml's)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the CPUs available)")
    ap.add_argument("--bar", default="0.90,0.60", help="exact-match bar at 28 steps for 1- and 2-object prompts "
                    "(the places world's: 0.85,0.55)")
    ap.add_argument("--out", default="benchmarks/results/toy_quality.json")
    args = ap.parse_args(argv)
    bar = dict(zip(("1", "2"), (float(x) for x in args.bar.split(","))))
    threads = apply_threads(args.threads, "benchmark")
    path = toy_backbone_path(args.backbone)
    bb = Backbone(path, device="cpu", guidance_scale=args.guidance, max_sequence_length=toy_text_len(path))
    prompts = load_prompts(args.prompts)
    parsed = [parse_prompt(p) for p in prompts]
    levels = torch.tensor([p.num_objects for p in parsed])
    unplaced = torch.tensor([p.num_unplaced for p in parsed])
    sampler = MethodSampler(bb, 64, 64, batch_size=32)
    seeds = list(range(len(prompts)))
    out = {"backbone": path, "prompts": args.prompts, "num_prompts": len(prompts), "guidance_scale": args.guidance,
           "threads": threads, "command": " ".join(sys.argv), "steps": {}}
    for n in (int(s) for s in args.steps.split(",")):
        t0 = time.perf_counter()
        res = sampler.run(f"fixed:{n}", prompts, seeds)
        a = analyse(res.images, prompts)
        rec = {"score": float(a.score.mean()), "exact": float(a.exact.float().mean()), "seconds": time.perf_counter() - t0,
               "by_objects": {str(k): {"score": float(a.score[levels == k].mean()),
                                       "exact": float(a.exact[levels == k].float().mean()),
                                       "prompts": int((levels == k).sum())} for k in (1, 2, 3, 4)},
               "by_unplaced": {str(k): {"score": float(a.score[unplaced == k].mean()),
                                        "exact": float(a.exact[unplaced == k].float().mean()),
                                        "prompts": int((unplaced == k).sum())}
                               for k in sorted(set(unplaced.tolist()))}}
        out["steps"][str(n)] = rec
        print(f"fixed:{n}: score {rec['score']:.3f}, exact {rec['exact']:.3f}; exact by objects "
              + ", ".join(f"{k}: {v['exact']:.2f}" for k, v in rec["by_objects"].items()), flush=True)
    top = out["steps"].get("28")
    if top is not None:
        out["bar"] = {k: {"required": v, "measured": top["by_objects"][k]["exact"],
                          "met": top["by_objects"][k]["exact"] >= v} for k, v in bar.items()}
        print("quality bar at 28 steps: " + ", ".join(f"{k} object(s) {b['measured']:.2f} (>= {b['required']:.2f}: "
                                                     f"{'met' if b['met'] else 'NOT met'})" for k, b in out["bar"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
