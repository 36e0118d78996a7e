"""``shapes``: an exact, model-free compositional reward for the toy world.

The image is segmented by nearest palette colour, connected components are found per colour, each
component's shape is read from its pixels, and the result is compared with the prompt's parsed scene.
The score is the fraction of the prompt's constraints that hold:

- per group: its colour, its shape and its count (3 constraints each);
- per placed group (``a red circle in the top left``): its place, true when an object of the group's colour
  and shape has its bounding-box centre inside the named quadrant (a misplaced object loses only this one);
- the background colour;
- no extra objects.

Segmentation: a pixel belongs to a palette colour when that colour is its nearest among the palette
and the three backgrounds *and* lies within ``max_distance`` (RGB units) of it; blended edge pixels
belong to nothing. Components smaller than ``min_area`` pixels (scaled from 64 px) are ignored.
Shape: a triangle has little of its area in the upper half of its bounding box (< 0.4); otherwise a
component filling >= 0.9 of its box is a square and anything else a circle. An exact render scores
1.0 (tested on thousands of scenes).

Matching (how a wrong object loses exactly its own constraint): objects that match a group's colour
and shape fill that group first; a left-over object then joins a group that still lacks objects and
shares its colour (it has the wrong shape), else one that shares its shape (it has the wrong colour);
what is left is extra. A group's colour holds when all its objects have its colour, its shape when
all have its shape, its count when it has exactly its count.

Everything is vectorised over the batch: one ``scipy.ndimage.label`` call labels every colour plane
of every image at once (its structure connects pixels only within one image and one colour), and
per-component statistics are scatter reductions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from tpdm_rl.rewards.base import RewardModel

from tpdm_rl.core.reward_registry import RewardError, register_reward
from tpdm_rl.core.toyworld import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    MAX_OBJECTS,
    PLACES,
    SHAPES,
    PromptError,
    parse_prompt,
)

_PALETTE = torch.tensor(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=torch.float32)  # [9, 3]
_NC, _NS = len(COLOURS), len(SHAPES)
_COLOUR_IDX = {c: i for i, c in enumerate(COLOURS)}
_SHAPE_IDX = {s: i for i, s in enumerate(SHAPES)}
_BG_IDX = {b: i for i, b in enumerate(BACKGROUNDS)}
TRIANGLE_TOP_FRACTION = 0.4
SQUARE_FILL = 0.9


@dataclass
class SceneTargets:
    """Parsed prompts as padded tensors: up to MAX_OBJECTS groups per prompt."""
    count: torch.Tensor  # [B, G] int64 (0 for padding)
    colour: torch.Tensor  # [B, G] int64
    shape: torch.Tensor  # [B, G] int64
    valid: torch.Tensor  # [B, G] bool
    background: torch.Tensor  # [B] int64
    place: torch.Tensor  # [B, G] int64 quadrant index in PLACES (-1: the group names no place)

    @property
    def placed(self) -> torch.Tensor:
        return self.place >= 0


@dataclass
class ShapesAnalysis:
    """What the reward saw: detected objects per (colour, shape) and every constraint's outcome."""
    detected: torch.Tensor  # [B, colours, shapes] int64 counts
    detected_at: torch.Tensor  # [B, colours, shapes, quadrants] int64 counts by bounding-box centre
    background: torch.Tensor  # [B] int64 detected background (-1: none)
    colour_ok: torch.Tensor  # [B, G] bool (False for padding)
    shape_ok: torch.Tensor  # [B, G] bool
    count_ok: torch.Tensor  # [B, G] bool
    place_ok: torch.Tensor  # [B, G] bool (True for groups without a place)
    background_ok: torch.Tensor  # [B] bool
    no_extra: torch.Tensor  # [B] bool
    satisfied: torch.Tensor  # [B] int64 constraints that hold
    total: torch.Tensor  # [B] int64 constraints of the prompt

    @property
    def score(self) -> torch.Tensor:
        return self.satisfied.float() / self.total.float()

    @property
    def exact(self) -> torch.Tensor:
        return self.satisfied == self.total


def parse_targets(prompts: Sequence[str]) -> SceneTargets:
    """Parse every prompt (one-line :class:`RewardError` naming a prompt outside the grammar)."""
    b = len(prompts)
    count = torch.zeros(b, MAX_OBJECTS, dtype=torch.int64)
    colour = torch.zeros_like(count)
    shape = torch.zeros_like(count)
    bg = torch.zeros(b, dtype=torch.int64)
    place = torch.full_like(count, -1)
    for i, text in enumerate(prompts):  # parsing text, not scoring: one regex per prompt
        try:
            p = parse_prompt(text)
        except PromptError as exc:
            raise RewardError(f"shapes: {exc}") from None
        for j, g in enumerate(p.groups):
            count[i, j], colour[i, j], shape[i, j] = g.count, _COLOUR_IDX[g.colour], _SHAPE_IDX[g.shape]
            if g.place is not None:
                place[i, j] = PLACES.index(g.place)
        bg[i] = _BG_IDX[p.background]
    return SceneTargets(count, colour, shape, count > 0, bg, place)


def segment(images: torch.Tensor, max_distance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel: palette colour index (or -1) and background index (or -1); images float [B,3,H,W] in [0,1]."""
    rgb = images.float().clamp(0, 1).mul(255).permute(0, 2, 3, 1)  # [B, H, W, 3]
    dist = torch.cdist(rgb.reshape(rgb.shape[0], -1, 3), _PALETTE.to(rgb.device).expand(rgb.shape[0], -1, -1))
    best, idx = dist.min(dim=-1)
    idx = idx.reshape(rgb.shape[:3])
    near = best.reshape(rgb.shape[:3]) <= max_distance
    colour = torch.where((idx < _NC) & near, idx, torch.full_like(idx, -1))
    background = torch.where(idx >= _NC, idx - _NC, torch.full_like(idx, -1))
    return colour, background


def detect(colour: torch.Tensor, min_area: int) -> torch.Tensor:
    """Counts of objects per (image, colour, shape, quadrant of the bounding-box centre) from a [B, H, W]
    colour-index map: [B, C, S, 4] int64 (quadrants in :data:`PLACES` order; sum the last axis for counts)."""
    b, h, w = colour.shape
    nq = len(PLACES)
    planes = (colour.unsqueeze(1) == torch.arange(_NC, device=colour.device).reshape(1, -1, 1, 1)).cpu().numpy()
    structure = np.zeros((3, 3, 3, 3), dtype=bool)
    structure[1, 1] = ndimage.generate_binary_structure(2, 1)  # 4-connected, within one image and colour
    labels, n = ndimage.label(planes, structure=structure)
    detected = torch.zeros(b, _NC, _NS, nq, dtype=torch.int64)
    if n == 0:
        return detected
    lab = torch.from_numpy(labels.reshape(-1).astype(np.int64))
    on = lab > 0
    lab_on = lab[on] - 1
    flat = torch.nonzero(on).reshape(-1)
    ys = (flat // w) % h
    xs = flat % w
    plane = flat // (h * w)  # = image * colours + colour
    area = torch.bincount(lab_on, minlength=n)

    def reduce(values: torch.Tensor, how: str) -> torch.Tensor:
        init = torch.full((n,), 10**9 if how == "amin" else -1, dtype=torch.int64)
        return init.scatter_reduce(0, lab_on, values, reduce=how, include_self=True)

    y0, y1, x0, x1 = reduce(ys, "amin"), reduce(ys, "amax"), reduce(xs, "amin"), reduce(xs, "amax")
    which = reduce(plane, "amin")
    fill = area.double() / ((y1 - y0 + 1) * (x1 - x0 + 1)).double()
    mid = (y0 + y1 + 1).double() / 2.0  # rows whose centre lies above the box's middle are "upper"
    upper = torch.bincount(lab_on[(ys.double() + 0.5) < mid[lab_on]], minlength=n)
    top_fraction = upper.double() / area.double()
    shape = torch.where(top_fraction < TRIANGLE_TOP_FRACTION, _SHAPE_IDX["triangle"],
                        torch.where(fill >= SQUARE_FILL, _SHAPE_IDX["square"], _SHAPE_IDX["circle"]))
    # the centre of the box (in pixels: x0 .. x1 + 1) against the image's middle; a centre exactly on it is right/below
    right = (x0 + x1 + 1) >= w
    below = (y0 + y1 + 1) >= h
    quadrant = 2 * below.long() + right.long()
    keep = area >= min_area
    slot = ((which * _NS + shape) * nq + quadrant)[keep]  # ((image * C + colour) * S + shape) * Q + quadrant
    detected.view(-1).index_add_(0, slot, torch.ones_like(slot))
    return detected


def match(detected: torch.Tensor, t: SceneTargets) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
    """Assign detected objects to groups (see module docstring); returns exact, same-colour and
    same-shape assignments per group [B, G] and the number of extra objects [B]."""
    b = detected.shape[0]
    rows = torch.arange(b)
    rest = detected.clone()
    n = t.count
    exact = torch.minimum(rest[rows[:, None], t.colour, t.shape], n) * t.valid
    rest.index_put_((rows[:, None].expand_as(n), t.colour, t.shape), -exact, accumulate=True)  # padding adds 0
    free = n - exact
    by_colour = torch.zeros_like(n)
    by_shape = torch.zeros_like(n)
    for g in range(n.shape[1]):  # over group slots (<= 4), vectorised over the batch
        for s in range(_NS):
            take = torch.minimum(rest[rows, t.colour[:, g], s], free[:, g]) * t.valid[:, g]
            rest[rows, t.colour[:, g], s] -= take
            free[:, g] -= take
            by_colour[:, g] += take
    for g in range(n.shape[1]):
        for c in range(_NC):
            take = torch.minimum(rest[rows, c, t.shape[:, g]], free[:, g]) * t.valid[:, g]
            rest[rows, c, t.shape[:, g]] -= take
            free[:, g] -= take
            by_shape[:, g] += take
    return exact, by_colour, by_shape, rest.sum(dim=(1, 2))


def analyse(images: torch.Tensor, prompts: Sequence[str], max_distance: float = 64.0,
            min_area: int = 16) -> ShapesAnalysis:
    """Score a batch of images against their prompts (see module docstring)."""
    t = parse_targets(prompts)
    h = images.shape[-2]
    area = max(1, round(min_area * (h / IMAGE_SIZE) ** 2))
    colour, bg_map = segment(images, max_distance)
    bg_counts = torch.nn.functional.one_hot((bg_map + 1).reshape(bg_map.shape[0], -1), len(BACKGROUNDS) + 1)
    bg_counts = bg_counts.sum(dim=1)[:, 1:]
    background = torch.where(bg_counts.sum(dim=1) > 0, bg_counts.argmax(dim=1), torch.full_like(t.background, -1))
    detected_at = detect(colour, area)
    detected = detected_at.sum(-1)
    exact, by_colour, by_shape, extra = match(detected, t)
    got = exact + by_colour + by_shape
    colour_ok = (exact + by_colour >= 1) & (by_shape == 0) & t.valid
    shape_ok = (exact + by_shape >= 1) & (by_colour == 0) & t.valid
    count_ok = (got == t.count) & t.valid
    background_ok = background.cpu() == t.background
    no_extra = extra == 0
    rows = torch.arange(detected.shape[0])[:, None]
    at_place = detected_at[rows, t.colour, t.shape, t.place.clamp(min=0)] >= 1
    place_ok = torch.where(t.placed, at_place, torch.ones_like(at_place)) & t.valid
    placed_ok = (place_ok & t.placed).sum(1)
    satisfied = (colour_ok.sum(1) + shape_ok.sum(1) + count_ok.sum(1) + placed_ok + background_ok.long()
                 + no_extra.long())
    total = 3 * t.valid.sum(1) + t.placed.sum(1) + 2
    return ShapesAnalysis(detected, detected_at, background, colour_ok, shape_ok, count_ok, place_ok, background_ok,
                          no_extra, satisfied, total)


@register_reward("shapes")
class ShapesReward(RewardModel):
    """Fraction of the prompt's constraints the image satisfies, in [0, 1] (toy-world prompts only).

    ``score_details`` adds ``exact`` (1 when every constraint holds) for logging; it is not rewarded.
    """

    unit = "fraction"

    nonnegative = True

    def __init__(self, device="cpu", dtype="float32", batch_size: int = 512, max_distance: float = 64.0,
                 min_area: int = 16) -> None:
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        if not 0 < float(max_distance) <= 442:
            raise RewardError(f"shapes: max_distance must be in (0, 442] RGB units, got {max_distance!r}")
        if int(min_area) < 1:
            raise RewardError(f"shapes: min_area must be >= 1 pixel, got {min_area!r}")
        self.max_distance = float(max_distance)
        self.min_area = int(min_area)

    def _score_batch(self, images: torch.Tensor, prompts: Sequence[str],
                     references: torch.Tensor | None) -> torch.Tensor:
        return self._score_batch_details(images, prompts, references)[0]

    def _score_batch_details(self, images: torch.Tensor, prompts: Sequence[str],
                             references: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = analyse(images, prompts, self.max_distance, self.min_area)
        return a.score, {"exact": a.exact.float()}

    def analyse(self, images: torch.Tensor, prompts: Sequence[str]) -> ShapesAnalysis:
        return analyse(images, prompts, self.max_distance, self.min_area)
