"""``tpdm-rl sweep`` / ``sweep-report``: reward-weight and step-penalty sweeps on Ray Tune.

``register(subparsers)`` adds both subcommands to the main parser (``tpdm_rl/cli.py``). A bad
``--grid`` / ``--random`` key or value is a ConfigError naming it (one line, exit code 2, raised
before any trial starts); ``cli.main`` maps it.
"""

from __future__ import annotations

import argparse
import sys

from tpdm_rl.commands.quiet import quiet_libraries

EXIT_FAIL = 1


def _print_summary(report: dict, budget: float | None) -> None:
    from tpdm_rl.sweep import budget_line, report_table

    print()
    print(report_table(report))
    print(f"\nreport: {report['output']}/sweep.md, sweep.json, sweep_pareto.png")
    if budget is not None:
        print(budget_line(report, budget))


class _SweepOptionError(ValueError):
    """A bad sweep option (one line, exit code 2), found before any trial runs."""


def _check_options(args: argparse.Namespace) -> None:
    if args.budget is not None and not args.budget > 0:
        raise _SweepOptionError(f"--budget {args.budget:g}: expected a mean number of steps > 0")
    if args.samples < 1:
        raise _SweepOptionError(f"--samples must be >= 1, got {args.samples}")


def cmd_sweep(args: argparse.Namespace) -> int:
    _check_options(args)  # before Ray, the trials and the report
    from tpdm_rl.sweep import plan_sweep

    # every trial config (--set, --grid, --random values included) is validated before torch or Ray loads
    plan_sweep(args.output, args.config, args.set, args.grid, args.random, args.samples, args.log)
    from tpdm_rl.sweep import run_sweep

    quiet_libraries()
    report = run_sweep(args.output, args.config, args.set, args.grid, args.random, samples=args.samples,
                       log=args.log, max_concurrent=args.max_concurrent, resume=args.resume, address=args.address,
                       early_stop=args.early_stop, early_stop_metric=args.early_stop_metric,
                       controller_cpus=args.controller_cpus, budget=args.budget,
                       echo=lambda msg: print(msg, flush=True))
    _print_summary(report, args.budget)
    failed = [r for r in report["trials"] if r["status"] in ("error", "incomplete", "pending")]
    if failed:
        what = "; ".join(f"{r['name']} ({r['status']}{': ' + r['error'] if r.get('error') else ''})"
                         for r in failed)
        print(f"tpdm-rl: error: {len(failed)} of {len(report['trials'])} trials did not finish: {what} "
              "(rerun with --resume to continue them)", file=sys.stderr)
        return EXIT_FAIL
    return 0


def cmd_sweep_report(args: argparse.Namespace) -> int:
    if args.budget is not None and not args.budget > 0:
        raise _SweepOptionError(f"--budget {args.budget:g}: expected a mean number of steps > 0")
    from tpdm_rl.sweep import collect_report, write_report

    report = collect_report(args.dir)
    write_report(args.dir, report, args.budget)
    _print_summary(report, args.budget)
    return 0


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "sweep", help="sweep reward weights / step penalty / any config key on Ray Tune",
        description="Each trial is a normal training run (config + --set + its own overrides) in "
                    "DIR/trials/<name>/; every trial config is validated before any trial starts.")
    s.add_argument("--config", default=None, help="YAML config (default: built-in tiny defaults)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every trial")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="grid axis (repeatable; trials are the cartesian product)")
    s.add_argument("--random", action="append", default=[], metavar="KEY=LOW:HIGH",
                   help="random axis, uniform in [LOW, HIGH] (integers when both bounds are integers), "
                        "seeded by the config seed; repeatable")
    s.add_argument("--samples", type=int, default=1, help="random draws (each combined with every grid point)")
    s.add_argument("--log", action="store_true", help="draw --random axes log-uniformly (LOW > 0)")
    s.add_argument("--output", required=True, help="sweep directory (everything is written inside it)")
    s.add_argument("--max-concurrent", type=int, default=0, metavar="K",
                   help="trials running at once (default 0: as many as the cluster's resources allow)")
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep: trials with a DONE marker are skipped, the others "
                        "resume from their own checkpoints")
    s.add_argument("--address", default=None,
                   help="Ray cluster to run on (default: RAY_ADDRESS, else a local instance sized to this machine)")
    s.add_argument("--early-stop", choices=("none", "asha", "median"), default="none",
                   help="stop weak trials early (ASHA or median stopping); off by default")
    s.add_argument("--early-stop-metric", choices=("reward/total", "quality"), default="reward/total",
                   help="metric the early-stopping scheduler maximises (reward/total is only comparable "
                        "between trials that share weights and step penalty)")
    s.add_argument("--controller-cpus", type=float, default=1.0,
                   help="CPUs of each trial's controller bundle (the Tune trainable process)")
    s.add_argument("--budget", type=float, default=None, metavar="STEPS",
                   help="print the highest-quality finished trial whose mean steps are <= STEPS")
    s.set_defaults(func=cmd_sweep)

    r = subparsers.add_parser("sweep-report", help="rebuild sweep.json / sweep.md / sweep_pareto.png of a sweep")
    r.add_argument("dir", help="a sweep output folder")
    r.add_argument("--budget", type=float, default=None, metavar="STEPS",
                   help="print the highest-quality finished trial whose mean steps are <= STEPS")
    r.set_defaults(func=cmd_sweep_report)
