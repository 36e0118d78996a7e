"""The places experiment's price sweep: one TPM per step price, each evaluated on the held-out places prompts.

For every price the script trains ``configs/toy_places.yaml`` with ``step_penalty.coef`` set to it and the initial
table chosen **on training-split prompts**: the member of the ``builtin:toy-places`` family with the best
``score - price * NFE`` on the 108 training-split prompts the family was selected on (its selection scores in
``benchmarks/results/toy_headroom.json``). The training run's closing evaluation (210 held-out prompts x 2 seeds:
the TPM, its ``tpm-mean``, ``fixed:N`` and the table family at equal NFE) is the result. Each TPM is also
evaluated on 120 training-split prompts (1 seed) against the table family: the config's price is chosen there.

Resumable: a finished price is skipped, an interrupted one continues from its last checkpoint (``--resume auto``).
Writes ``benchmarks/results/toy_places_sweep.json`` and ``docs/img/toy_places_sweep.png``.

    python benchmarks/toy_places_sweep.py --threads 1 --prices 0.015,0.03,0.05,0.07,0.09
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "toy_places.yaml"
HEADROOM = ROOT / "benchmarks" / "results" / "toy_headroom.json"
TRAIN_EVAL = ("--prompts", "builtin:toy-places-train", "--limit", "120", "--seeds", "1")


def init_table(price: float) -> tuple[int, list[float]]:
    """The family member with the best training-split score - price * NFE (never the held-out scores)."""
    sel = json.loads(HEADROOM.read_text())["tables"]
    best = max(sel["selection"], key=lambda n: sel["selection"][n]["best"] - price * int(n))
    return int(best), [float(v) for v in sel["tables"][best]]


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with log.open("a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"error: command failed with exit {rc}; see {log}")


def cli() -> str:
    return str(Path(sys.executable).with_name("tpdm-rl"))


def run_name(price: float, seed: int) -> str:
    return f"coef_{price:g}" + (f"_seed{seed}" if seed else "")


def train_and_eval(price: float, out: Path, threads: int, iterations: int | None, seed: int = 0) -> Path:
    run_dir = out / run_name(price, seed)
    if (run_dir / "eval" / "results.json").is_file() and (run_dir / "eval_train" / "results.json").is_file():
        print(f"price {price:g}: done, skipped", flush=True)
        return run_dir
    nfe, table = init_table(price)
    sets = [f"step_penalty.coef={price}", f"policy.init_table={json.dumps(table)}", f"train.threads={threads}", f"seed={seed}",
            "logging.progress=false"]
    if iterations:
        sets.append(f"train.iterations={iterations}")
    if not (run_dir / "eval" / "results.json").is_file():
        cmd = [cli(), "train", "--config", str(CONFIG), "--output", str(run_dir)]
        for s in sets:
            cmd += ["--set", s]
        if run_dir.exists():
            cmd += ["--resume", "auto"]
        run(cmd, out / f"{run_name(price, seed)}.log")
    if not (run_dir / "eval_train" / "results.json").is_file():
        run([cli(), "eval", "--checkpoint", str(run_dir), *TRAIN_EVAL, "--methods", "tpm", "--tables",
             "builtin:toy-places", "--rewards", "shapes", "--pareto-steps", "1,2,3", "--batch-size", "32",
             "--threads", str(threads), "--no-progress", "--overwrite", "--output", str(run_dir / "eval_train")],
            out / f"{run_name(price, seed)}.log")
    return run_dir


def summarise(price: float, run_dir: Path) -> dict:
    """The numbers of one TPM: held-out results, per-class NFE, and the training-split comparison."""
    held = json.loads((run_dir / "eval" / "results.json").read_text())
    train_file = run_dir / "eval_train" / "results.json"
    nfe, table = init_table(price)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {"price": price, "iterations": cfg["train"]["iterations"], "seed": cfg["seed"],
            "train_threads": cfg["train"]["threads"],  # 0: every idle CPU (2 on the machine of these runs)
            "prompts_per_iteration": cfg["rollout"]["prompts_per_iteration"],
            "init_stop_steps": cfg["policy"].get("init_stop_steps", 0), "init_nfe": nfe, "init_table": table,
            "run": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir),
            "heldout": _digest(held),
            "train_split": _digest(json.loads(train_file.read_text())) if train_file.is_file() else None}


def row_key(r: dict) -> tuple:
    """What makes two rows different runs (rows written before a setting was recorded had its former value)."""
    return (r["price"], r.get("prompts_per_iteration", 8), r.get("init_stop_steps", 0), r["iterations"],
            r.get("seed", 0), r.get("train_threads", 1))


def _digest(res: dict) -> dict:
    """TPM, comparisons at equal NFE (paired SE), the fixed:N / table / tpm-mean curves and per-class NFE."""
    methods = {m["method"]: m for m in res["methods"]}
    tpm = methods["tpm"]
    point = lambda m: {"nfe": m["nfe"]["mean"], "shapes": m["rewards"]["shapes"]["mean"]}  # noqa: E731
    out = {"tpm": {**point(tpm), "shapes_se": tpm["rewards"]["shapes"]["se"], "nfe_distinct": tpm["nfe"]["distinct"]},
           "compare": {fam: {k: c[k] for k in ("difference", "z", "between")}
                       for fam, c in res.get("comparisons", {}).get("shapes", {}).items()},
           "fixed": [point(m) for m in res.get("pareto") or []],
           "tables": [point(m) for m in res.get("tables_curve") or []],
           "tpm_mean": [point(m) for name, m in methods.items() if name.startswith("tpm-mean")]}
    cx = res.get("complexity") or {}
    if cx.get("nfe_by_unplaced"):
        out["nfe_by_unplaced"] = {k: v["mean"] for k, v in cx["nfe_by_unplaced"]["tpm"].items()}
        out["shapes_by_unplaced"] = {k: v["mean"] for k, v in cx["scores_by_unplaced"]["tpm"]["shapes"].items()}
        out["spearman_unplaced"] = cx["spearman_tpm_nfe"]["unplaced"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prices", default="0.015,0.03,0.05,0.07,0.09")
    ap.add_argument("--out", default=str(ROOT / "runs" / "toy_places_sweep"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="the runs' seed (another seed: another run folder)")
    ap.add_argument("--iterations", type=int, default=None, help="override train.iterations (default: the config's)")
    ap.add_argument("--extra", action="append", default=[], metavar="PRICE:ITERATIONS:RUN_DIR",
                    help="also report a finished run of another length (e.g. a --resume continuation)")
    ap.add_argument("--collect-only", action="store_true",
                    help="no training: report the prices whose held-out evaluation is complete")
    ap.add_argument("--keep-previous", action="store_true",
                    help="keep the rows of the existing results file whose (price, iterations) this call does not "
                         "report (their run folders may be gone; each row names its run)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "toy_places_sweep.json"))
    ap.add_argument("--figure", default=str(ROOT / "docs" / "img" / "toy_places_sweep.png"))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    for price in [float(p) for p in args.prices.split(",")]:
        if args.collect_only:
            run_dir = out / run_name(price, args.seed)
            if (run_dir / "eval" / "COMPLETE").is_file():
                rows.append(summarise(price, run_dir))
            continue
        rows.append(summarise(price, train_and_eval(price, out, args.threads, args.iterations, args.seed)))
    for spec in args.extra:
        price, iterations, run_dir = spec.split(":", 2)
        rows.append({**summarise(float(price), Path(run_dir).resolve()), "iterations": int(iterations)})
    if args.keep_previous and Path(args.results).is_file():
        have = {row_key(r) for r in rows}
        rows += [r for r in json.loads(Path(args.results).read_text())["tpms"] if row_key(r) not in have]
    rows.sort(key=row_key)
    report = {"command": "python benchmarks/toy_places_sweep.py " + " ".join(argv or sys.argv[1:]),
              "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
              "config": "configs/toy_places.yaml", "seconds_this_call": round(time.time() - t0, 1), "tpms": rows}
    Path(args.results).write_text(json.dumps(report, indent=1))
    plot(report, Path(args.figure))
    print(f"wrote {args.results} and {args.figure}")
    return 0


def plot(report: dict, path: Path) -> None:
    """Quality vs NFE: fixed:N, the table family, the headroom's per-class allocation, each TPM (+-1 SE) and its
    tpm-mean, all on the held-out places prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5.5))
    first = report["tpms"][0]["heldout"]
    for key, style, label in (("fixed", "o-", "fixed:N (diffusers)"), ("tables", "s-", "builtin:toy-places tables")):
        pts = sorted((p["nfe"], p["shapes"]) for p in first[key])
        if pts:
            ax.plot(*zip(*pts), style, color="grey" if key == "fixed" else "tab:blue", ms=4, label=label)
    head = json.loads(HEADROOM.read_text())["gate"]["cv"]
    pts = sorted({(c["mean_nfe"], c["score"]) for c in head if c["mean_nfe"] <= 8})
    ax.plot(*zip(*pts), ":", color="tab:green", label="per-class allocation (headroom, 2-fold CV, 200 prompts x 1)")
    for i, t in enumerate(report["tpms"]):
        h = t["heldout"]
        c = plt.get_cmap("tab20")(i % 20)
        extra = f", {t.get('prompts_per_iteration', 8)} prompts x {t['iterations']} iterations"
        extra += ", from 1 step" if t.get("init_stop_steps") == 1 else ""
        extra += f", seed {t['seed']}" if t.get("seed") else ""
        extra += ", all threads" if t.get("train_threads") == 0 else ""
        marker = "D" if t.get("init_stop_steps") == 1 else "*"  # the current config's settings, or the earlier ones
        ax.errorbar([h["tpm"]["nfe"]], [h["tpm"]["shapes"]], yerr=[h["tpm"]["shapes_se"]], fmt=marker,
                    ms=7 if marker == "D" else 11, color=c,
                    capsize=3, label=f"TPM, price {t['price']:g}{extra}")
        for x, y in ((p["nfe"], p["shapes"]) for p in h["tpm_mean"]):
            ax.plot([x], [y], "x", color=c, ms=8)
    ax.plot([], [], "x", color="k", label="each TPM's tpm-mean (its own mean schedule)")
    ax.set_xlabel("mean NFE (denoising steps)")
    ax.set_ylabel("shapes score (held-out places prompts, 210 x 2 seeds)")
    ax.set_xlim(0.8, 8.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("places world: one learned TPM per step price (held-out)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
