"""Hand-made sigma tables against diffusers' ``fixed:N`` on the shipped toy backbone, and the choice of the
``builtin:toy`` table family.

Two modes, both scored with the exact ``shapes`` reward, one image per prompt from the eval's own noise seeds
(``tpdm_rl.evaluation.run.noise_seed``), paired standard errors (every method samples the same noises):

``--mode heldout`` (default)
    The 200 held-out prompts (``builtin:toy-heldout``): ``fixed:N`` against the simple hand-made tables
    (1,.9,.75,.5,0; 1,.95,.9,.6,.3,0; 1,.967,.933,.9,.6,.3,0; the shift-10 8-step curve with a direct last
    jump) and against the ``builtin:toy`` family (chosen beforehand on training-split prompts).
``--mode select``
    Training-split prompts only (``toyworld.prompt_set(SEED, COUNT, "train")``, never the held-out set): for
    every NFE in ``--nfe`` it scores the shift family (``tables.shift_table``) and the two-phase family
    (``tables.two_phase_table``) and keeps the best table per NFE. ``--write`` stores the choice as
    ``tpdm_rl/data/toy_tables.json`` (the ``builtin:toy`` family of ``tpdm-rl eval --tables``).

    python benchmarks/toy_tables.py --mode select --threads 1 --write
    python benchmarks/toy_tables.py --mode heldout --threads 1

Writes ``benchmarks/results/toy_tables_<mode>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from importlib import resources
from pathlib import Path

import torch
from tpdm_rl.rewards.shapes import analyse
from tpdm_rl.rollout.backbone import Backbone
from tpdm_rl.rollout.sampler import MethodSampler
from tpdm_rl.rollout.toy import BUILTIN_TOY, toy_backbone_path, toy_text_len

from tpdm_rl.core.methods import Method
from tpdm_rl.core.prompts import load_prompts
from tpdm_rl.core.tables import TOY_TABLES_FILE, load_family, shift_table, two_phase_table
from tpdm_rl.core.threads import apply_threads
from tpdm_rl.core.toyworld import prompt_set
from tpdm_rl.evaluation.run import noise_seed

#: the simple tables of issue 20's table (hand-made, not tuned on any prompt set)
SIMPLE = {4: (1.0, 0.9, 0.75, 0.5, 0.0), 5: (1.0, 0.95, 0.9, 0.6, 0.3, 0.0),
          6: (1.0, 0.967, 0.933, 0.9, 0.6, 0.3, 0.0), 8: shift_table(10.0, 8)}
SHIFTS = (2.0, 3.0, 5.0, 10.0)
KNEES = (0.8, 0.9, 0.95)


def candidates(n: int) -> list[tuple[float, ...]]:
    """The shift and two-phase tables with n steps."""
    out = [shift_table(s, n) for s in SHIFTS]
    out += [two_phase_table(a, n - a, k) for a in range(1, n) for k in KNEES]
    return out


def paired(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.double() - b.double())
    se = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else 0.0
    return {"difference": float(d.mean()), "se": se, "z": float(d.mean()) / se if se > 0 else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["heldout", "select"], default="heldout")
    ap.add_argument("--backbone", default=BUILTIN_TOY, help="builtin:toy or a toy backbone folder")
    ap.add_argument("--prompts", default="builtin:toy-heldout", help="held-out prompts (mode heldout)")
    ap.add_argument("--train-seed", type=int, default=3000, help="seed of the training-split prompts (select)")
    ap.add_argument("--train-count", type=int, default=160, help="training-split prompts (select)")
    ap.add_argument("--nfe", default="2,3,4,5,6,7,8,10,12", help="NFE values (select)")
    ap.add_argument("--guidance", type=float, default=4.5, help="CFG scale (configs/toy.yaml's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: the CPUs available)")
    ap.add_argument("--write", action="store_true", help="select: write tpdm_rl/data/toy_tables.json")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/toy_tables_<mode>.json)")
    args = ap.parse_args(argv)
    threads = apply_threads(args.threads, "benchmark")
    path = toy_backbone_path(args.backbone)
    bb = Backbone(path, device="cpu", guidance_scale=args.guidance, max_sequence_length=toy_text_len(path))
    sampler = MethodSampler(bb, 64, 64, batch_size=32)
    if args.mode == "select":
        prompts = prompt_set(args.train_seed, args.train_count, "train")
    else:
        prompts = load_prompts(args.prompts)
    seeds = [noise_seed(i, 0) for i in range(len(prompts))]
    t0 = time.perf_counter()
    cache: dict[str, torch.Tensor] = {}

    def score(m: Method) -> torch.Tensor:
        if m.name not in cache:
            cache[m.name] = analyse(sampler.run(m, prompts, seeds).images, prompts).score
        return cache[m.name]

    out: dict = {"mode": args.mode, "backbone": path, "num_prompts": len(prompts), "guidance_scale": args.guidance,
                 "threads": threads, "command": "python benchmarks/toy_tables.py " + " ".join(argv or sys.argv[1:]),
                 "machine": "2-core CPU (this project's development machine)"}
    if args.mode == "select":
        out["prompts"] = f"toyworld.prompt_set({args.train_seed}, {args.train_count}, 'train')"
        chosen, rows = {}, {}
        for n in (int(x) for x in args.nfe.split(",")):
            fixed = score(Method("fixed", steps=n))
            scored = [(float(score(Method.sigmas(t)).mean()), t) for t in candidates(n)]
            best_score, best = max(scored)
            chosen[str(n)] = [round(v, 4) for v in best]
            rows[str(n)] = {"fixed": float(fixed.mean()), "best": best_score, "table": chosen[str(n)],
                            "vs_fixed": paired(score(Method.sigmas(best)), fixed),
                            "candidates": {Method.sigmas(t).name: s for s, t in sorted(scored, reverse=True)}}
            print(f"NFE {n}: fixed {float(fixed.mean()):.3f}, best table {best_score:.3f} {chosen[str(n)]}", flush=True)
        out["nfe"] = rows
        if args.write:
            dest = Path(str(resources.files("tpdm_rl") / "data" / TOY_TABLES_FILE))
            dest.write_text(json.dumps({"about": "builtin:toy table family: per NFE the best shift/two-phase table "
                                        "on training-split prompts, chosen by benchmarks/toy_tables.py --mode select",
                                        "command": out["command"], "prompts": out["prompts"],
                                        "tables": chosen}, indent=1) + "\n")
            print(f"wrote {dest}")
    else:
        out["prompts"] = args.prompts
        rows = {}
        family = load_family("builtin:toy")
        for n in sorted(set(SIMPLE) | set(family)):
            fixed = score(Method("fixed", steps=n))
            row = {"fixed": float(fixed.mean())}
            if n in SIMPLE:
                m = Method.sigmas(SIMPLE[n])
                row["simple"] = {"table": m.name, "score": float(score(m).mean()), "vs_fixed": paired(score(m), fixed)}
            if n in family:
                m = Method.sigmas(family[n])
                row["builtin_toy"] = {"table": m.name, "score": float(score(m).mean()),
                                      "vs_fixed": paired(score(m), fixed)}
            rows[str(n)] = row
            print(f"NFE {n}: " + json.dumps(row), flush=True)
        out["nfe"] = rows
    out["seconds"] = round(time.perf_counter() - t0, 1)
    dest = Path(args.out or f"benchmarks/results/toy_tables_{args.mode}.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
