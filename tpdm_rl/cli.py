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
from .cli_config import check_prompt_files
from .cli_config import register as register_config
from .cli_eval import register
from .cli_make import register as register_make
from .cli_sweep import register as register_sweep
from .console import disk_full
from .threads import prepare_environment

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


def cmd_train(args: argparse.Namespace) -> int:
    from .config_io import check_config_keys, load_config

    cfg = load_config(args.config, args.set)  # config errors answer before any model library loads
    if args.allow_config_change and not args.resume:
        raise UsageError(f"--allow-config-change {' '.join(args.allow_config_change)} needs --resume (it accepts "
                         "changes against the checkpoint being resumed)")
    if args.fresh_optimizer and not args.resume:
        raise UsageError("--fresh-optimizer needs --resume (it accepts a checkpoint without optimizer.pt); a new "
                         "run always starts with a fresh optimizer")
    check_config_keys(args.allow_config_change, "--allow-config-change", cfg)
    check_prompt_files(cfg)  # bad prompts files (training and closing eval) answer before torch loads
    from .builders.tiny_backbone import run_backbone_path
    from .controller import Controller  # the Controller applies the thread policy (train.threads)
    from .summary import write_summary

    _quiet_libraries()
    output = Path(args.output or cfg.output)
    if args.output:
        cfg = cfg.model_copy(update={"output": str(output)})
    if args.address:
        cfg = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update={"enabled": True})})
    controller = Controller(cfg, output=output, resume=args.resume, address=args.address, overwrite=args.overwrite,
                            allow_config_change=args.allow_config_change, fresh_optimizer=args.fresh_optimizer,
                            backbone_path=lambda: run_backbone_path(cfg, output))  # built once the checks pass
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
    p = argparse.ArgumentParser(prog="tpdm-rl", description="RL for per-prompt diffusion schedules (TPDM on SD3, SD3.5 and "
                                "FLUX.1 backbones, and on a shipped toy world).")
    p.add_argument("--version", action="version", version=f"tpdm-rl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    register_make(sub)

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
USAGE_ERRORS = ("ConfigError", "DeviceError", "PresetError", "UsageError", "_SweepOptionError", "PromptError",
                "MethodError", "TableError", "_OptionError")
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
