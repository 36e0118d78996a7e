"""``tpdm-rl train``: load and check the config, run the controller, then the closing evaluation."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tpdm_rl.commands.config import check_prompt_files
from tpdm_rl.commands.quiet import quiet_libraries


class UsageError(ValueError):
    """A combination of options that cannot work (one line, exit code 2)."""


class RunUnhealthy(RuntimeError):
    """A run finished but most of its updates were skipped."""


def cmd_train(args: argparse.Namespace) -> int:
    from tpdm_rl.core.config_io import check_config_keys, load_config

    cfg = load_config(args.config, args.set)  # config errors answer before any model library loads
    if args.allow_config_change and not args.resume:
        raise UsageError(f"--allow-config-change {' '.join(args.allow_config_change)} needs --resume (it accepts "
                         "changes against the checkpoint being resumed)")
    if args.fresh_optimizer and not args.resume:
        raise UsageError("--fresh-optimizer needs --resume (it accepts a checkpoint without optimizer.pt); a new "
                         "run always starts with a fresh optimizer")
    check_config_keys(args.allow_config_change, "--allow-config-change", cfg)
    check_prompt_files(cfg)  # bad prompts files (training and closing eval) answer before torch loads
    from tpdm_rl.builders.tiny_backbone import run_backbone_path
    from tpdm_rl.training.controller import (
        Controller,  # the Controller applies the thread policy (train.threads)
    )
    from tpdm_rl.training.summary import write_summary

    quiet_libraries()
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
    from tpdm_rl.evaluation import evaluate, headline

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


def register(sub) -> None:
    """The ``train`` subcommand."""
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
