"""``tpdm-rl make-*``: write the tiny, toy and random backbones and the tiny reward models (``tpdm_rl.builders``).

``register(subparsers)`` adds the four subcommands to the main parser (``tpdm_rl/cli.py``). The builders and
the model libraries are imported inside the commands, so ``tpdm-rl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tpdm_rl.commands.quiet import quiet_libraries
from tpdm_rl.core.defaults import FLUX_PRESETS, PRESETS
from tpdm_rl.core.threads import apply_threads


def cmd_make_tiny_backbone(args: argparse.Namespace) -> int:
    from tpdm_rl.builders.tiny_backbone import make_tiny_backbone

    quiet_libraries()
    out = make_tiny_backbone(args.dir, seed=args.seed, sample_size=args.size)
    print(f"tiny SD3 backbone written to {out} (seed {args.seed}, {args.size} px)")
    return 0


def cmd_make_random_backbone(args: argparse.Namespace) -> int:
    from tpdm_rl.builders.random_backbone import make_random_backbone

    quiet_libraries()
    t0 = time.perf_counter()
    out = make_random_backbone(args.dir, args.preset, no_t5=args.no_t5, dtype=args.dtype, seed=args.seed,
                               layers=args.layers, progress=lambda line: print(f"  {line}", flush=True))
    print(f"random {args.preset} backbone written to {out} in {time.perf_counter() - t0:.0f} s "
          f"(seed {args.seed}, {args.dtype}{', no T5' if args.no_t5 else ''}"
          f"{_depth_note(args.preset, args.layers)}; random weights: images are noise)")
    return 0


def _depth_note(preset: str, layers: int | None) -> str:
    if not layers:
        return ""
    if preset in FLUX_PRESETS:
        return f", {layers} double-stream + {2 * layers} single-stream blocks"
    return f", transformer depth {layers}"


def cmd_make_toy_backbone(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"make-toy-backbone: {str(out)!r} exists and is not an empty folder; choose a new one")
    threads = apply_threads(args.threads, "toy-trainer") if args.train else 0
    from tpdm_rl.builders.toy_backbone import ToyTrainSettings, copy_toy_backbone, train_toy_backbone

    quiet_libraries()
    _check_writable(out)
    if args.train:
        settings = ToyTrainSettings(seed=args.seed, threads=threads)
        t0 = time.perf_counter()
        train_toy_backbone(out, settings)
        print(f"toy backbone trained in {time.perf_counter() - t0:.0f} s and written to {out} "
              f"(loss curve: {out / 'training' / 'loss.png'}, quality: {out / 'training' / 'quality.json'})")
    else:
        copy_toy_backbone(out)
        print(f"toy backbone written to {out} (the shipped, trained one; --train reproduces it)")
    return 0


def _check_writable(out: Path) -> None:
    """Fail with one line naming the folder before anything is written into a read-only target."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tpdm-rl-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror or exc}; expected a new or empty folder you can write to",
                      str(out)) from None


def cmd_make_tiny_rewards(args: argparse.Namespace) -> int:
    import yaml

    from tpdm_rl.builders.reward_fixtures import make_all

    quiet_libraries()
    opts = make_all(args.dir, seed=args.seed)
    print(f"tiny random reward models (real file formats) written to {args.dir}; use them as:")
    print(yaml.safe_dump({"rewards": {k: {"weight": 1.0, **v} for k, v in opts.items()}}, sort_keys=False))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add make-tiny-backbone, make-tiny-rewards, make-toy-backbone and make-random-backbone."""
    t = sub.add_parser("make-tiny-backbone", help="write the tiny random offline SD3 pipeline folder")
    t.add_argument("dir", help="folder for the diffusers pipeline")
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    t.add_argument("--size", type=int, default=128, help="default image size in pixels")
    t.set_defaults(func=cmd_make_tiny_backbone)

    rw = sub.add_parser("make-tiny-rewards", help="write tiny random reward models in the real file formats")
    rw.add_argument("dir", help="folder for the reward model files")
    rw.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    rw.set_defaults(func=cmd_make_tiny_rewards)

    toy = sub.add_parser("make-toy-backbone", help="write the trained toy-world backbone (or train it again)",
                         description="Writes the toy-world SD3 pipeline that ships with tpdm-rl (seconds), or with "
                                     "--train reproduces it from scratch (about an hour on 2 CPU cores).")
    toy.add_argument("dir", help="new (or empty) folder for the diffusers pipeline")
    toy.add_argument("--train", action="store_true", help="train from scratch instead of copying the shipped one")
    toy.add_argument("--seed", type=int, default=0, help="training seed (with --train)")
    toy.add_argument("--threads", type=int, default=0,
                     help="torch threads for training (0: the CPUs idle at start, see docs/threads.md)")
    toy.set_defaults(func=cmd_make_toy_backbone)

    rb = sub.add_parser("make-random-backbone",
                        help="write a real-size SD3 or FLUX.1 pipeline with random weights (no download)",
                        description="Writes a diffusers SD3 or FLUX.1 folder with the real configurations of the "
                                    "chosen checkpoint (SD3: transformer, CLIP-L, CLIP-G, T5-XXL, VAE; FLUX.1: "
                                    "transformer, CLIP-L, T5-XXL, VAE) and random weights, for sizing machines and "
                                    "timing rollouts offline. Disk and memory are checked first.")
    rb.add_argument("dir", help="new (or empty) folder for the diffusers pipeline")
    rb.add_argument("--preset", required=True, metavar="|".join(PRESETS),
                    help="which SD3 or FLUX.1 checkpoint to imitate")
    rb.add_argument("--no-t5", action="store_true",
                    help="leave out the T5-XXL encoder (SD3's pipeline feeds zeros; FLUX.1's needs prompt_embeds "
                         "passed in)")
    rb.add_argument("--dtype", default="bfloat16", metavar="bfloat16|float16|float32",
                    help="dtype of the saved weights (default bfloat16)")
    rb.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    rb.add_argument("--layers", type=int, default=None, metavar="N",
                    help="transformer depth instead of the preset's (scaled-down builds): SD3: N blocks; "
                         "FLUX.1: N double-stream and 2N single-stream blocks")
    rb.set_defaults(func=cmd_make_random_backbone)
