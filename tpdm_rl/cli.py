"""``tpdm-rl`` command line: every error is one line on stderr and a non-zero exit code."""

from __future__ import annotations

import argparse
import sys

from tpdm_rl import __version__
from tpdm_rl.commands.config import register as register_config
from tpdm_rl.commands.evaluate import register
from tpdm_rl.commands.make import register as register_make
from tpdm_rl.commands.sweep import register as register_sweep
from tpdm_rl.commands.train import register as register_train
from tpdm_rl.core.console import disk_full
from tpdm_rl.core.threads import prepare_environment

# Only the standard library, yaml and pydantic load at start: torch, diffusers, transformers, Ray and
# DeepSpeed are imported inside the commands that use them, so --help, --version, `config` and every
# error that needs no model answer in well under 2 s (and OMP_WAIT_POLICY is set before torch loads).

EXIT_USAGE = 2
EXIT_FAIL = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpdm-rl", description="RL for per-prompt diffusion schedules (TPDM on SD3, SD3.5 and "
                                "FLUX.1 backbones, and on a shipped toy world).")
    p.add_argument("--version", action="version", version=f"tpdm-rl {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    register_make(sub)

    register_train(sub)

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
