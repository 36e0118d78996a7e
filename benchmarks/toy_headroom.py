"""The headroom gate of issue 21: does a per-class step count beat one table for everyone at equal mean NFE?

Why: a TPM that allocates steps per prompt can only pay where prompts of different classes need different step
counts. Before training one, this measures the best such allocation that a *class* (the number of unplaced objects,
0-4, of the places world) allows, honestly: chosen by cross-validation, compared image by image at equal NFE.

Three stages, all scored with the exact ``shapes`` reward, one image per prompt from the eval's own noise seeds
(``tpdm_rl.evaluation.run.noise_seed(i, 0)``; every table samples the same noises, so differences are paired):

1. **Tables** (training-split prompts only, never the held-out set): for every NFE in ``--nfe`` the best of the
   shift family and the two-phase family (``tpdm_rl.core.tables``; the candidates of ``benchmarks/toy_tables.py``, with
   the first phase capped at ``A_MAX`` steps to keep the selection near 10 minutes) on
   ``toyworld.prompt_set(SEED, COUNT, "train", places=True)`` (kinds balanced). ``--write-family PATH`` stores the
   choice in the format ``tpdm_rl.core.tables.load_family`` reads; ``--family PATH`` reuses a stored choice instead.
2. **Score matrix** on the held-out prompts: every prompt once with every chosen table, S[i, n]; the mean curve
   per class with SE and counts.
3. **The gate** (:func:`cv_sweep`): for every lambda (cost per NFE), on fold A choose per class
   n_c = argmax_n mean_{i in A, class c} S[i, n] - lambda n, apply it to fold B and vice versa (2 folds, a seeded
   permutation stratified by class). The allocation's per-image scores, at its mean NFE m, are compared with the
   single-table family read at m (linear interpolation between the two tables around m, image by image, as
   ``evaluation.compare.at_equal_nfe``): paired difference, SE, z. The gate passes when some lambda with
   2 <= m <= 8 reaches z >= 3. The oracle (per-class choice made on all held-out prompts, hindsight) is reported
   for context only: it is not a valid test.

    python benchmarks/toy_headroom.py --backbone builtin:toy-places --threads 2 \\
        --write-family tpdm_rl/data/toy_places_tables.json

Writes ``benchmarks/results/toy_headroom.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tpdm_rl.rewards.shapes import analyse
from tpdm_rl.rollout.backbone import Backbone
from tpdm_rl.rollout.sampler import MethodSampler
from tpdm_rl.rollout.toy import BUILTIN_TOY, TOY_MARKER, toy_backbone_path, toy_text_len

from tpdm_rl.core.methods import Method
from tpdm_rl.core.prompts import load_prompts
from tpdm_rl.core.tables import load_family, shift_table, two_phase_table
from tpdm_rl.core.threads import apply_threads
from tpdm_rl.core.toyworld import MAX_OBJECTS, ambiguity, parse_prompt, prompt_set
from tpdm_rl.evaluation.compare import at_equal_nfe
from tpdm_rl.evaluation.run import noise_seed

#: the candidate families of benchmarks/toy_tables.py; the two-phase tables take at most A_MAX steps to the knee
#: (per NFE >= 4: 4 shift + 9 two-phase tables; 435 image-steps per training prompt over NFE 1..8)
SHIFTS = (2.0, 3.0, 5.0, 10.0)
KNEES = (0.8, 0.9, 0.95)
A_MAX = 3
CLASSES = tuple(range(MAX_OBJECTS + 1))  # number of unplaced objects
#: the cost-per-NFE sweep: 0, then log-spaced up to where every class takes one step on a [0, 1] score
LAMBDAS = (0.0, *np.round(np.logspace(-4, -0.5, 50), 6).tolist())
GATE_Z = 3.0
GATE_NFE = (2.0, 8.0)


def candidates(n: int) -> list[tuple[float, ...]]:
    """The distinct shift and two-phase tables with n steps (n = 1 has only 1, 0)."""
    out = [shift_table(s, n) for s in SHIFTS]
    out += [two_phase_table(a, n - a, k) for a in range(1, min(n - 1, A_MAX) + 1) for k in KNEES]
    return list(dict.fromkeys(tuple(round(v, 6) for v in t) for t in out))


# ---------------------------------------------------------------------------- the gate (pure, on a score matrix)
def stratified_folds(classes: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Fold (0 or 1) of every image: a seeded permutation within each class, dealt alternately to the folds
    (continuing across classes, so the folds' sizes differ by at most one)."""
    rng = np.random.default_rng(seed)
    fold = torch.zeros(classes.numel(), dtype=torch.long)
    dealt = 0
    for c in torch.unique(classes).tolist():
        idx = torch.as_tensor(rng.permutation(torch.nonzero(classes == c).reshape(-1).numpy()))
        fold[idx] = (dealt + torch.arange(idx.numel())) % 2
        dealt += idx.numel()
    return fold


def choose_per_class(S: torch.Tensor, nfes: torch.Tensor, classes: torch.Tensor, lambdas: torch.Tensor,
                     rows: torch.Tensor, num_classes: int = len(CLASSES)) -> torch.Tensor:
    """Index into ``nfes`` per (lambda, class): argmax_n of the class's mean score on ``rows`` - lambda NFE.

    Ties go to the fewer NFE. A class with no image among ``rows`` takes the choice of all ``rows`` pooled."""
    onehot = torch.nn.functional.one_hot(classes[rows], num_classes).double()  # [R, C]
    counts = onehot.sum(0)
    sums = onehot.T @ S[rows].double()  # [C, N]
    pooled = S[rows].double().mean(0, keepdim=True)
    means = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], pooled)
    value = means[None] - lambdas.double()[:, None, None] * nfes.double()[None, None, :]  # [L, C, N]
    # the first value within rounding of the maximum: exact ties (common with few images) go to the fewest NFE
    return (value >= value.amax(-1, keepdim=True) - 1e-12).int().argmax(-1)


def cv_choice(S: torch.Tensor, nfes: torch.Tensor, classes: torch.Tensor, lambdas: torch.Tensor,
              fold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (lambda, image): the index into ``nfes`` its class got on the other fold; and per fold the choices
    made on it ([2, lambdas, classes])."""
    choice = torch.zeros(len(lambdas), S.shape[0], dtype=torch.long)
    per_fold = []
    for f in (0, 1):
        per_class = choose_per_class(S, nfes, classes, lambdas, torch.nonzero(fold == f).reshape(-1))  # [L, C]
        test = fold != f
        choice[:, test] = per_class[:, classes[test]]
        per_fold.append(per_class)
    return choice, torch.stack(per_fold)


def allocation_rows(S: torch.Tensor, nfes: torch.Tensor, classes: torch.Tensor, choice: torch.Tensor,
                    lambdas: list[float], what: str) -> list[dict]:
    """Per lambda: the allocation's NFE per class, mean NFE m and its paired comparison with the family at m."""
    family = {int(n): S[:, j] for j, n in enumerate(nfes.tolist())}
    out = []
    for k, lam in enumerate(lambdas):
        idx = choice[k]  # [images] index into nfes
        scores = S.gather(1, idx[:, None]).reshape(-1)
        nfe = nfes[idx].double()
        m = float(nfe.mean())
        cmp = at_equal_nfe(scores, m, family)
        d = cmp["difference"]
        z = d["mean"] / d["se"] if d["se"] > 0 else 0.0 if d["mean"] == 0 else math.copysign(1e9, d["mean"])
        per_class = {str(c): sorted({int(v) for v in nfes[idx[classes == c]].tolist()}) for c in CLASSES
                     if bool((classes == c).any())}
        out.append({"lambda": lam, "mean_nfe": m, "score": float(scores.double().mean()),
                    "single_table": cmp["family"]["mean"], "between": cmp["between"], "gain": d["mean"],
                    "se": d["se"], "z": z, "nfe_per_class": per_class, "what": what})
    return out


def cv_sweep(S: torch.Tensor, nfes: list[int] | torch.Tensor, classes: torch.Tensor,
             lambdas: list[float] | tuple[float, ...] = LAMBDAS, seed: int = 0) -> dict:
    """The gate on a score matrix S [images, len(nfes)] (nfes ascending): 2-fold CV sweep, verdict and oracle.

    Each image's step count is the one its class got on the *other* fold, so no image's own score picks its
    step count; the single-table family is read at the allocation's mean NFE from the same images."""
    S = torch.as_tensor(S).double()
    nfes = torch.as_tensor(nfes).long()
    if bool((nfes[1:] <= nfes[:-1]).any()):
        raise ValueError(f"nfes must be strictly ascending, got {nfes.tolist()}")
    classes = torch.as_tensor(classes).long()
    lam = torch.tensor(list(lambdas), dtype=torch.float64)
    fold = stratified_folds(classes, seed)
    choice, per_fold = cv_choice(S, nfes, classes, lam, fold)
    folds_choice = {f"chosen_on_fold_{f}": nfes[per_fold[f]].tolist() for f in (0, 1)}
    cv = allocation_rows(S, nfes, classes, choice, list(lambdas), "2-fold cross-validated")
    every = torch.arange(S.shape[0])
    oracle_choice = choose_per_class(S, nfes, classes, lam, every)[:, classes]
    oracle = allocation_rows(S, nfes, classes, oracle_choice, list(lambdas), "oracle: hindsight, NOT a valid test")
    lo, hi = GATE_NFE
    window = [r for r in cv if lo <= r["mean_nfe"] <= hi]
    best = max(window, key=lambda r: r["z"], default=None)
    points = {(round(r["mean_nfe"], 6), round(r["gain"], 9)) for r in window}
    return {"folds": {"seed": seed, "sizes": [int((fold == f).sum()) for f in (0, 1)],
                      "class_nfe_by_lambda": folds_choice},
            "cv": cv, "best": best, "distinct_points_in_window": len(points), "passes": bool(best is not None and best["z"] >= GATE_Z),
            "rule": f"some lambda with {lo:g} <= mean NFE <= {hi:g} reaches z >= {GATE_Z:g} (2-fold CV, paired SE)",
            "oracle_not_a_test": {"rows": oracle,
                                  "best": max((r for r in oracle if lo <= r["mean_nfe"] <= hi),
                                              key=lambda r: r["z"], default=None)}}


def class_curves(S: torch.Tensor, nfes: list[int], classes: torch.Tensor) -> dict:
    """Mean score, SE and count per class and NFE (and over all images)."""
    out = {}
    for name, mask in [*((str(c), classes == c) for c in CLASSES), ("all", torch.ones_like(classes, dtype=bool))]:
        x = S[mask].double()
        if x.shape[0] == 0:
            continue
        se = x.std(0) / math.sqrt(x.shape[0]) if x.shape[0] > 1 else torch.zeros(x.shape[1], dtype=torch.float64)
        out[name] = {"n": int(x.shape[0]), "nfe": list(nfes), "mean": [round(float(v), 4) for v in x.mean(0)],
                     "se": [round(float(v), 4) for v in se]}
    return out


# ---------------------------------------------------------------------------- sampling
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default=BUILTIN_TOY, help="a toy backbone folder (builtin:toy: the shipped one)")
    ap.add_argument("--prompts", default="builtin:toy-places-heldout", help="held-out prompts")
    ap.add_argument("--heldout-count", type=int, default=200, help="first N held-out prompts (0: all)")
    ap.add_argument("--train-seed", type=int, default=3000, help="seed of the training-split prompts")
    ap.add_argument("--train-count", type=int, default=108, help="training-split prompts for the table choice")
    ap.add_argument("--nfe", default="1,2,3,4,5,6,7,8", help="NFE values of the family")
    ap.add_argument("--family", default=None, help="reuse this table family (.json) instead of choosing one")
    ap.add_argument("--write-family", default=None, help="write the chosen family here (load_family's format)")
    ap.add_argument("--guidance", type=float, default=4.5, help="CFG scale (configs/toy.yaml's)")
    ap.add_argument("--fold-seed", type=int, default=0, help="seed of the stratified 2-fold split")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: the CPUs available)")
    ap.add_argument("--out", default="benchmarks/results/toy_headroom.json", help="results JSON")
    args = ap.parse_args(argv)
    threads = apply_threads(args.threads, "benchmark")
    path = toy_backbone_path(args.backbone)
    text_len = toy_text_len(path) if (Path(path) / TOY_MARKER).is_file() else 77
    bb = Backbone(path, device="cpu", guidance_scale=args.guidance, max_sequence_length=text_len)
    sampler = MethodSampler(bb, 64, 64, batch_size=args.batch_size)
    nfes = sorted({int(x) for x in args.nfe.split(",")})
    command = "python benchmarks/toy_headroom.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out: dict = {"command": command, "threads": threads, "machine": "2-core CPU (this project's development machine)",
                 "backbone": args.backbone, "backbone_path": path, "text_len": text_len,
                 "guidance_scale": args.guidance, "nfe": nfes}
    t0 = time.perf_counter()

    def score(table: tuple[float, ...], prompts: list[str]) -> torch.Tensor:
        seeds = [noise_seed(i, 0) for i in range(len(prompts))]
        return analyse(sampler.run(Method.sigmas(table), prompts, seeds).images, prompts).score

    # 1. the tables, on training-split prompts only
    if args.family:
        family = load_family(args.family)
        missing = [n for n in nfes if n not in family]
        if missing:
            raise SystemExit(f"toy_headroom: family {args.family} has no table for NFE {missing}")
        tables = {n: family[n] for n in nfes}
        out["tables"] = {"source": args.family, "tables": {str(n): list(t) for n, t in tables.items()}}
    else:
        train = prompt_set(args.train_seed, args.train_count, "train", places=True)
        if any(parse_prompt(p).heldout for p in train):
            raise SystemExit("toy_headroom: a training prompt is a held-out combination")  # cannot happen
        tables, rows = {}, {}
        for n in nfes:
            scored = [(float(score(t, train).mean()), t) for t in candidates(n)]
            best_score, best = max(scored)
            tables[n] = best
            rows[str(n)] = {"best": best_score, "table": list(best),
                            "candidates": {Method.sigmas(t).name: s for s, t in sorted(scored, reverse=True)}}
            print(f"NFE {n}: best of {len(scored)} tables {best_score:.3f} {list(best)} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        out["tables"] = {"source": f"toyworld.prompt_set({args.train_seed}, {args.train_count}, 'train', "
                                   "places=True)", "selection": rows,
                         "tables": {str(n): list(t) for n, t in tables.items()}}
        out["selection_seconds"] = round(time.perf_counter() - t0, 1)
        if args.write_family:
            dest = Path(args.write_family)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps({"about": "places-world table family: per NFE the best shift/two-phase table "
                                        "on training-split prompts, chosen by benchmarks/toy_headroom.py",
                                        "command": command, "backbone": args.backbone,
                                        "prompts": out["tables"]["source"],
                                        "tables": {str(n): list(t) for n, t in tables.items()}}, indent=1) + "\n")
            print(f"wrote {dest}")

    # 2. the score matrix on held-out prompts
    heldout = load_prompts(args.prompts)
    heldout = heldout[: args.heldout_count] if args.heldout_count > 0 else heldout
    classes = torch.tensor([ambiguity(p) for p in heldout])
    t1 = time.perf_counter()
    S = torch.stack([score(tables[n], heldout) for n in nfes], dim=1).double()  # [images, NFE]
    out["heldout_seconds"] = round(time.perf_counter() - t1, 1)
    out["prompts"] = {"heldout": args.prompts, "count": len(heldout),
                      "per_class": {str(c): int((classes == c).sum()) for c in CLASSES}}
    out["curves"] = class_curves(S, nfes, classes)
    out["score_matrix"] = S.tolist()  # full precision: the gate can be recomputed from the JSON exactly
    out["classes"] = classes.tolist()

    # 3. the gate
    gate = cv_sweep(S, nfes, classes, LAMBDAS, args.fold_seed)
    out["gate"] = gate
    out["seconds"] = round(time.perf_counter() - t0, 1)
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")

    print("mean shapes score per class (unplaced objects) and NFE:")
    print("class  n   " + " ".join(f"{n:>6d}" for n in nfes))
    for name, c in out["curves"].items():
        print(f"{name:>5s} {c['n']:>3d}  " + " ".join(f"{v:6.3f}" for v in c["mean"]))
    seen = set()
    print("2-fold CV allocation vs one table at equal NFE (distinct operating points):")
    for r in gate["cv"]:
        key = (round(r["mean_nfe"], 4), round(r["gain"], 6))
        if key not in seen:
            seen.add(key)
            print(f"  lambda {r['lambda']:<8g} m {r['mean_nfe']:5.2f} gain {r['gain']:+.4f} se {r['se']:.4f} "
                  f"z {r['z']:+6.2f}  NFE per class {r['nfe_per_class']}")
    b, ob = gate["best"], gate["oracle_not_a_test"]["best"]
    if b:
        print(f"best CV point in [{GATE_NFE[0]:g}, {GATE_NFE[1]:g}]: m {b['mean_nfe']:.2f} gain {b['gain']:+.4f} "
              f"se {b['se']:.4f} z {b['z']:+.2f}")
    if ob:
        print(f"(oracle, hindsight, not a test: m {ob['mean_nfe']:.2f} gain {ob['gain']:+.4f} z {ob['z']:+.2f})")
    print(f"gate {'PASSES' if gate['passes'] else 'FAILS'}: {gate['rule']}")
    print(f"wrote {dest} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
