"""``tpdm-rl eval`` / ``sample`` / ``export``: evaluation, one-off sampling and TPM export.

``register(subparsers)`` adds the three subcommands to the main parser (``tpdm_rl/cli.py``). Errors
are one line on stderr with a non-zero exit code: the library raises CheckpointError, BackboneError,
RewardError, PromptFileError or FileNotFoundError (mapped by ``cli.main``); a bad ``--methods``
entry or a bad numeric option is reported here with exit code 2.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from tpdm_rl.commands.quiet import quiet_libraries
from tpdm_rl.core.defaults import DEFAULT_METHODS, DEFAULT_PARETO_STEPS, MAX_SIZE, MIN_SIZE
from tpdm_rl.core.eval_output import check_output
from tpdm_rl.core.methods import parse_method, parse_methods
from tpdm_rl.core.prompts import load_prompts
from tpdm_rl.core.reward_registry import reward_info
from tpdm_rl.core.tables import load_family
from tpdm_rl.core.threads import apply_threads
from tpdm_rl.rollout.toy import SHIPPED_TOY_BACKBONES, check_toy_prompts

# torch and the model libraries are imported inside the commands (after the thread policy is applied),
# so the parser and every option error stay fast.

EXIT_USAGE = 2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _usage_errors(func):
    """Report MethodError / bad option values as one line with exit code 2 (no traceback)."""
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except Exception as exc:
            if not {c.__name__ for c in type(exc).__mro__} & {"MethodError", "TableError", "_OptionError"}:
                raise
            print(f"tpdm-rl: error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return EXIT_USAGE

    return wrapped


class _OptionError(ValueError):
    pass


def _int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise _OptionError(f"{flag} {text!r}: expected comma-separated integers, e.g. 4,6,8,12,16,20,28") from None
    if not vals or any(v < 1 for v in vals):
        raise _OptionError(f"{flag} {text!r}: expected integers >= 1")
    return vals


def _check_threads(threads: int) -> None:
    if threads < 0:
        raise _OptionError(f"--threads must be >= 0 (0: the CPUs idle at start), got {threads}")


def _may_have_cuda() -> bool:
    """False only when this machine surely has no NVIDIA GPU (no device node, no nvidia-smi): answered without
    torch; torch's own count decides otherwise."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg") or shutil.which("nvidia-smi"))


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _check_common(args: argparse.Namespace) -> None:
    """Checks every command that loads a TPM shares, made before torch loads (each answers in well under 1 s)."""
    _check_threads(args.threads)
    if not _DEVICE.match(args.device):
        raise _OptionError(f"--device {args.device!r} is not a torch device; expected auto, cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not _may_have_cuda():
        raise _OptionError(f"--device {args.device!r} requested but this machine has no CUDA device; use auto or cpu")
    if args.backbone and args.backbone.startswith("builtin:") and args.backbone not in SHIPPED_TOY_BACKBONES:
        raise _OptionError(f"--backbone {args.backbone!r} is not a shipped backbone; expected one of "
                           f"{', '.join(SHIPPED_TOY_BACKBONES)}, a local diffusers folder or a hub id")


def _check_checkpoint(args: argparse.Namespace) -> None:
    """A missing checkpoint: one line before torch loads (after the option values, which exit with 2)."""
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"TPM checkpoint {args.checkpoint!r} does not exist; expected a run folder, a "
                                "checkpoint or export folder, or a tpm.safetensors file")


def _recorded_backbone(checkpoint: str) -> str | None:
    """The backbone a TPM file names (its ``inference`` metadata), read from the safetensors header without
    torch; None when it cannot be read here (the full load reports why)."""
    p = Path(checkpoint)
    if p.is_dir():
        for cand in (p / "tpm.safetensors", p / "latest", p / "checkpoints" / "latest"):
            if cand.name == "latest" and cand.is_file():
                cand = cand.parent / cand.read_text().strip() / "tpm.safetensors"
            if cand.is_file():
                p = cand
                break
    try:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                return None
            meta = json.loads(f.read(n)).get("__metadata__") or {}
        return json.loads(meta.get("inference", "{}")).get("backbone_path") or None
    except (OSError, ValueError, AttributeError):
        return None


def _check_toy_prompts_early(args: argparse.Namespace, prompts: list[str]) -> None:
    """On a toy backbone (``--backbone`` or the one the TPM names) prompts outside its grammar fail before torch."""
    backbone = args.backbone or _recorded_backbone(args.checkpoint)
    if backbone:
        check_toy_prompts(backbone, prompts)


@_usage_errors
def cmd_eval(args: argparse.Namespace) -> int:
    pareto = _int_list(args.pareto_steps, "--pareto-steps")
    for flag, v in (("--seeds", args.seeds), ("--batch-size", args.batch_size),
                    ("--timing-repeats", args.timing_repeats)):
        if v < 1:
            raise _OptionError(f"{flag} must be >= 1, got {v}")
    if args.limit is not None and args.limit < 1:
        raise _OptionError(f"--limit must be >= 1, got {args.limit}")
    if args.grid_prompts < 1:
        raise _OptionError(f"--grid-prompts must be >= 1 (rows of grid.png), got {args.grid_prompts}")
    _check_common(args)
    parse_methods(args.methods)  # every value is checked before torch loads
    if args.tables:
        load_family(args.tables)
    names = [r.strip() for r in args.rewards.split(",") if r.strip()]
    if not names:
        raise _OptionError(f"--rewards {args.rewards!r}: expected comma-separated reward names, e.g. fidelity,shapes")
    for name in names:
        try:
            reward_info(name)
        except ValueError as exc:
            raise _OptionError(f"--rewards {name}: {exc}") from None
    prompts = load_prompts(args.prompts, toy="shapes" in names)
    _check_checkpoint(args)
    _check_toy_prompts_early(args, prompts[:args.limit] if args.limit else prompts)
    check_output(Path(args.output), args.overwrite)  # before torch loads
    apply_threads(args.threads, "eval")
    from tpdm_rl.core.devices import check_device
    from tpdm_rl.evaluation import evaluate

    check_device("--device", args.device)  # no accelerator: one line before the checkpoint loads

    quiet_libraries()
    t0 = time.perf_counter()
    report = evaluate(args.checkpoint, args.output, prompts=args.prompts, methods=args.methods, rewards=args.rewards,
                      seeds=args.seeds, backbone=args.backbone, limit=args.limit, pareto_steps=pareto,
                      batch_size=args.batch_size, device=args.device, grid_prompts=args.grid_prompts,
                      progress=not args.no_progress, timing_repeats=args.timing_repeats,
                      inference=args.tpm_inference, overwrite=args.overwrite, tables=args.tables)

    print((Path(args.output) / "results.md").read_text())
    print(f"evaluated {report['num_images']} images x {len(report['methods'])} methods in "
          f"{time.perf_counter() - t0:.1f} s; wrote {args.output}/results.json, results.md, schedules.png, "
          "nfe_hist.png, pareto.png, grid.png")
    return 0


@_usage_errors
def cmd_sample(args: argparse.Namespace) -> int:
    if args.adaptive is not None and args.adaptive < 0:
        raise _OptionError(f"--adaptive must be >= 0, got {args.adaptive}")
    if args.size is not None and not MIN_SIZE <= args.size <= MAX_SIZE:
        raise _OptionError(f"--size {args.size}: expected an image size from {MIN_SIZE} to {MAX_SIZE} pixels")
    suffix = Path(args.output).suffix.lower()
    if suffix not in IMAGE_SUFFIXES:  # checked before anything is sampled
        raise _OptionError(f"--output {args.output!r}: unsupported image extension {suffix or '(none)'!r}; expected "
                           f"one of {', '.join(IMAGE_SUFFIXES)}")
    _check_common(args)
    method = parse_method(args.method)  # before torch loads
    if method.kind == "tpm-mean":
        raise _OptionError("--method tpm-mean needs many prompts (use tpdm-rl eval); expected tpm, fixed:N, "
                           "sigmas:..., adaptive:... or tpm+adaptive:...")
    if args.adaptive is not None and method.kind != "tpm":
        raise _OptionError(f"--adaptive adds skipping to --method tpm only, got --method {args.method!r}")
    _check_checkpoint(args)
    _check_toy_prompts_early(args, [args.prompt])  # a toy backbone: its grammar is checked before anything loads
    apply_threads(args.threads, "sample")
    from tpdm_rl.core.devices import check_device
    from tpdm_rl.rollout.pipeline import TPDMPipeline

    check_device("--device", args.device)


    quiet_libraries()
    pipe = TPDMPipeline.from_pretrained(args.backbone, tpm=args.checkpoint, device=args.device,
                                        inference=args.tpm_inference)
    res = args.size or pipe.resolution
    out = pipe(args.prompt, seed=args.seed, height=res, width=res, adaptive_threshold=args.adaptive,
               method=None if method.kind == "tpm" else method)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    out.pil()[0].save(args.output)
    sig = out.sigmas[0]
    print(f"steps: {int(out.steps[0])} (transformer calls: {int(out.nfe[0])})")
    print("sigmas: " + " ".join(f"{float(s):.4f}" for s in sig))
    print(f"wrote {args.output} ({res}x{res}, seed {out.seeds[0]})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    apply_threads(None, "export")
    from tpdm_rl.evaluation import export_tpm

    out = export_tpm(args.checkpoint, args.output, eval_dir=args.eval, overwrite=args.overwrite)
    print(f"exported TPM to {out} (tpm.safetensors, tpdm_config.json, README.md)")
    return 0


def register(subparsers) -> None:
    """Add ``eval``, ``sample`` and ``export`` to the ``tpdm-rl`` subcommands."""
    ck = "checkpoint folder, export folder, run folder or tpm.safetensors file"
    e = subparsers.add_parser("eval", help="compare the TPM with fixed schedules and AdaptiveDiffusion")
    e.add_argument("--checkpoint", required=True, help=ck)
    e.add_argument("--prompts", default="builtin:eval", help=".txt/.jsonl file or builtin:eval (default)")
    e.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated: fixed:N, sigmas:S0,S1,...,0 (an explicit table), "
                        "adaptive:THRESHOLD[:MAX_SKIP], tpm, tpm-mean[:N] (the TPM's own mean schedule as one "
                        "fixed table, at the TPM's mean NFE or N steps), "
                        "tpm+adaptive:THRESHOLD[:MAX_SKIP], and adaptive-legacy / tpm+adaptive-legacy (the "
                        f"earlier skip rule) (default {DEFAULT_METHODS}); fixed:28 is always run as the reference")
    e.add_argument("--rewards", default="fidelity",
                   help="comma-separated reward names (options from the checkpoint's config.yaml); fidelity "
                        "(PSNR vs fixed:28) is always reported")
    e.add_argument("--output", required=True, help="folder for results.json/.md and the figures")
    e.add_argument("--seeds", type=int, default=1, help="images per prompt (noise seed per (prompt, k))")
    e.add_argument("--backbone", default=None, help="backbone path (default: the TPM's backbone_path)")
    e.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    e.add_argument("--pareto-steps", default=",".join(map(str, DEFAULT_PARETO_STEPS)),
                   help="fixed:N step counts drawn as the curve in pareto.png")
    e.add_argument("--batch-size", type=int, default=16, help="concurrent images per backbone call")
    e.add_argument("--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda:N")
    e.add_argument("--grid-prompts", type=int, default=4, help="rows of grid.png (>= 1)")
    e.add_argument("--timing-repeats", type=int, default=1,
                   help="sample each method R times and report the fastest wall clock (damps machine noise)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--threads", type=int, default=0,
                   help="torch threads (default 0: the CPUs idle at start; docs/threads.md)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --output")
    e.add_argument("--tpm-inference", choices=["mode", "mean", "sample"], default=None,
                   help="how the TPM picks its ratio (default: the TPM file's policy.inference)")
    e.add_argument("--tables", default=None, metavar="FAMILY",
                   help="also run a family of hand-made sigma tables (one per NFE) and compare the TPM with it at "
                        "equal NFE: builtin:toy (chosen on training-split toy prompts), shift:S, or a .json file")
    e.set_defaults(func=cmd_eval)

    s = subparsers.add_parser("sample", help="generate one image with a trained TPM")
    s.add_argument("--checkpoint", required=True, help=ck)
    s.add_argument("--prompt", required=True, help="the text prompt")
    s.add_argument("--output", required=True, help="image file (.png, .jpg, .webp, ...)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (as diffusers' Generator().manual_seed)")
    s.add_argument("--backbone", default=None, help="backbone path (default: the TPM's backbone_path)")
    s.add_argument("--size", type=int, default=None,
                   help="image size in pixels, 16 to 4096 (default: the trained resolution)")
    s.add_argument("--method", default="tpm", help="tpm (default), or a baseline: sigmas:S0,...,0 (an explicit "
                   "table), fixed:N, adaptive:THRESHOLD")
    s.add_argument("--adaptive", type=float, default=None, metavar="THRESHOLD",
                   help="also skip transformer calls with AdaptiveDiffusion (tpm+adaptive)")
    s.add_argument("--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda:N")
    s.add_argument("--tpm-inference", choices=["mode", "mean", "sample"], default=None,
                   help="how the TPM picks its ratio (default: the TPM file's policy.inference)")
    s.add_argument("--threads", type=int, default=0,
                   help="torch threads (default 0: the CPUs idle at start; docs/threads.md)")
    s.set_defaults(func=cmd_sample)

    x = subparsers.add_parser("export", help="export a TPM for inference (weights, config, model card)")
    x.add_argument("--checkpoint", required=True, help=ck)
    x.add_argument("--output", required=True, help="export folder")
    x.add_argument("--eval", default=None, metavar="DIR", help="tpdm-rl eval output to include in the model card")
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output")
    x.set_defaults(func=cmd_export)
