"""The sweep's Pareto plot: quality against mean steps per trial."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from tpdm_rl.evaluation.plot_layout import Label, legend_below, place_labels, save  # noqa: E402
from tpdm_rl.sweep.plan import trial_label  # noqa: E402


def plot_pareto(report: dict, path: str | Path, budget: float | None = None) -> Path:
    """``sweep_pareto.png``: one panel per reward component (and quality), the Pareto-optimal trials labelled."""
    fig = pareto_figure(report, budget)
    path = Path(path)
    save(fig, path)
    plt.close(fig)
    return path


def pareto_figure(report: dict, budget: float | None = None):
    """The figure of :func:`plot_pareto`: one legend below the panels, labels placed so that none overlaps
    another label or a point and none leaves its panel (``plot_layout.place_labels``)."""
    comps = report["components"]
    panels = comps + (["quality"] if len(comps) > 1 else [])
    panels = panels or ["quality"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), squeeze=False)
    keys = report["keys"]
    layout = []
    for ax, p in zip(axes[0], panels):
        key = p if p == "quality" else f"reward/{p}"
        pts = [(r["steps/mean"], r.get(key), r) for r in report["trials"]
               if r.get("steps/mean") is not None and r.get(key) is not None]
        on = [(s, q, r) for s, q, r in pts if r["pareto"].get(p)]
        off = [(s, q, r) for s, q, r in pts if not r["pareto"].get(p)]
        if off:
            ax.scatter([s for s, _, _ in off], [q for _, q, _ in off], s=36, color="tab:blue", alpha=0.75,
                       label="trial")
        if on:
            on.sort(key=lambda t: t[0])
            ax.plot([s for s, _, _ in on], [q for _, q, _ in on], "--", color="tab:red", lw=1, alpha=0.6)
            ax.scatter([s for s, _, _ in on], [q for _, q, _ in on], s=110, marker="*", color="tab:red",
                       edgecolor="black", linewidth=0.5, zorder=3, label="Pareto-optimal")
        if budget is not None:
            ax.axvline(budget, color="gray", ls=":", lw=1, label=f"budget {budget:g} steps")
        ax.set_xlabel(f"mean denoising steps (last {report['final_window']} iters)")
        ylabel = (f"quality = sum base weight x reward (last {report['final_window']} iters)" if p == "quality"
                  else f"reward/{p} (mean, last {report['final_window']} iters)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{p} vs steps ({len(pts)} trials)")
        ax.grid(alpha=0.3)
        if not pts:
            ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center", transform=ax.transAxes)
        ax.margins(x=0.15, y=0.15)
        labels = [Label(trial_label(r["overrides"], keys), (s, q), fontsize=7.5, prefer=(-45, 45, -135, 135))
                  for s, q, r in sorted(on, key=lambda t: -t[1])]
        layout.append((ax, labels, [(s, q) for s, q, _ in pts], [[(s, q) for s, q, _ in on]]))
    fig.suptitle("Sweep: quality vs mean steps (fewer steps AND higher quality = Pareto-optimal)", fontsize=10)
    fig.tight_layout()
    legend = {}  # one legend below the panels: the union of their entries
    for ax in axes[0]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(n, h)
    if legend and any(layout_[2] for layout_ in layout):
        legend_below(fig, list(legend.values()), list(legend), ncol=len(legend), fontsize=8)
    for i, (ax, labels, markers, lines) in enumerate(layout):
        if budget is not None:
            lo, hi = ax.get_ylim()
            lines.append([(budget, lo), (budget, hi)])
        place_labels(ax, labels, markers, marker_pt=5.5, lines=lines, draw=i == 0)
    return fig
