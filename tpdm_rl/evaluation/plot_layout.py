"""Label and legend placement shared by the figures (matplotlib only; no torch).

Two rules keep text off the data and off other text:

- legends sit outside the axes (:func:`legend_right`, :func:`legend_below` for one legend shared by all panels),
  and figures are saved with ``bbox_inches="tight"`` (:func:`save`), so nothing is cut at an edge;
- point labels are placed by :func:`place_labels` after the layout is final: for each label, in order, the first
  of a ring of candidate offsets (nearest first) whose text box stays inside the axes and overlaps no marker and
  no label placed before it (text or leader line); a label that ends up away from its point, or whose point has
  neighbours, gets a thin leader line that crosses no other marker and no other label's text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Label", "legend_below", "legend_right", "place_labels", "save"]

#: candidate distances (points) from the anchor, nearest first, and directions (degrees, 0 = right)
_RADII = (5.0, 10.0, 16.0, 24.0, 34.0, 46.0, 60.0)
_ANGLES = (45, -45, 90, -90, 135, -135, 0, 180, 22, -22, 158, -158, 68, -68, 112, -112)
#: from this distance on (points) a label gets a leader line to its point
_LEADER_FROM = 14.0
#: a label with another point this near (points) to its own always gets a leader line
_CROWDED = 24.0
#: labels keep this far apart (pixels)
_PAD = np.array([-1.5, -1.5, 1.5, 1.5])
#: what crossing a plotted line costs, in points of extra distance from the point
_CROSSING = 15.0


@dataclass
class Label:
    """One point label: ``text`` at data point ``xy``; ``prefer`` lists directions (degrees) tried first;
    ``crowd_leader``: a leader line whenever other points are near (else only when the label is far)."""

    text: str
    xy: tuple[float, float]
    color: str | tuple = "black"
    fontsize: float = 8.0
    prefer: tuple[int, ...] = ()
    crowd_leader: bool = True
    kwargs: dict = field(default_factory=dict)


def _area(box: np.ndarray, others: np.ndarray) -> float:
    """Total overlap area of ``box`` (x0, y0, x1, y1) with each row of ``others`` [N, 4]."""
    if not len(others):
        return 0.0
    w = np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])
    h = np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])
    return float((np.clip(w, 0, None) * np.clip(h, 0, None)).sum())


def _inside(points: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Which rows of ``points`` [N, 2] lie in ``box`` (x0, y0, x1, y1)."""
    return ((points[:, 0] >= box[0]) & (points[:, 0] <= box[2]) & (points[:, 1] >= box[1])
            & (points[:, 1] <= box[3]))


def _polyline(disp: np.ndarray, step: float = 3.0) -> np.ndarray:
    """Points every ``step`` pixels along a polyline in display space [N, 2]."""
    out = [disp[:1]]
    for a, b in zip(disp[:-1], disp[1:]):
        n = max(int(np.hypot(*(b - a)) / step), 1)
        out.append(a + (b - a) * (np.arange(1, n + 1)[:, None] / n))
    return np.concatenate(out) if len(disp) else np.zeros((0, 2))


def _around(q: np.ndarray, r: float = 1.5) -> np.ndarray:
    return np.array([q[0] - r, q[1] - r, q[0] + r, q[1] + r])


def _leader(x: float, y: float, box: np.ndarray, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """A leader line as matplotlib draws it (from the text's centre, clipped at its box, to ``shrink`` pixels
    short of the point (x, y)): its end by the point and points along it outside the text."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    d = math.hypot(cx - x, cy - y)
    if d <= shrink:
        return np.array([x, y]), np.zeros((0, 2))
    end = np.array([x + (cx - x) * shrink / d, y + (cy - y) * shrink / d])
    along = _polyline(np.array([end, [cx, cy]]))
    return end, along[~_inside(along, box)]


def place_labels(ax, labels: list[Label], markers: list[tuple[float, float]], marker_pt: float = 4.0,
                 lines: list[list[tuple[float, float]]] = (), draw: bool = True) -> list:
    """Annotate ``labels`` on ``ax`` so that no two overlap and none covers a marker.

    ``markers``: data points to keep clear (every plotted point, labelled or not), each a square of half-side
    ``marker_pt`` points; ``lines``: polylines (data coordinates) that a label avoids crossing when it
    can. Call after the figure's layout is final (tight_layout, legends): placement works in display space
    (``draw=False`` skips drawing the figure first, for the second panel on: the first draw fixed every panel's
    limits). Returns the annotations, in the order of ``labels``."""
    fig = ax.get_figure(root=True)
    if draw:
        fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer).extents
    to_px = fig.dpi / 72.0
    marker_px = marker_pt * to_px
    data = ax.transData
    pts = data.transform(np.asarray(markers, dtype=float).reshape(-1, 2))
    obstacles = np.concatenate([pts - marker_px, pts + marker_px], axis=1)  # [N, 4]
    line_pts = [_polyline(data.transform(np.asarray(line, dtype=float).reshape(-1, 2))) for line in lines]
    line_pts = np.concatenate(line_pts) if line_pts else np.zeros((0, 2))
    texts, leaders = np.zeros((0, 4)), np.zeros((0, 2))  # the labels placed so far: text boxes, leader points
    out = []
    for lab in labels:
        probe = ax.text(0, 0, lab.text, fontsize=lab.fontsize, transform=None)
        tb = probe.get_window_extent(renderer)
        probe.remove()
        w, h = tb.width + 2.0, tb.height + 2.0
        ax_, ay_ = data.transform(lab.xy)
        # the label's own marker (if it is one of ``markers``): never under its text, its leader may start there
        mine = np.hypot(pts[:, 0] - ax_, pts[:, 1] - ay_) < 0.5
        others = obstacles[~mine]
        # near other points a label always gets a leader line, so it cannot be read as a neighbour's
        crowded = lab.crowd_leader and bool((np.hypot(pts[~mine, 0] - ax_, pts[~mine, 1] - ay_)
                                             < _CROWDED * to_px).any())
        angles = tuple(lab.prefer) + tuple(a for a in _ANGLES if a not in lab.prefer)
        best = None
        radii = [r for r in _RADII if r >= _LEADER_FROM] if crowded else list(_RADII)  # a leader long enough to see
        for radius in radii:
            for angle in angles:
                c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
                dx, dy = radius * c, radius * s
                # the text's near corner (or edge middle) sits at the offset: text grows away from the point
                ha = "left" if c > 0.3 else ("right" if c < -0.3 else "center")
                va = "bottom" if s > 0.3 else ("top" if s < -0.3 else "center")
                x = ax_ + dx * to_px
                y = ay_ + dy * to_px
                x0 = x if ha == "left" else (x - w if ha == "right" else x - w / 2)
                y0 = y if va == "bottom" else (y - h if va == "top" else y - h / 2)
                box = np.array([x0, y0, x0 + w, y0 + h])
                leader = crowded or radius >= _LEADER_FROM
                hits = _area(box, obstacles)  # the text covers no marker, its own included
                along = np.zeros((0, 2))
                if leader:  # the leader line runs from the text to the marker's edge: it crosses no other marker
                    _, along = _leader(ax_, ay_, box, marker_px)
                    hits += sum(float(_inside(along, o).sum()) for o in others)
                outside = (max(frame[0] - box[0], 0) + max(box[2] - frame[2], 0) + max(frame[1] - box[1], 0)
                           + max(box[3] - frame[3], 0))
                # texts never overlap, and no leader line runs through another label's text
                hits += _area(box + _PAD, texts) + float(_inside(leaders, box + _PAD).sum())
                hits += sum(float(_inside(along, t + _PAD).sum()) for t in texts)
                crossing = bool(_inside(line_pts, box).any() or any(_inside(line_pts, _around(q)).any()
                                                                    for q in along[::3]))
                # hard: inside the frame, over no marker or label; soft: near the point, off the lines
                cost = (outside > 0 or hits > 0, outside * 1e4 + hits, radius + (_CROSSING if crossing else 0.0))
                if best is None or cost < best[0]:
                    best = (cost, dx, dy, ha, va, leader, box, along)
            nxt = radii[radii.index(radius) + 1] if radius != radii[-1] else math.inf
            if not best[0][0] and best[0][2] <= nxt:
                break
        _, dx, dy, ha, va, leader, box, along = best
        arrow = ({"arrowstyle": "-", "lw": 0.6, "color": "0.45", "shrinkA": 1, "shrinkB": marker_pt}
                 if leader else None)
        ann = ax.annotate(lab.text, lab.xy, textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                          fontsize=lab.fontsize, color=lab.color, arrowprops=arrow, annotation_clip=False,
                          **lab.kwargs)
        texts = np.concatenate([texts, box[None]])
        leaders = np.concatenate([leaders, along])
        out.append(ann)
    return out


def legend_right(ax, **kwargs):
    """The axes' legend just right of its frame (never over the data); the layout makes room for it."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)


def legend_below(fig, handles, labels, ncol: int | None = None, top: float = 1.0, **kwargs):
    """One legend for every panel, centred below them; ``fig.tight_layout`` is rerun to leave room for it
    (``top``: the fraction of the figure height kept for the panels and titles)."""
    ncol = ncol or min(len(labels), 4) or 1
    leg = fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=ncol,
                     frameon=True, **kwargs)
    fig.canvas.draw()
    height = leg.get_window_extent().height / fig.bbox.height
    fig.tight_layout(rect=(0.0, min(height + 0.01, 0.6), 1.0, top))
    return leg


def save(fig, path: str | Path, dpi: int = 110) -> None:
    """Save with a tight bounding box, so no label or legend is cut at the figure's edge."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.08)
