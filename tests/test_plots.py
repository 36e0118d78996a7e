"""The figures place their text off the data: point labels never overlap each other (nor does a leader line run
through another label), legends never cover a plotted point, labels stay inside their panel (issue 23). Checked
in the figure objects, on reports whose points sit close together (the TPM, its mean tables and the fixed:N curve
within one NFE of each other)."""

from __future__ import annotations

import itertools

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Annotation, Text  # noqa: E402


def _ms(mean: float, se: float = 0.004) -> dict:
    return {"mean": mean, "se": se}


def _row(method: str, nfe: float, q: float, psnr: float, ssim: float, ref: bool = False) -> dict:
    return {"method": method, "is_reference": ref, "nfe": {"mean": nfe, "min": int(nfe), "max": int(nfe) + 2},
            "rewards": {"shapes": _ms(q)}, "psnr": _ms(psnr, 0.3), "ssim": _ms(ssim, 0.005)}


STEPS = [2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 28]
QUALITY = [0.30, 0.52, 0.70, 0.80, 0.85, 0.87, 0.88, 0.885, 0.89, 0.895, 0.90]
METHODS = [_row("tpm", 5.8, 0.87, 17.5, 0.52), _row("tpm-mean:5", 5.0, 0.86, 16.4, 0.50),
           _row("tpm-mean:6", 6.0, 0.875, 17.6, 0.525), _row("adaptive:0.01", 9.0, 0.88, 21.0, 0.58),
           _row("fixed:28", 28, 0.90, 100, 1.0, ref=True)]
EVAL_REPORT = {
    "reference": "fixed:28", "rewards": ["shapes"], "num_images": 96, "resolution": 64, "methods": METHODS,
    "pareto": [_row(f"fixed:{n}", n, q, 10 + 1.2 * n, 0.4 + 0.02 * n, ref=n == 28) for n, q in zip(STEPS, QUALITY)],
    "tables": "builtin:toy",
    "tables_curve": [_row(f"sigmas:{n}", n, q + 0.02, 11 + 1.2 * n, 0.42 + 0.02 * n)
                     for n, q in zip(STEPS[:6], QUALITY[:6])],
}


def _levels(values: list[float]) -> dict:
    return {str(k): {"mean": v, "se": 0.3, "n": 20} for k, v in enumerate(values, start=1)}


# methods whose NFE lines fill the panel from corner to corner: no free corner for a legend inside it
COMPLEXITY_REPORT = {"complexity": {
    "nfe_by_objects": {"tpm": _levels([3, 9, 18, 27]), "tpm-mean:6": _levels([6, 6, 6, 6]),
                       "adaptive:0.01": _levels([27, 19, 10, 3]), "fixed:28": _levels([28, 28, 28, 28]),
                       "fixed:2": _levels([2, 2, 2, 2]), "fixed:15": _levels([15, 15, 15, 15])},
    "nfe_by_unplaced": {"tpm": _levels([4, 10, 17, 26]), "tpm-mean:6": _levels([6, 6, 6, 6]),
                        "adaptive:0.01": _levels([26, 18, 11, 4]), "fixed:28": _levels([28, 28, 28, 28]),
                        "fixed:2": _levels([2, 2, 2, 2]), "fixed:15": _levels([15, 15, 15, 15])},
    "spearman_tpm_nfe": {"objects": {"rho": 0.6, "p": 1e-5}, "unplaced": {"rho": 0.5, "p": 1e-4}}}}


def _sweep_report() -> dict:
    from tpdm_rl.sweep.report import pareto_front

    keys = ["step_penalty.coef", "optim.lr"]
    trials = [{"name": f"t{i}", "overrides": {keys[0]: c, keys[1]: lr}, "steps/mean": s, "reward/shapes": q,
               "quality": q} for i, (c, lr, s, q) in enumerate(
        [(0.005, 1e-3, 7.9, 0.88), (0.01, 1e-3, 6.1, 0.87), (0.02, 1e-3, 5.2, 0.84), (0.005, 3e-3, 7.5, 0.879),
         (0.01, 3e-3, 6.0, 0.868), (0.02, 3e-3, 4.1, 0.80), (0.04, 3e-3, 3.2, 0.71), (0.04, 1e-3, 3.3, 0.705)])]
    for t, on in zip(trials, pareto_front([(t["steps/mean"], t["quality"]) for t in trials])):
        t["pareto"] = {"shapes": on}
    return {"components": ["shapes"], "keys": keys, "trials": trials, "final_window": 3}


@pytest.fixture
def drawn(monkeypatch):
    """Call a plot function that saves its figure and closes it; return the figure, kept open and drawn."""
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    before = set(plt.get_fignums())

    def run(fn, *args, **kwargs):
        fn(*args, **kwargs)
        new = [n for n in plt.get_fignums() if n not in before]
        assert len(new) == 1
        fig = plt.figure(new[0])
        fig.canvas.draw()
        return fig

    yield run
    for n in set(plt.get_fignums()) - before:
        close(n)


def _data_points(fig) -> list[tuple[float, float]]:
    """Every plotted vertex and marker of every panel, in display pixels."""
    out = []
    for ax in fig.axes:
        for line in ax.lines:
            out += [tuple(p) for p in line.get_transform().transform(line.get_xydata())]
        for coll in ax.collections:
            offsets = coll.get_offsets()
            if len(offsets):
                out += [tuple(p) for p in coll.get_offset_transform().transform(offsets)]
    return out


def _legends(fig) -> list:
    return list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def _leader_points(ann) -> np.ndarray:
    """Points every pixel along an annotation's leader line, in display pixels (none without one)."""
    if ann.arrow_patch is None:
        return np.zeros((0, 2))
    v = ann.arrow_patch.get_transform().transform(ann.arrow_patch.get_path().vertices)
    steps = [a + (b - a) * t for a, b in zip(v[:-1], v[1:])
             for t in np.linspace(0, 1, max(int(np.hypot(*(b - a))), 2))]
    return np.array(steps).reshape(-1, 2)


def _check(fig, n_labels: int) -> None:
    """Label texts never overlap, no leader line runs through another label's text, every label's text is inside
    its panel, and no legend covers a plotted point."""
    anns = [(ax, t) for ax in fig.axes for t in ax.texts if isinstance(t, Annotation)]
    assert len(anns) >= n_labels
    boxes = [(t.get_text(), Text.get_window_extent(t)) for _, t in anns]  # the text, without its leader line
    for (a, ba), (b, bb) in itertools.combinations(boxes, 2):
        assert not ba.overlaps(bb), f"labels {a!r} {ba.bounds} and {b!r} {bb.bounds} overlap"
    for (_, t), (a, _) in zip(anns, boxes):
        line = _leader_points(t)
        for b, bb in boxes:
            hit = [q for q in line if bb.contains(*q)] if b != a else []
            assert not hit, f"the leader line of {a!r} runs through the label {b!r} {bb.bounds} at {hit[0]}"
    for ax, t in anns:  # the text itself inside its panel: not cut at an edge, not over the axis labels
        frame, box = ax.get_window_extent(), Text.get_window_extent(t)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, t
    points = _data_points(fig)
    legends = _legends(fig)
    assert legends and points
    for leg in legends:
        box = leg.get_window_extent()
        covered = [p for p in points if box.x0 <= p[0] <= box.x1 and box.y0 <= p[1] <= box.y1]
        assert not covered, f"the legend {box.bounds} covers data points {covered[:3]}"


def test_pareto_labels_and_legend_keep_off_each_other_and_the_data(drawn, tmp_path):
    from tpdm_rl.evaluation.plots import plot_pareto

    fig = drawn(plot_pareto, tmp_path / "pareto.png", EVAL_REPORT, [m["method"] for m in METHODS])
    # per panel: the four method labels and the fixed:N numbers; the tables curve is drawn (in the legend)
    _check(fig, n_labels=3 * 4)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("tpm-mean:5") == 3 and texts.count("adaptive:0.01") == 3
    names = [t.get_text() for leg in _legends(fig) for t in leg.get_texts()]
    assert any(n.startswith("hand-made tables") for n in names)
    assert (tmp_path / "pareto.png").stat().st_size > 0


def test_complexity_legend_keeps_off_the_curves(drawn, tmp_path):
    from tpdm_rl.evaluation.plots import plot_complexity

    fig = drawn(plot_complexity, tmp_path / "c.png", COMPLEXITY_REPORT)
    assert len([ax for ax in fig.axes if ax.lines]) == 2  # by objects and by unplaced objects
    _check(fig, n_labels=0)


def test_sweep_pareto_labels_stay_inside_and_apart(drawn, tmp_path):
    from tpdm_rl.sweep.plot import plot_pareto

    fig = drawn(plot_pareto, _sweep_report(), tmp_path / "sweep_pareto.png", 6.0)
    _check(fig, n_labels=7)
