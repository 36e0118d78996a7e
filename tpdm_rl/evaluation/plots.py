"""The evaluation's figures: schedules, NFE histogram, quality-vs-NFE curve, image grid."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib
import torch

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.colors import ListedColormap  # noqa: E402

from tpdm_rl.core.methods import parse_method  # noqa: E402
from tpdm_rl.evaluation.plot_layout import Label, legend_below, legend_right, place_labels, save  # noqa: E402

if TYPE_CHECKING:
    from tpdm_rl.evaluation.run import MethodResult

def _short(text: str, n: int = 38) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def plot_schedules(path: Path, results: dict[str, MethodResult], shown: list[str], items, prompts, n_show: int
                   ) -> None:
    """sigma vs step for a sample of prompts (TPM vs fixed), plus each skipping method's call pattern."""
    fig = schedules_figure(results, shown, items, prompts, n_show)
    save(fig, path)
    plt.close(fig)


def schedules_figure(results: dict[str, MethodResult], shown: list[str], items, prompts, n_show: int):
    """The figure of :func:`plot_schedules` (the schedules' legend right of their panel, off the curves)."""
    adaptive = [m for m in shown if parse_method(m).skips][:2]
    # constrained layout gives the legend right of the schedules (and the colorbars) room of their own
    fig, axes = plt.subplots(1, 1 + len(adaptive), figsize=(10.5 + 5.5 * len(adaptive), 4.8), squeeze=False,
                             width_ratios=[1.6] + [1.0] * len(adaptive), layout="constrained")
    ax = axes[0, 0]
    picks = [j for j, (i, k) in enumerate(items) if k == 0][:n_show]
    cmap = plt.get_cmap("tab10")
    tpm_names = [m for m in shown if parse_method(m).kind == "tpm"]
    for c, j in enumerate(picks):
        for name in tpm_names:
            s = results[name].sigmas[j].numpy()
            ax.plot(range(len(s)), s, "-o", ms=3, lw=1.4, color=cmap(c % 10),
                    label=f"TPM: {_short(prompts[items[j][0]], 28)} ({len(s) - 1} steps)")
    # one table for every prompt: the scheduler's fixed:N, explicit sigmas: tables and the TPM's mean (tpm-mean)
    fixed = sorted((m for m in shown if parse_method(m).kind == "fixed"), key=lambda m: -parse_method(m).steps)
    tables = [m for m in shown if parse_method(m).kind in ("sigmas", "tpm-mean")]
    styles = ["--", ":", "-."]
    for n, name in enumerate(fixed[:3]):
        s = results[name].sigmas[0].numpy()
        ax.plot(range(len(s)), s, styles[n % 3], color="black", lw=1.6, alpha=0.8, label=f"{name} (all prompts)")
    greys = ["dimgray", "gray", "darkgray", "silver"]
    for n, name in enumerate(tables[:4]):
        s = results[name].sigmas[0].numpy()
        ax.plot(range(len(s)), s, styles[n % 3], marker="x", ms=4, color=greys[n], lw=1.4,
                label=f"{_short(name, 30)} ({len(s) - 1} steps, all prompts)")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("sigma (noise level)")
    ax.set_title("Schedules: TPM per prompt vs fixed tables")
    ax.grid(alpha=0.3)
    legend_right(ax, fontsize=7)
    for a, name in zip(axes[0, 1:], adaptive):
        called = results[name].called
        rows = picks if picks else list(range(min(len(called), n_show)))
        width = max(int(c.numel()) for c in called)
        grid = torch.full((len(rows), width), float("nan"))
        for r, j in enumerate(rows):
            grid[r, :called[j].numel()] = called[j].float()
        two = ListedColormap(["#c0392b", "#27ae60"])
        im = a.imshow(grid.numpy(), aspect="auto", cmap=two, vmin=-0.5, vmax=1.5, interpolation="nearest")
        a.set_yticks(range(len(rows)))
        a.set_yticklabels([f"{_short(prompts[items[j][0]], 22)} (NFE {int(results[name].nfe[j])})" for j in rows],
                          fontsize=7)
        a.set_xlabel("denoising step")
        a.set_title(f"{name}: transformer call (green) or reused velocity (red)", fontsize=9)
        cb = fig.colorbar(im, ax=a, ticks=[0, 1], fraction=0.04)
        cb.ax.set_yticklabels(["reused", "called"], fontsize=7)
    return fig


def plot_nfe_hist(path: Path, results: dict[str, MethodResult], shown: list[str]) -> None:
    """Distribution of NFE per image, one panel per method."""
    fig, axes = plt.subplots(len(shown), 1, figsize=(7.5, 1.5 + 1.35 * len(shown)), sharex=True, squeeze=False)
    hi = max(int(results[m].nfe.max()) for m in shown)
    cmap = plt.get_cmap("tab10")
    for c, (ax, name) in enumerate(zip(axes[:, 0], shown)):
        nfe = results[name].nfe
        vals, counts = torch.unique(nfe, return_counts=True)
        ax.bar(vals.numpy(), counts.numpy(), width=0.8, color=cmap(c % 10), label=f"{name} (mean {nfe.double().mean():.1f})")
        ax.set_ylabel("images")
        legend_right(ax, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.set_xlim(0, hi + 1.5)
    axes[-1, 0].set_xlabel("NFE (transformer calls per image)")
    axes[0, 0].set_title(f"NFE distribution per method ({int(results[shown[0]].nfe.numel())} images)")
    fig.tight_layout()
    save(fig, path)
    plt.close(fig)


def plot_pareto(path: Path, report: dict, shown: list[str]) -> None:
    """Quality vs mean NFE: fixed:N as a curve, the other methods as labelled points; one panel per metric."""
    fig = pareto_figure(report, shown)
    save(fig, path)
    plt.close(fig)


def pareto_figure(report: dict, shown: list[str]):
    """The figure of :func:`plot_pareto`: one legend below the panels, point labels placed so that none
    overlaps another label or a point (``plot_layout.place_labels``)."""
    ref = report["reference"]
    metrics = [(f"reward: {r}", lambda row, r=r: row["rewards"][r]) for r in report["rewards"] if r != "fidelity"]
    metrics += [(f"PSNR vs {ref} (dB) = fidelity", lambda row: row["psnr"]),
                (f"SSIM vs {ref}", lambda row: row["ssim"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.6), squeeze=False)
    cmap = plt.get_cmap("tab10")
    family = {r["method"] for r in report.get("tables_curve") or []}
    points = [r for r in report["methods"] if parse_method(r["method"]).kind != "fixed" and r["method"] not in family]
    # the TPM last, on top, with a marker of its own: a tpm-mean:N point at the same place must not hide it
    points = [r for r in points if r["method"] != "tpm"] + [r for r in points if r["method"] == "tpm"]
    shapes = ["D", "s", "^", "v", "P", "X", "h"]
    layout = []
    for ax, (label, get) in zip(axes[0], metrics):
        is_psnr = label.startswith("PSNR")
        curve = [r for r in report["pareto"] if not (is_psnr and r["is_reference"])]
        xs = [r["nfe"]["mean"] for r in curve]
        ys = [get(r)["mean"] for r in curve]
        es = [get(r)["se"] for r in curve]
        ax.errorbar(xs, ys, yerr=es, fmt="-s", color="black", ms=4, lw=1.3, capsize=2,
                    label="fixed:N (N beside each point)")
        markers = list(zip(xs, ys))
        lines = [list(zip(xs, ys))]
        labels = []
        tcurve = report.get("tables_curve") or []
        if tcurve:
            txs, tys = [r["nfe"]["mean"] for r in tcurve], [get(r)["mean"] for r in tcurve]
            ax.errorbar(txs, tys, yerr=[get(r)["se"] for r in tcurve], fmt="--^", color="tab:gray", ms=4, lw=1.1,
                        capsize=2, label=f"hand-made tables ({report.get('tables')})")
            markers += list(zip(txs, tys))
            lines.append(list(zip(txs, tys)))
        for c, r in enumerate(points):
            m = get(r)
            x, y = r["nfe"]["mean"], m["mean"]
            tpm = r["method"] == "tpm"
            ax.errorbar([x], [y], yerr=[m["se"]], fmt="*" if tpm else shapes[c % len(shapes)], ms=13 if tpm else 8,
                        capsize=3, color=cmap(c % 10), label=r["method"], zorder=6 if tpm else 4,
                        markeredgecolor="black" if tpm else None)
            markers.append((x, y))
            labels.append(Label(r["method"], (x, y), color=cmap(c % 10), fontsize=8, prefer=(45, 135, -45, -135)))
        for x, y, e in [(x, y, e) for x, y, e in zip(xs, ys, es)] + [
                (r["nfe"]["mean"], get(r)["mean"], get(r)["se"]) for r in points]:
            if e and e == e:  # the error bars: a label keeps off them when it can
                lines.append([(x, y - e), (x, y + e)])
        labels += [Label(str(r["nfe"]["min"]), (x, y), color="dimgray", fontsize=7, prefer=(-90, -45, -135),
                         crowd_leader=False)
                   for r, x, y in zip(curve, xs, ys)]
        layout.append((ax, labels, markers, lines))
        ax.margins(x=0.08, y=0.12)
        ax.set_xlabel("mean NFE per image")
        ax.set_ylabel(label)
        ax.set_title(label + (f"\n({ref} itself is the reference, not drawn)" if is_psnr else ""), fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Quality vs compute ({report['num_images']} images, {report['resolution']} px)", fontsize=11)
    handles, names = axes[0, 0].get_legend_handles_labels()
    legend_below(fig, handles, names, ncol=min(len(names), 4), fontsize=8)
    for i, (ax, labels, markers, lines) in enumerate(layout):
        place_labels(ax, labels, markers, marker_pt=4.5, lines=lines, draw=i == 0)
    return fig


def plot_grid(path: Path, results: dict[str, MethodResult], shown: list[str], row_prompts: list[str],
              image_index: list[int]) -> None:
    """Prompts x methods image grid, each image labelled with its NFE."""
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
    save(fig, path)
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width) or [""]


def plot_complexity(path: Path, report: dict) -> None:
    """Steps (NFE) against prompt complexity, one panel per axis: number of objects and, where the report has
    it, number of unplaced objects (the places world's ambiguity class); each method's mean NFE with its SE."""
    fig = complexity_figure(report)
    save(fig, path)
    plt.close(fig)


def complexity_figure(report: dict):
    """The figure of :func:`plot_complexity`: one legend (the methods) below the panels, off the curves."""
    cx = report["complexity"]
    axes_ = [(a, label) for a, label in (("objects", "objects in the prompt"),
                                         ("unplaced", "unplaced objects in the prompt")) if cx.get(f"nfe_by_{a}")]
    fig, axs = plt.subplots(1, len(axes_), figsize=(6.4 * len(axes_), 4.2), squeeze=False)
    for ax, (axis, label) in zip(axs[0], axes_):
        nfe = cx[f"nfe_by_{axis}"]
        methods = list(nfe)
        for i, name in enumerate(methods):
            lv = nfe[name]
            xs = [int(k) for k in lv]
            ys = [lv[k]["mean"] for k in lv]
            es = [lv[k]["se"] for k in lv]
            style = {"lw": 2.2, "marker": "o"} if name == "tpm" else {"lw": 1.0, "marker": ".", "alpha": 0.8}
            ax.errorbar([x + 0.04 * (i - len(methods) / 2) for x in xs], ys, yerr=es, label=name, capsize=3,
                        **style)
        rho = cx.get("spearman_tpm_nfe", {}).get(axis)
        if "tpm" in nfe and rho:
            ax.set_title(f"steps vs {axis} (TPM: Spearman rho {rho['rho']:.2f}, p {rho['p']:.2g})", fontsize=10)
        ax.set_xlabel(label)
        ax.set_ylabel("NFE (transformer calls) per image, mean ± SE")
        ax.set_xticks(sorted({int(k) for lv in nfe.values() for k in lv}))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    handles, names = axs[0, 0].get_legend_handles_labels()
    legend_below(fig, handles, names, ncol=min(len(names), 5), fontsize=8)
    return fig
