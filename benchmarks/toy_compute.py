"""How the toy backbone's quality scales with training compute: continue training a toy backbone.

The shipped toy backbone is trained for 4,000 transformer steps because ``make-toy-backbone --train`` must
reproduce it in an hour on 2 cores. This probe loads a toy backbone folder (default: the shipped one), keeps
its VAE, re-encodes the same training scenes (so the latent shift and scale stay the same), trains the
transformer and the text encoders for ``--steps`` more steps with the shipped recipe (a fresh warm-up and
cosine schedule, a different data order from ``--seed``), saves the result to ``--out`` and runs the
training's closing quality check on 200 held-out prompts (the same prompts as ``training/quality.json``).
Compare the saved folder with ``benchmarks/toy_quality.py --backbone OUT``.

    python benchmarks/toy_compute.py --out /tmp/toy_more [--steps 4000] [--seed 7] [--threads 2]

Writes ``OUT/training/`` (loss curve and quality) and ``benchmarks/results/toy_compute.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from diffusers import StableDiffusion3Pipeline
from tpdm_rl.rollout.toy import BUILTIN_TOY, TOY_MARKER, toy_backbone_path

from tpdm_rl.builders.toy_backbone import (
    ToyTrainSettings,
    encode_scenes,
    evaluate_quality,
    plot_loss,
    train_transformer,
)
from tpdm_rl.core.threads import apply_threads
from tpdm_rl.core.toyworld import prompt_set


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default=BUILTIN_TOY, help="builtin:toy or a toy backbone folder to continue")
    ap.add_argument("--out", required=True, help="new folder for the continued backbone")
    ap.add_argument("--steps", type=int, default=4000, help="more transformer steps")
    ap.add_argument("--seed", type=int, default=7, help="data order and noise of the extra steps")
    ap.add_argument("--scenes", type=int, default=ToyTrainSettings.scenes,
                    help="training scenes to encode (the shipped recipe's count keeps the latent scale)")
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: the CPUs available)")
    ap.add_argument("--results", default="benchmarks/results/toy_compute.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"toy_compute: {str(out)!r} exists; choose a new --out", file=sys.stderr)
        return 2
    threads = apply_threads(args.threads, "benchmark")
    src = toy_backbone_path(args.backbone)
    marker = Path(src) / TOY_MARKER
    meta = json.loads(marker.read_text()) if marker.is_file() else {}
    places = meta.get("world") == "places"  # the places world's backbone: its own held-out prompts
    t0 = time.perf_counter()
    pipe = StableDiffusion3Pipeline.from_pretrained(src)
    pipe.set_progress_bar_config(disable=True)
    base = ToyTrainSettings(threads=threads, scenes=args.scenes)
    before = (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor)
    latents, prompts = encode_scenes(pipe, base, progress=True)  # the seed-0 scenes of the shipped recipe
    extra = replace(base, seed=args.seed, steps=args.steps, warmup=min(base.warmup, max(1, args.steps // 10)))
    records: list[dict] = []
    train_transformer(pipe, latents, prompts, extra, lambda r: records.append(
        {**r, "elapsed_s": round(time.perf_counter() - t0, 2)}), progress=True)
    train_s = time.perf_counter() - t0
    quality = evaluate_quality(pipe, prompt_set(1, args.eval_prompts, "heldout", places=places), seed=10_000)
    pipe.save_pretrained(out, safe_serialization=True)
    if meta:  # keep the folder a toy backbone (text length, world) and say what was added
        (out / TOY_MARKER).write_text(json.dumps({**meta, "continued_from": src, "extra_steps": args.steps,
                                                  "extra_seconds": round(train_s, 1)}, indent=2) + "\n")
    (out / "training").mkdir()
    (out / "training" / "loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "training" / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    plot_loss(records, out / "training" / "loss.png")
    res = {"command": " ".join(sys.argv), "source": src, "out": str(out), "threads": threads,
           "extra_settings": asdict(extra), "train_seconds": round(train_s, 1),
           "latent_shift_scale_before": before,
           "latent_shift_scale_after": (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor),
           "final_loss_smooth": records[-1]["loss_smooth"] if records else None, "quality": quality}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(res, indent=2) + "\n")
    for steps, q in quality.items():
        by = ", ".join(f"{k}: {v['exact']:.2f}" for k, v in q["by_objects"].items())
        print(f"{steps} steps: score {q['score']:.3f}, exact {q['exact']:.3f}; exact by objects {by}")
    print(f"trained {args.steps} more steps in {train_s:.0f} s with {threads} threads; wrote {out} and {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
