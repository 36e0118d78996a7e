"""Can the TPM see a places prompt's class at its first step? A linear probe of what it reads at sigma 1.

The TPM decides its first stop from the backbone's block features and ``temb`` at sigma 1, where the latent is
pure noise: whatever tells an all-placed prompt from an ambiguous one must come from the text. This fits a
logistic regression (torch, L-BFGS, L2) on the TPM's pooled inputs (mean over the feature grid, and ``temb``) of
training-split places prompts and reports its accuracy on other training-split prompts, for "all objects placed"
against the rest and for the number of unplaced objects (0-4). Writes ``benchmarks/results/toy_places_probe.json``.

    python benchmarks/toy_places_probe.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
from tpdm_rl.rollout.backbone import Backbone
from tpdm_rl.rollout.toy import toy_backbone_path

from tpdm_rl.core.prompts import load_prompts
from tpdm_rl.core.rng import keyed_normal_noise
from tpdm_rl.core.toyworld import ambiguity

ROOT = Path(__file__).resolve().parent.parent


def inputs_at_sigma_one(bb: Backbone, prompts: list[str], batch: int = 64) -> dict[str, torch.Tensor]:
    """Mean-pooled block features and temb of the first step, one noise seed per prompt."""
    feats, tembs = [], []
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo:lo + batch]
        emb, pooled = bb.encode_prompts(chunk)
        lat = keyed_normal_noise(list(range(lo, lo + len(chunk))), bb.latent_shape(64, 64))
        out = bb.step(lat, torch.ones(len(chunk)), emb, pooled, need_features=True)
        feats.append(out.features.float().mean(dim=(2, 3)))
        tembs.append(out.temb.float())
    f, t = torch.cat(feats), torch.cat(tembs)
    return {"features": f, "temb": t, "both": torch.cat([f, t], dim=1)}


def probe(x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor, classes: int,
          l2: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression on standardised inputs."""
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    a, b = (x_tr - mu) / sd, (x_te - mu) / sd
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    c = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ w + c, y_tr) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((b @ w + c).argmax(1) == y_te).double().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=1200, help="training-split prompts (half to fit, half to test)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "toy_places_probe.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = toy_backbone_path("builtin:toy-places")
    bb = Backbone(path, device="cpu", guidance_scale=4.5, feature_blocks=(0, -1), feature_grid=8,
                  max_sequence_length=40)
    prompts = load_prompts("builtin:toy-places-train", toy=True)[:args.prompts]
    unplaced = torch.tensor([ambiguity(p) for p in prompts])
    with torch.no_grad():
        xs = inputs_at_sigma_one(bb, prompts)
    half = len(prompts) // 2
    rows = {}
    for target, y, k in (("all placed vs not", (unplaced > 0).long(), 2), ("unplaced objects 0-4", unplaced, 5)):
        base = float(torch.bincount(y[half:], minlength=k).max()) / (len(y) - half)
        rows[target] = {"majority_class": base, **{name: probe(x[:half], y[:half], x[half:], y[half:], k)
                                                   for name, x in xs.items()}}
        print(target, rows[target], flush=True)
    report = {"command": "python benchmarks/toy_places_probe.py " + " ".join(argv or sys.argv[1:]),
              "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
              "prompts": f"builtin:toy-places-train[:{args.prompts}], first half fits, second half tests",
              "inputs": "TPM inputs at sigma 1 (one noise seed per prompt): block features mean-pooled over the "
                        "8x8 grid (blocks 0, -1), temb, both", "accuracy": rows}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
