"""The sweep's Pareto plot: quality against mean steps per trial."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from .plan import trial_label  # noqa: E402


def plot_pareto(report: dict, path: str | Path, budget: float | None = None) -> Path:

    comps = report["components"]
    panels = comps + (["quality"] if len(comps) > 1 else [])
    panels = panels or ["quality"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.6), squeeze=False)
    keys = report["keys"]
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
            # labels step down with quality, so the leader lines of neighbouring points do not cross
            for i, (s, q, r) in enumerate(sorted(on, key=lambda t: -t[1])):
                # alternate the label side and draw a leader line, so neighbouring points keep their labels
                ax.annotate(trial_label(r["overrides"], keys), (s, q), textcoords="offset points",
                            xytext=(14, (18, -2, -22)[i % 3]), fontsize=7.5,
                            arrowprops={"arrowstyle": "-", "lw": 0.6, "color": "0.4"})
        if budget is not None:
            ax.axvline(budget, color="gray", ls=":", lw=1, label=f"budget {budget:g} steps")
        ax.set_xlabel(f"mean denoising steps (last {report['final_window']} iters)")
        ylabel = (f"quality = sum base weight x reward (last {report['final_window']} iters)" if p == "quality"
                  else f"reward/{p} (mean, last {report['final_window']} iters)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{p} vs steps ({len(pts)} trials)")
        ax.grid(alpha=0.3)
        if pts:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center", transform=ax.transAxes)
        ax.margins(x=0.15, y=0.15)
    fig.suptitle("Sweep: quality vs mean steps (fewer steps AND higher quality = Pareto-optimal)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
