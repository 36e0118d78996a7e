"""``tpdm-rl`` command line: every error is one line on stderr and a non-zero exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .cli_config import register as register_config
from .cli_eval import register
from .cli_sweep import register as register_sweep
from .console import disk_full
from .defaults import PRESETS
from .threads import apply_threads, prepare_environment

# Only the standard library, yaml and pydantic load at start: torch, diffusers, transformers, Ray and
# DeepSpeed are imported inside the commands that use them, so --help, --version, `config` and every
# error that needs no model answer in well under 2 s (and OMP_WAIT_POLICY is set before torch loads).

EXIT_USAGE = 2
EXIT_FAIL = 1


def _quiet_libraries() -> None:
    """Silence the model libraries' progress bars and warnings (called by the commands that load them)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    if not torch.cuda.is_available():  # skip DeepSpeed's accelerator probe (and its warning) on CPU machines
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*deterministic.*")
    for name in ("diffusers", "transformers", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


class UsageError(ValueError):
    """A combination of options that cannot work (one line, exit code 2)."""


class RunUnhealthy(RuntimeError):
    """A run finished but most of its updates were skipped."""


def cmd_make_tiny_backbone(args: argparse.Namespace) -> int:
    from tpdm_rl.rollout.tiny_backbone import make_tiny_backbone

    _quiet_libraries()
    out = make_tiny_backbone(args.dir, seed=args.seed, sample_size=args.size)
    print(f"tiny SD3 backbone written to {out} (seed {args.seed}, {args.size} px)")
    return 0


def cmd_make_random_backbone(args: argparse.Namespace) -> int:
    from tpdm_rl.rollout.random_backbone import make_random_backbone

    _quiet_libraries()
    t0 = time.perf_counter()
    out = make_random_backbone(args.dir, args.preset, no_t5=args.no_t5, dtype=args.dtype, seed=args.seed,
                               layers=args.layers, progress=lambda line: print(f"  {line}", flush=True))
    print(f"random {args.preset} backbone written to {out} in {time.perf_counter() - t0:.0f} s "
          f"(seed {args.seed}, {args.dtype}{', no T5' if args.no_t5 else ''}"
          f"{f', transformer depth {args.layers}' if args.layers else ''}; random weights: images are noise)")
    return 0


def cmd_make_toy_backbone(args: argparse.Namespace) -> int:
    out = Path(args.dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"make-toy-backbone: {str(out)!r} exists and is not an empty folder; choose a new one")
    threads = apply_threads(args.threads, "toy-trainer") if args.train else 0
    from tpdm_rl.rollout.toy_backbone import ToyTrainSettings, copy_toy_backbone, train_toy_backbone

    _quiet_libraries()
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

    from tpdm_rl.rewards.fixtures import make_all

    _quiet_libraries()
    opts = make_all(args.dir, seed=args.seed)
    print(f"tiny random reward models (real file formats) written to {args.dir}; use them as:")
    print(yaml.safe_dump({"rewards": {k: {"weight": 1.0, **v} for k, v in opts.items()}}, sort_keys=False))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.set)  # config errors answer before any model library loads
    if args.allow_config_change and not args.resume:
        raise UsageError(f"--allow-config-change {' '.join(args.allow_config_change)} needs --resume (it accepts "
                         "changes against the checkpoint being resumed)")
    from .prompts import load_prompts

    load_prompts(cfg.rollout.prompts, toy="shapes" in cfg.rewards)  # a bad prompts file answers before torch loads
    from .controller import (  # the Controller applies the thread policy (train.threads)
        Controller,
        write_summary,
    )

    _quiet_libraries()
    output = Path(args.output or cfg.output)
    if args.output:
        cfg = cfg.model_copy(update={"output": str(output)})
    if args.address:
        cfg = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update={"enabled": True})})
    controller = Controller(cfg, output=output, resume=args.resume, address=args.address, overwrite=args.overwrite,
                            allow_config_change=args.allow_config_change, fresh_optimizer=args.fresh_optimizer)
    if controller.folder.moved_to is not None:
        print(f"--overwrite: the previous run in {output} was moved to {controller.folder.moved_to}", file=sys.stderr)
    if controller.resumed_from is not None:
        print(f"resuming from {controller.resumed_from} (iteration {controller.start_iteration})", file=sys.stderr)
    records = controller.train()
    print(f"\nrun finished: {output} (metrics.jsonl, tb/, checkpoints/)")
    print(write_summary(output, cfg))
    if cfg.eval.enabled:
        closing_evaluation(cfg, output)
    skipped = sum(1 for r in records if r.get("health/nonfinite_reward") or r.get("health/skipped_steps"))
    if records and skipped * 2 > len(records):
        raise RunUnhealthy(f"{skipped} of {len(records)} updates were skipped (non-finite reward, loss or gradient; "
                           f"see health/* in {output / 'metrics.jsonl'}): the trained TPM is not usable")
    return 0


def closing_evaluation(cfg, output: Path) -> None:
    """``tpdm-rl eval`` of the final checkpoint on the configured held-out prompts, into ``<output>/eval``."""
    from .evaluation import evaluate, headline

    e = cfg.eval
    t0 = time.perf_counter()
    print(f"\nevaluating the final TPM on {e.prompts} ({e.methods}; rewards {e.rewards}) ...", flush=True)
    report = evaluate(output, output / "eval", prompts=e.prompts, methods=e.methods, rewards=e.rewards,
                      seeds=e.seeds, limit=e.limit or None, pareto_steps=e.pareto_steps, batch_size=e.batch_size,
                      progress=cfg.logging.progress, tables=e.tables or None,
                      overwrite=True)  # the run's own earlier eval (a resume)
    print(headline(report))
    print(f"evaluation: {report['num_images']} held-out images in {time.perf_counter() - t0:.0f} s; table "
          f"{output / 'eval' / 'results.md'}, images {output / 'eval' / 'grid.png'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpdm-rl", description="RL for per-prompt diffusion schedules (TPDM on SD3).")
    p.add_argument("--version", action="version", version=f"tpdm-rl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

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

    rb = sub.add_parser("make-random-backbone", help="write a real-size SD3 pipeline with random weights (no download)",
                        description="Writes a diffusers SD3 folder with the real configurations of the chosen "
                                    "checkpoint (transformer, CLIP-L, CLIP-G, T5-XXL, VAE) and random weights, for "
                                    "sizing machines and timing rollouts offline. Disk and memory are checked first.")
    rb.add_argument("dir", help="new (or empty) folder for the diffusers pipeline")
    rb.add_argument("--preset", required=True, metavar="|".join(PRESETS), help="which SD3 checkpoint to imitate")
    rb.add_argument("--no-t5", action="store_true", help="leave out the T5-XXL encoder (the pipeline feeds zeros)")
    rb.add_argument("--dtype", default="bfloat16", metavar="bfloat16|float16|float32",
                    help="dtype of the saved weights (default bfloat16)")
    rb.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    rb.add_argument("--layers", type=int, default=None, metavar="N",
                    help="transformer depth instead of the preset's (scaled-down builds)")
    rb.set_defaults(func=cmd_make_random_backbone)

    tr = sub.add_parser("train", help="train a TPM")
    tr.add_argument("--config", default=None, help="YAML config (default: built-in tiny defaults)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    tr.add_argument("--output", default=None, help="run directory (default: config 'output')")
    tr.add_argument("--resume", default=None, metavar="auto|PATH", help="resume from latest or a checkpoint dir")
    tr.add_argument("--address", default=None,
                    help="Ray cluster to join (implies distributed.enabled); default: RAY_ADDRESS or a local instance")
    tr.add_argument("--overwrite", action="store_true",
                    help="the output folder holds an earlier run: move it aside (to OUTPUT.replaced-TIME) and start over")
    tr.add_argument("--allow-config-change", nargs="+", default=[], metavar="KEY",
                    help="with --resume: accept these changed keys of the objective or trajectories (recorded in "
                         "history.jsonl)")
    tr.add_argument("--fresh-optimizer", action="store_true",
                    help="with --resume: accept a checkpoint without optimizer.pt (a fresh optimizer; the run then "
                         "differs from an uninterrupted one)")
    tr.set_defaults(func=cmd_train)

    register(sub)
    register_sweep(sub)
    register_config(sub)
    return p


#: exception classes (by name, so that catching them needs no heavy import) -> exit code
USAGE_ERRORS = ("ConfigError", "DeviceError", "PresetError", "UsageError")
FAIL_ERRORS = ("PromptFileError", "RewardError", "BackboneError", "CheckpointError", "FileNotFoundError",
               "FileExistsError", "RunFolderError", "RunUnhealthy", "RandomBackboneError", "ExportError",
               "EvalOutputError", "RayAddressError")


def _kind(exc: BaseException) -> str:
    names = {c.__name__ for c in type(exc).__mro__}
    if names & set(USAGE_ERRORS):
        return "usage"
    if names & set(FAIL_ERRORS):
        return "fail"
    if "FatalRoleError" in names:
        return "role"
    return ""


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    prepare_environment()  # OMP_WAIT_POLICY before torch loads (docs/threads.md)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tpdm-rl: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every known failure becomes one line; others propagate
        full = disk_full(exc)
        if full is not None:  # torch wraps ENOSPC in "unexpected pos ..." RuntimeErrors: name the real cause
            where = f" {full.filename!r}" if full.filename else ""
            print(f"tpdm-rl: error: No space left on device: cannot write{where}; free space and resume with "
                  "--resume auto (the last complete checkpoint is intact)", file=sys.stderr)
            return EXIT_FAIL
        kind = _kind(exc)
        if kind == "usage":
            msg = _first_line(exc)
            print(f"tpdm-rl: {msg}" if msg.startswith("config error") else f"tpdm-rl: error: {msg}", file=sys.stderr)
            return EXIT_USAGE
        if kind == "fail":
            print(f"tpdm-rl: error: {_first_line(exc)}", file=sys.stderr)
            return EXIT_FAIL
        if kind == "role":
            done = getattr(exc, "checkpointed", None)
            tail = f" (state of the last completed iteration checkpointed in {done})" if done else ""
            print(f"tpdm-rl: error: {_first_line(exc)}{tail}", file=sys.stderr)
            return EXIT_FAIL
        if isinstance(exc, OSError) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
            src, dst, why = (list(exc.args[0][0]) + ["", "", ""])[:3]  # shutil.Error: a list of (src, dst, why)
            print(f"tpdm-rl: error: cannot write {dst!r}: {str(why).splitlines()[0]} (and {len(exc.args[0]) - 1} "
                  "more)", file=sys.stderr)
            return EXIT_FAIL
        if isinstance(exc, OSError):  # read-only folder, ...: files written so far stay consistent
            where = f" {exc.filename!r}" if exc.filename else ""
            print(f"tpdm-rl: error: cannot write{where}: {exc.strerror or _first_line(exc)}", file=sys.stderr)
            return EXIT_FAIL
        raise


if __name__ == "__main__":
    sys.exit(main())
