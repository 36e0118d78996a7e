"""Evaluation of a trained TPM against fixed schedules and AdaptiveDiffusion, and TPM export.

Every method samples the same prompts from the same initial noises (one seed per (prompt, k),
``noise_seed``); the backbone's default 28-step schedule (``fixed:28``) is always run and is the
reference for PSNR/SSIM. ``evaluate`` writes ``results.json``, ``results.md``, ``schedules.png``,
``nfe_hist.png``, ``pareto.png`` and ``grid.png`` into the output folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rollout.baselines import Method, SampleOutput, parse_method, parse_methods
from rollout.rng import derive_key

REFERENCE = Method("fixed", steps=28)
DEFAULT_METHODS = "tpm,fixed:28,fixed:14,adaptive:0.01"
DEFAULT_PARETO_STEPS = (4, 6, 8, 12, 16, 20, 28)
EVAL_SEED = 0xE7A1


def noise_seed(prompt_index: int, k: int) -> int:
    """The initial-noise seed of the k-th image of prompt ``prompt_index`` (same for every method).

    ``tpdm-rl sample --seed`` with this value reproduces the image (it is recorded in results.json).
    """
    return derive_key(EVAL_SEED, prompt_index, k) & 0x7FFFFFFFFFFFFFFF


# ---------------------------------------------------------------------------- small helpers
def mean_se(x: torch.Tensor) -> dict[str, float]:
    """Mean and standard error of the mean (sample std / sqrt(n))."""
    x = x.double().reshape(-1)
    n = x.numel()
    se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": float(x.mean()) if n else float("nan"), "se": se}


def ssim_per_image(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """SSIM of each image against its reference (torchmetrics, data range 1)."""
    from torchmetrics.functional import structural_similarity_index_measure as ssim

    k = 11 if min(images.shape[-2:]) >= 11 else (min(images.shape[-2:]) // 2) * 2 - 1
    return ssim(images.float(), references.float(), data_range=1.0, reduction="none", kernel_size=k).reshape(-1)


def reward_options_for(tpm_file: Path) -> dict[str, dict]:
    """Reward options from the training config next to the TPM (checkpoint config.yaml or export json)."""
    import yaml

    cfg = None
    if (tpm_file.parent / "config.yaml").is_file():
        try:
            cfg = yaml.safe_load((tpm_file.parent / "config.yaml").read_text())
        except yaml.YAMLError:
            cfg = None
    elif (tpm_file.parent / "tpdm_config.json").is_file():
        try:
            cfg = json.loads((tpm_file.parent / "tpdm_config.json").read_text()).get("training_config")
        except json.JSONDecodeError:
            cfg = None
    rewards = (cfg or {}).get("rewards") or {}
    out = {}
    for name, spec in rewards.items():
        spec = dict(spec or {})
        for k in ("weight", "normalize", "num_workers", "num_cpus", "num_gpus"):
            spec.pop(k, None)
        out[name] = spec
    return out


def build_eval_rewards(names: list[str], options: dict[str, dict]) -> dict:
    """Reward models by name (options from the training config when it has that reward); fidelity always."""
    from rewards import RewardError, build_reward

    models = {}
    for name in list(dict.fromkeys(["fidelity", *names])):
        try:
            models[name] = build_reward(name, **options.get(name, {}))
        except RewardError as exc:
            raise RewardError(f"--rewards {name}: {exc}") from None
    return models


@dataclass
class MethodResult:
    method: str
    nfe: torch.Tensor
    steps: torch.Tensor
    seconds: float
    cpu_seconds: float
    psnr: torch.Tensor
    ssim: torch.Tensor
    rewards: dict[str, torch.Tensor]
    sigmas: list[torch.Tensor]
    called: list[torch.Tensor]
    grid_images: torch.Tensor  # the few images shown in grid.png
    is_reference: bool = False
    extra: dict = field(default_factory=dict)

    def row(self, ref: MethodResult, n_images: int) -> dict:
        s_img = self.seconds / max(n_images, 1)
        ref_s = ref.seconds / max(n_images, 1)
        nfe = self.nfe.double()
        return {
            "method": self.method, "is_reference": self.is_reference,
            "nfe": {"mean": float(nfe.mean()), "min": int(self.nfe.min()), "max": int(self.nfe.max()),
                    "std": float(nfe.std()) if nfe.numel() > 1 else 0.0,
                    "distinct": len(set(self.nfe.tolist()))},
            "steps": {"mean": float(self.steps.double().mean()), "min": int(self.steps.min()),
                      "max": int(self.steps.max())},
            "psnr": mean_se(self.psnr), "ssim": mean_se(self.ssim),
            "rewards": {k: mean_se(v) for k, v in self.rewards.items()},
            "seconds": self.seconds, "seconds_per_image": s_img,
            "cpu_seconds_per_image": self.cpu_seconds / max(n_images, 1),
            "speedup_time": ref_s / s_img if s_img > 0 else float("nan"),
            "speedup_nfe": float(ref.nfe.double().mean() / nfe.mean()),
        }


# ---------------------------------------------------------------------------- evaluation
def evaluate(checkpoint: str | os.PathLike, output: str | os.PathLike, prompts: str = "builtin:eval",
             methods: str | list[str] = DEFAULT_METHODS, rewards: str | list[str] = "fidelity", seeds: int = 1,
             backbone: str | None = None, limit: int | None = None,
             pareto_steps: list[int] | tuple[int, ...] = DEFAULT_PARETO_STEPS, batch_size: int = 16,
             device: str = "auto", grid_prompts: int = 4, schedule_prompts: int = 8, progress: bool = True,
             timing_repeats: int = 1) -> dict:
    """Run every method on the same prompts and noises, score, and write the report files.

    ``timing_repeats`` > 1 times every method that many times, in round-robin passes over all
    methods, and reports the fastest wall clock (the outputs are deterministic; this only damps noise
    from other processes sharing the machine).
    """
    from tqdm.auto import tqdm

    from rewards.fidelity import psnr
    from rollout.pipeline import TPDMPipeline, locate_tpm

    from .prompts import load_prompts

    table = parse_methods(methods)
    pareto = sorted({int(n) for n in pareto_steps})
    for n in pareto:
        parse_method(f"fixed:{n}")
    reward_names = [r.strip() for r in (rewards.split(",") if isinstance(rewards, str) else rewards) if r.strip()]
    if int(seeds) < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    prompt_list = load_prompts(prompts)
    if limit:
        prompt_list = prompt_list[:int(limit)]
    tpm_file = locate_tpm(checkpoint)
    reward_models = build_eval_rewards(reward_names, reward_options_for(tpm_file))
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)

    pipe = TPDMPipeline.from_pretrained(backbone, tpm=tpm_file, device=device, batch_size=batch_size)
    sampler = pipe.sampler()
    bb = pipe.backbone
    items = [(i, k) for i in range(len(prompt_list)) for k in range(int(seeds))]
    all_prompts = [prompt_list[i] for i, _ in items]
    all_seeds = [noise_seed(i, k) for i, k in items]
    n_img = len(items)
    grid_idx = [j for j, (i, k) in enumerate(items) if k == 0][:max(int(grid_prompts), 0)]

    runs: list[Method] = [REFERENCE] + [m for m in table if m != REFERENCE]
    runs += [m for m in (Method("fixed", steps=n) for n in pareto) if m not in runs]
    # untimed: encode every prompt once (cached) and warm every code path up on one image
    bb.encode_prompts(sorted(set(all_prompts)) + [bb.negative_prompt])
    for m in {m.kind: m for m in runs}.values():
        sampler.run(Method("fixed", steps=2) if m.kind == "fixed" else m, all_prompts[:1], all_seeds[:1])
    repeats = max(int(timing_repeats), 1)
    bar = tqdm(total=len(runs) * n_img * repeats, desc="eval", unit="img", disable=not progress, dynamic_ncols=True)
    results: dict[str, MethodResult] = {}
    ref_images = None
    try:
        for m in runs:
            bar.set_postfix_str(m.name)
            out: SampleOutput = sampler.run(m, all_prompts, all_seeds, progress=bar.update)
            if ref_images is None:
                ref_images = out.images
            scores = {}
            for name, model in reward_models.items():
                scores[name] = model.score(out.images, all_prompts, ref_images if model.needs_reference else None)
            results[m.name] = MethodResult(
                method=m.name, nfe=out.nfe, steps=out.steps, seconds=out.seconds, cpu_seconds=out.cpu_seconds,
                psnr=psnr(out.images, ref_images),
                ssim=ssim_per_image(out.images, ref_images), rewards=scores, sigmas=out.sigmas, called=out.called,
                grid_images=out.images[grid_idx].clone(), is_reference=m == REFERENCE)
            del out
        for _ in range(repeats - 1):  # round-robin re-timing: a burst of load hits one pass, not one method
            for m in runs:
                bar.set_postfix_str(f"{m.name} (timing)")
                again = sampler.run(m, all_prompts, all_seeds, progress=bar.update)
                r = results[m.name]
                r.seconds, r.cpu_seconds = min(r.seconds, again.seconds), min(r.cpu_seconds, again.cpu_seconds)
    finally:
        bar.close()

    ref = results[REFERENCE.name]
    shown = [m.name for m in table]
    if REFERENCE.name not in shown:
        shown.append(REFERENCE.name)
    rows = [results[name].row(ref, n_img) for name in shown]
    curve = [results[f"fixed:{n}"].row(ref, n_img) for n in pareto]
    per_image = []
    for j, (i, k) in enumerate(items):
        rec = {"prompt_index": i, "k": k, "prompt": prompt_list[i], "seed": all_seeds[j],
               "nfe": {name: int(results[name].nfe[j]) for name in shown},
               "psnr": {name: round(float(results[name].psnr[j]), 4) for name in shown},
               "ssim": {name: round(float(results[name].ssim[j]), 5) for name in shown}}
        sch = {name: [round(float(s), 5) for s in results[name].sigmas[j]] for name in shown
               if parse_method(name).uses_tpm}
        if sch:
            rec["sigmas"] = sch
        per_image.append(rec)
    report = {
        "checkpoint": str(checkpoint), "tpm_file": str(tpm_file), "backbone": bb.path, "device": str(bb.device),
        "prompts": str(prompts), "num_prompts": len(prompt_list), "seeds_per_prompt": int(seeds),
        "num_images": n_img, "resolution": sampler.height, "guidance_scale": bb.guidance_scale,
        "reference": REFERENCE.name, "rewards": list(reward_models), "tpm_settings": pipe.settings,
        "timing_repeats": repeats,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "methods": rows, "pareto": curve, "per_image": per_image,
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "results.md").write_text(results_markdown(report))
    plot_schedules(out_dir / "schedules.png", results, shown, items, prompt_list, schedule_prompts)
    plot_nfe_hist(out_dir / "nfe_hist.png", results, shown)
    plot_pareto(out_dir / "pareto.png", report, shown)
    plot_grid(out_dir / "grid.png", results, shown, [prompt_list[items[j][0]] for j in grid_idx], grid_idx)
    return report


# ---------------------------------------------------------------------------- report
def _fmt(ms: dict, digits: int = 2) -> str:
    return f"{ms['mean']:.{digits}f} ± {ms['se']:.2g}"


def results_markdown(report: dict) -> str:
    """The human-readable table of ``results.json``."""
    extra = [r for r in report["rewards"] if r != "fidelity"]
    ref = report["reference"]
    head = ["method", "NFE mean [min-max]", f"PSNR vs {ref} (dB)", f"SSIM vs {ref}"] + extra + [
        "s / image", "CPU s / image", "speed-up (time)", "speed-up (NFE)"]
    lines = [
        "# TPDM evaluation",
        "",
        f"{report['num_images']} images ({report['num_prompts']} prompts from `{report['prompts']}` x "
        f"{report['seeds_per_prompt']} seed(s)), {report['resolution']} px, CFG {report['guidance_scale']}, "
        f"device {report['device']}; TPM `{report['tpm_file']}`, backbone `{report['backbone']}`.",
        f"Every method starts from the same initial noise per image; PSNR/SSIM are against the `{ref}` image of the "
        "same noise (PSNR = the `fidelity` reward). Values are mean ± standard error. NFE = transformer calls "
        "per image (CFG counted once); speed-ups are relative to the reference. s / image is wall clock of sampling "
        f"+ decoding (fastest of {report.get('timing_repeats', 1)} round-robin pass(es)); CPU s / image is this "
        "process's CPU time over the same span (all threads; less sensitive to other load on the machine).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in report["methods"]:
        nfe = f"{r['nfe']['mean']:.2f} [{r['nfe']['min']}-{r['nfe']['max']}]"
        if r["is_reference"]:
            cells = [f"{r['method']} (reference)", nfe, "ref", "ref"]
        else:
            cells = [r["method"], nfe, _fmt(r["psnr"]), _fmt(r["ssim"], 4)]
        cells += [_fmt(r["rewards"][e], 4) for e in extra]
        cells += [f"{r['seconds_per_image']:.4f}", f"{r['cpu_seconds_per_image']:.4f}", f"{r['speedup_time']:.2f}x",
                  f"{r['speedup_nfe']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Fixed-step curve (pareto.png)", "",
              "| steps | " + " | ".join(["PSNR (dB)", "SSIM"] + extra + ["s / image"]) + " |",
              "|" + "|".join("---" for _ in range(4 + len(extra))) + "|"]
    for r in report["pareto"]:
        ps = "ref" if r["is_reference"] else f"{r['psnr']['mean']:.2f}"
        cells = [str(r["nfe"]["min"]), ps, f"{r['ssim']['mean']:.4f}"]
        cells += [f"{r['rewards'][e]['mean']:.4f}" for e in extra] + [f"{r['seconds_per_image']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for r in report["methods"]:
        if parse_method(r["method"]).skips or parse_method(r["method"]).uses_tpm:
            notes.append(f"- `{r['method']}`: {r['nfe']['distinct']} distinct NFE values over the images "
                         f"({r['nfe']['min']}..{r['nfe']['max']}, std {r['nfe']['std']:.2f}); steps "
                         f"{r['steps']['min']}..{r['steps']['max']}.")
    if notes:
        lines += ["", "## Per-image variation", ""] + notes
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _short(text: str, n: int = 38) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def plot_schedules(path: Path, results: dict[str, MethodResult], shown: list[str], items, prompts, n_show: int
                   ) -> None:
    """sigma vs step for a sample of prompts (TPM vs fixed), plus each skipping method's call pattern."""
    plt = _plt()
    adaptive = [m for m in shown if parse_method(m).skips][:2]
    fig, axes = plt.subplots(1, 1 + len(adaptive), figsize=(7 + 5.5 * len(adaptive), 4.8), squeeze=False)
    ax = axes[0, 0]
    picks = [j for j, (i, k) in enumerate(items) if k == 0][:n_show]
    cmap = plt.get_cmap("tab10")
    tpm_names = [m for m in shown if parse_method(m).kind == "tpm"]
    for c, j in enumerate(picks):
        for name in tpm_names:
            s = results[name].sigmas[j].numpy()
            ax.plot(range(len(s)), s, "-o", ms=3, lw=1.4, color=cmap(c % 10),
                    label=f"TPM: {_short(prompts[items[j][0]], 28)} ({len(s) - 1} steps)")
    fixed = sorted((m for m in shown if parse_method(m).kind == "fixed"), key=lambda m: -parse_method(m).steps)
    styles = ["--", ":", "-."]
    for n, name in enumerate(fixed[:3]):
        s = results[name].sigmas[0].numpy()
        ax.plot(range(len(s)), s, styles[n % 3], color="black", lw=1.6, alpha=0.8, label=f"{name} (all prompts)")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("sigma (noise level)")
    ax.set_title("Schedules: TPM per prompt vs fixed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    for a, name in zip(axes[0, 1:], adaptive):
        called = results[name].called
        rows = picks if picks else list(range(min(len(called), n_show)))
        width = max(int(c.numel()) for c in called)
        grid = torch.full((len(rows), width), float("nan"))
        for r, j in enumerate(rows):
            grid[r, :called[j].numel()] = called[j].float()
        from matplotlib.colors import ListedColormap

        two = ListedColormap(["#c0392b", "#27ae60"])
        im = a.imshow(grid.numpy(), aspect="auto", cmap=two, vmin=-0.5, vmax=1.5, interpolation="nearest")
        a.set_yticks(range(len(rows)))
        a.set_yticklabels([f"{_short(prompts[items[j][0]], 22)} (NFE {int(results[name].nfe[j])})" for j in rows],
                          fontsize=7)
        a.set_xlabel("denoising step")
        a.set_title(f"{name}: transformer call (green) or reused velocity (red)", fontsize=9)
        cb = fig.colorbar(im, ax=a, ticks=[0, 1], fraction=0.04)
        cb.ax.set_yticklabels(["reused", "called"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_nfe_hist(path: Path, results: dict[str, MethodResult], shown: list[str]) -> None:
    """Distribution of NFE per image, one panel per method."""
    plt = _plt()
    fig, axes = plt.subplots(len(shown), 1, figsize=(7.5, 1.5 + 1.35 * len(shown)), sharex=True, squeeze=False)
    hi = max(int(results[m].nfe.max()) for m in shown)
    cmap = plt.get_cmap("tab10")
    for c, (ax, name) in enumerate(zip(axes[:, 0], shown)):
        nfe = results[name].nfe
        vals, counts = torch.unique(nfe, return_counts=True)
        ax.bar(vals.numpy(), counts.numpy(), width=0.8, color=cmap(c % 10), label=f"{name} (mean {nfe.double().mean():.1f})")
        ax.set_ylabel("images")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3, axis="y")
        ax.set_xlim(0, hi + 1.5)
    axes[-1, 0].set_xlabel("NFE (transformer calls per image)")
    axes[0, 0].set_title(f"NFE distribution per method ({int(results[shown[0]].nfe.numel())} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(path: Path, report: dict, shown: list[str]) -> None:
    """Quality vs mean NFE: fixed:N as a curve, the other methods as labelled points; one panel per metric."""
    plt = _plt()
    ref = report["reference"]
    metrics = [(f"reward: {r}", lambda row, r=r: row["rewards"][r]) for r in report["rewards"] if r != "fidelity"]
    metrics += [(f"PSNR vs {ref} (dB) = fidelity", lambda row: row["psnr"]),
                (f"SSIM vs {ref}", lambda row: row["ssim"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.3), squeeze=False)
    cmap = plt.get_cmap("tab10")
    points = [r for r in report["methods"] if parse_method(r["method"]).kind != "fixed"]
    for ax, (label, get) in zip(axes[0], metrics):
        is_psnr = label.startswith("PSNR")
        curve = [r for r in report["pareto"] if not (is_psnr and r["is_reference"])]
        xs = [r["nfe"]["mean"] for r in curve]
        ys = [get(r)["mean"] for r in curve]
        es = [get(r)["se"] for r in curve]
        ax.errorbar(xs, ys, yerr=es, fmt="-s", color="black", ms=4, lw=1.3, capsize=2, label="fixed:N (N under each point)")
        for r, x, y in zip(curve, xs, ys):
            ax.annotate(str(r["nfe"]["min"]), (x, y), textcoords="offset points", xytext=(0, -12), fontsize=7,
                        ha="center", color="dimgray")
        for c, r in enumerate(points):
            m = get(r)
            ax.errorbar([r["nfe"]["mean"]], [m["mean"]], yerr=[m["se"]], fmt="o", ms=8, capsize=3,
                        color=cmap(c % 10), label=r["method"])
            ax.annotate(r["method"], (r["nfe"]["mean"], m["mean"]), textcoords="offset points", xytext=(6, 6),
                        fontsize=8, color=cmap(c % 10))
        ax.margins(x=0.06, y=0.1)
        ax.set_xlabel("mean NFE per image")
        ax.set_ylabel(label)
        ax.set_title(label + (f"\n({ref} itself is the reference, not drawn)" if is_psnr else ""), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Quality vs compute ({report['num_images']} images, {report['resolution']} px)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(path: Path, results: dict[str, MethodResult], shown: list[str], row_prompts: list[str],
              image_index: list[int]) -> None:
    """Prompts x methods image grid, each image labelled with its NFE."""
    plt = _plt()
    nr, nc = max(len(row_prompts), 1), len(shown)
    fig, axes = plt.subplots(nr, nc, figsize=(2.3 * nc + 1.6, 2.4 * nr + 0.6), squeeze=False)
    for c, name in enumerate(shown):
        res = results[name]
        for r in range(nr):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r < res.grid_images.shape[0]:
                ax.imshow(res.grid_images[r].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
                j = image_index[r]
                lab = f"NFE {int(res.nfe[j])}"
                if not res.is_reference:
                    lab += f", {float(res.psnr[j]):.1f} dB"
                ax.set_xlabel(lab, fontsize=8)
            if r == 0:
                ax.set_title(name + (" (ref)" if res.is_reference else ""), fontsize=9)
            if c == 0 and r < len(row_prompts):
                ax.set_ylabel("\n".join(_wrap(row_prompts[r], 22)[:3]), fontsize=7)
    fig.suptitle("Same prompt and noise per row; NFE = transformer calls, dB = PSNR vs the reference", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


# ---------------------------------------------------------------------------- export
def find_eval_results(tpm_file: Path) -> Path | None:
    """An eval ``results.md`` next to a checkpoint: in it, its ``eval/``, or the run's ``eval/``."""
    d = tpm_file.parent
    cands = [d / "results.md", d / "eval" / "results.md"]
    if d.parent.name == "checkpoints":
        cands.append(d.parent.parent / "eval" / "results.md")
    return next((c for c in cands if c.is_file()), None)


def export_tpm(checkpoint: str | os.PathLike, output: str | os.PathLike, eval_dir: str | os.PathLike | None = None
               ) -> Path:
    """Write ``tpm.safetensors`` (with inference metadata) + ``tpdm_config.json`` + a ``README.md`` model card."""
    import yaml
    from safetensors.torch import save_file

    from rollout.pipeline import EXPORT_CONFIG, locate_tpm, read_inference_settings, transformer_geometry

    from .checkpoint import CheckpointError, read_tpm_file

    tpm_file = locate_tpm(checkpoint)
    out = Path(output)
    if out.resolve() == tpm_file.parent.resolve():
        raise CheckpointError(f"export folder {str(out)!r} is the checkpoint folder itself; choose another --output")
    settings, spec = read_inference_settings(tpm_file)
    geo = transformer_geometry(settings.get("backbone_path") or "")
    if geo is not None:
        settings["backbone_blocks"] = settings.get("backbone_blocks") or geo[0]
        settings["hidden_size"] = settings.get("hidden_size") or geo[1]
        settings["feature_blocks"] = [int(b) % geo[0] for b in settings["feature_blocks"]]
    tensors, meta = read_tpm_file(tpm_file)
    train_cfg_text = ""
    if (tpm_file.parent / "config.yaml").is_file():
        train_cfg_text = (tpm_file.parent / "config.yaml").read_text()
    elif (tpm_file.parent / EXPORT_CONFIG).is_file():
        prev = json.loads((tpm_file.parent / EXPORT_CONFIG).read_text()).get("training_config")
        train_cfg_text = yaml.safe_dump(prev, sort_keys=False) if prev else ""
    results_md = None
    if eval_dir is not None:
        p = Path(eval_dir)
        results_md = p if p.is_file() else p / "results.md"
        if not results_md.is_file():
            raise FileNotFoundError(f"--eval {str(eval_dir)!r} holds no results.md (run tpdm-rl eval first)")
    else:
        results_md = find_eval_results(tpm_file)

    out.mkdir(parents=True, exist_ok=True)
    new_meta = dict(meta)
    new_meta["inference"] = json.dumps(settings)
    save_file(tensors, str(out / "tpm.safetensors"), metadata=new_meta)
    it = meta.get("iteration")
    cfg = {"format": "tpdm-rl/export", "version": 1, "source": str(tpm_file),
           "iteration": int(it) if it is not None and str(it).isdigit() else it,
           "inference": settings, "tpm_spec": spec,
           "training_config": yaml.safe_load(train_cfg_text) if train_cfg_text else None}
    (out / EXPORT_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    if results_md is not None:
        shutil.copyfile(results_md, out / "eval_results.md")
    (out / "README.md").write_text(model_card(out, settings, spec, meta, train_cfg_text,
                                              results_md.read_text() if results_md else None))
    return out


def model_card(out: Path, settings: dict, spec: dict, meta: dict, train_cfg: str, results_md: str | None) -> str:
    lines = [
        f"# TPDM Time Prediction Module: {out.name}",
        "",
        "A Time Prediction Module (TPM) trained with tpdm-rl: on a frozen SD3-family backbone it predicts, at every "
        "denoising step, the next noise level (sigma_next = r * sigma, r = mode of a Beta distribution), so every "
        "prompt gets its own schedule and number of steps.",
        "",
        "## Use",
        "",
        "```python",
        "from rollout import TPDMPipeline",
        "",
        f'pipe = TPDMPipeline.from_pretrained(tpm="{out}")  # backbone: {settings.get("backbone_path")}',
        'out = pipe(["a red apple on a table"], seed=[0])',
        "out.pil()[0].save(\"apple.png\"); print(out.steps, out.sigmas[0])",
        "```",
        "",
        "```bash",
        f'tpdm-rl sample --checkpoint {out} --prompt "a red apple on a table" --output apple.png --seed 0',
        f"tpdm-rl eval --checkpoint {out} --prompts builtin:eval --methods tpm,fixed:28,fixed:14,adaptive:0.01 "
        "--output eval",
        "```",
        "",
        "Pass `backbone_path` / `--backbone` when the backbone lives elsewhere; the TPM checks that the backbone's "
        "geometry matches the values below and refuses a mismatch.",
        "",
        "## Inference settings (`tpdm_config.json`)",
        "",
        "| key | value |",
        "|---|---|",
    ]
    for k, v in settings.items():
        lines.append(f"| {k} | `{json.dumps(v)}` |")
    lines += ["", "## TPM architecture", "", "| key | value |", "|---|---|"]
    for k, v in spec.items():
        lines.append(f"| {k} | `{json.dumps(v)}` |")
    if meta.get("iteration") is not None:
        lines += ["", f"Trained for {meta['iteration']} iterations."]
    lines += ["", "## Evaluation", ""]
    if results_md:
        body = results_md.split("\n", 1)[1] if results_md.startswith("# ") else results_md
        lines += [body.strip().replace("\n## ", "\n### "), ""]
    else:
        lines += ["No evaluation found next to the checkpoint; run `tpdm-rl eval` and export again with `--eval DIR`.",
                  ""]
    lines += ["## Training configuration", ""]
    if train_cfg:
        lines += ["```yaml", train_cfg.rstrip(), "```"]
    else:
        lines += ["(not available)"]
    return "\n".join(lines) + "\n"
