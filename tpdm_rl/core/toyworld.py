"""The toy world: a grammar of prompts, a seeded scene sampler and an exact renderer.

A scene is 1 to 4 flat-filled shapes (circle, axis-aligned square, upright triangle) in a palette
colour on a plain background. Sizes and positions lie on a 4-pixel lattice (the VAE's latent grid), so an
object's edges fall on latent-pixel boundaries: this is what lets a denoiser trained for under an hour on
2 CPU cores draw crisp shapes. Objects keep at least 8 px apart and 4 px from the border. Its prompt
follows one grammar exactly::

    prompt := group ((", " group)* " and " group)? " on a " bg " background"
    group  := count " " colour " " shape [" in the " (top|bottom) " " (left|right)]
              (count: a | two | three | four; plural shape if > 1; a place only on a group of one)

for example ``two red circles, a blue square in the top left and a yellow triangle on a white background``;
at most 4 objects, no two groups share colour and shape, no two placed objects share a quadrant.

Ambiguity varies by prompt (the places world): a placed object is fixed by the prompt (16 px, centred in its
quadrant), an unplaced one takes a free quadrant at random with a free size and offset drawn from the seed. The number of unplaced
objects (0-4) is the class that should decide how many denoising steps a prompt needs. The first world's
prompts (no places) are the "none placed" kind and still parse the same; the shipped backbone and the bundled
``toy-train`` / ``toy-heldout`` sets are that world's; ``toy-places-*`` balance all placed, mixed and none placed.

Train and held-out prompts are disjoint as *combinations* (the background plus the multiset of
groups with their places, whatever their order in the sentence): a held-out prompt names a combination that
neither the toy backbone nor the TPM saw in training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (150, 60, 200), "orange": (245, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNTS: dict[str, int] = {"a": 1, "two": 2, "three": 3, "four": 4}
COUNT_WORDS: dict[int, str] = {v: k for k, v in COUNTS.items()}
MAX_OBJECTS = 4
GRID = 2  # objects sit in distinct cells (quadrants) of a GRID x GRID grid
LATTICE = 4  # positions and sizes are multiples of this many pixels (at 64 px): the VAE's downsampling
CELL_MARGIN = 4  # free pixels on every side inside a cell: objects are at least 2 * CELL_MARGIN apart
MIN_GAP = 2 * CELL_MARGIN  # pixels between the bounding boxes of two objects (at 64 px)
#: bounding-box side range in pixels (at 64 px, multiples of LATTICE) by number of objects: more objects,
#: smaller objects
SIZE_RANGE: dict[int, tuple[int, int]] = {1: (16, 24), 2: (12, 24), 3: (12, 20), 4: (8, 16)}
#: the places a group of one may name, in reading order (index = the cell of :func:`cells`)
PLACES: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
#: a placed object's side (at 64 px): fixed, centred in its quadrant, on the lattice (quadrant 32 px: box at 8..24)
PLACED_SIZE = 16
#: prompt kinds by how many objects carry a place
KINDS: tuple[str, ...] = ("all placed", "mixed", "none placed")
HELDOUT_PERCENT = 15  # share of combinations held out of every training set
#: every word the grammar can produce (the toy text encoders' vocabulary)
VOCABULARY: tuple[str, ...] = tuple(
    list(COUNTS) + list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES]
    + list(BACKGROUNDS) + ["and", "on", "background", ","] + ["in", "the", "top", "bottom", "left", "right"])


class PromptError(ValueError):
    """A prompt is outside the toy grammar (one-line message naming the prompt)."""


@dataclass(frozen=True, order=True)
class Group:
    """``count`` objects of one colour and shape; a group of one may name its quadrant (``place``)."""

    count: int
    colour: str
    shape: str
    place: str | None = None  # one of PLACES, or None (the object may go anywhere)

    def words(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        where = f" in the {self.place}" if self.place else ""
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}{where}"

    def key(self) -> str:
        """Order-free identity; unplaced groups keep the first world's key, so old combinations keep their split."""
        return f"{self.count}-{self.colour}-{self.shape}" + (f"@{self.place}" if self.place else "")


@dataclass(frozen=True)
class Prompt:
    """A parsed prompt: its groups (in sentence order) and background."""

    groups: tuple[Group, ...]
    background: str

    @property
    def text(self) -> str:
        parts = [g.words() for g in self.groups]
        head = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{head} on a {self.background} background"

    @property
    def num_objects(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_unplaced(self) -> int:
        """Objects whose place the prompt leaves open: the ambiguity class (0-4)."""
        return sum(g.count for g in self.groups if g.place is None)

    @property
    def num_placed(self) -> int:
        return self.num_objects - self.num_unplaced

    @property
    def kind(self) -> str:
        """``all placed``, ``mixed`` or ``none placed``."""
        return KINDS[0] if self.num_unplaced == 0 else KINDS[2] if self.num_placed == 0 else KINDS[1]

    @property
    def combination(self) -> str:
        """The order-free identity of the prompt, places included (what train and held-out sets never share)."""
        groups = ";".join(sorted(g.key() for g in self.groups))
        return f"{self.background}|{groups}"

    @property
    def heldout(self) -> bool:
        return is_heldout(self.combination)


@dataclass
class PlacedObject:
    colour: str
    shape: str
    x0: int  # bounding box: columns [x0, x0 + size), rows [y0, y0 + size)
    y0: int
    size: int


@dataclass
class Scene:
    prompt: Prompt
    objects: list[PlacedObject] = field(default_factory=list)


def is_heldout(combination: str) -> bool:
    """A stable hash of the combination decides its split (no list to ship, no RNG state)."""
    h = int.from_bytes(hashlib.sha256(combination.encode()).digest()[:8], "little")
    return h % 100 < HELDOUT_PERCENT


# ---------------------------------------------------------------------------- parsing
_PLURALS = {sh + "s": sh for sh in SHAPES}


def _words(text: str) -> list[str]:
    """Space-separated words, a trailing comma split off as its own word (so errors can name either)."""
    out: list[str] = []
    for w in text.split(" "):
        if w.endswith(",") and len(w) > 1:
            out += [w[:-1], ","]
        else:
            out.append(w)
    return out


class _PromptReader:
    """Reads a prompt of the toy grammar word by word; every error names the offending word and what the grammar
    expected there."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.words = _words(text)
        self.pos = 0
        self.number = [0] * (len(self.words) + 1)  # 1-based word number of each token (a comma shares its word's)
        k = 0
        for i, w in enumerate(self.words):
            k += w != ","
            self.number[i] = k if w != "," else max(k, 1)
        self.number[len(self.words)] = k

    def bad(self, why: str) -> PromptError:
        return PromptError(f"prompt {self.text!r} is not in the toy grammar: {why}")

    def expect(self, options, what: str) -> str:
        if self.pos >= len(self.words):
            raise self.bad(f"it ends after word {self.number[-1]}; expected {what}")
        w = self.words[self.pos]
        if w not in options:
            shown = "empty word (two spaces in a row, or a trailing space)" if w == "" else f"word {w!r}"
            raise self.bad(f"unexpected {shown} at word {self.number[self.pos]}; expected {what}")
        self.pos += 1
        return w

    def peek(self) -> str | None:
        return self.words[self.pos] if self.pos < len(self.words) else None

    def group(self) -> Group:
        expect = self.expect
        count = COUNTS[expect(COUNTS, "a count (a, two, three, four)")]
        colour = expect(COLOURS, "a colour (" + ", ".join(COLOURS) + ")")
        if count == 1:
            shape = expect(SHAPES, "a shape (" + ", ".join(SHAPES) + ")")
        else:
            shape = _PLURALS[expect(_PLURALS, "a plural shape (" + ", ".join(_PLURALS) + ")")]
        place = None
        if count == 1 and self.peek() == "in":
            expect(("in",), "'in'")
            expect(("the",), "'the'")
            row = expect(("top", "bottom"), "'top' or 'bottom'")
            col = expect(("left", "right"), "'left' or 'right'")
            place = f"{row} {col}"
        return Group(count, colour, shape, place)

    def groups(self) -> list[Group]:
        """The groups up to and including the 'on' before the background."""
        after = "',', 'and' or 'on'"
        after_single = "',', 'and', 'on' or a place ('in the top left', ...)"
        groups = [self.group()]
        listed = False  # inside "A, B, ... and Z": the list must close with 'and'
        while True:
            can_place = groups[-1].count == 1 and groups[-1].place is None
            if listed:
                sep = self.expect((",", "and"), "',' or 'and' (a list of groups ends with 'and')")
            else:
                plural_in = self.peek() == "in" and groups[-1].count > 1
                sep = self.expect((",", "and", "on"), after_single if can_place else after
                                  + (" (only a group of one may carry a place)" if plural_in else ""))
            if sep == "on":
                return groups
            if sep == ",":
                listed = True
                groups.append(self.group())
                continue
            groups.append(self.group())  # after 'and': the last group
            self.expect(("on",), "'on' (after the last group: ' on a <black|white|gray> background')")
            return groups

    def background(self) -> str:
        """' a <colour> background' and the end of the prompt."""
        self.expect(("a",), "'a' (' on a <black|white|gray> background')")
        bg = self.expect(BACKGROUNDS, "a background (" + ", ".join(BACKGROUNDS) + ")")
        self.expect(("background",), "'background'")
        if self.pos < len(self.words):
            raise self.bad(f"unexpected word {self.words[self.pos]!r} at word {self.number[self.pos]}; expected the "
                           "end after 'background'")
        return bg


def parse_prompt(text: str) -> Prompt:
    """Parse a prompt of the toy grammar, word by word, so a malformed prompt gets a one-line
    :class:`PromptError` that names the offending word and what the grammar expected there."""
    if not isinstance(text, str):
        raise PromptError(f"prompt {text!r} is not in the toy grammar: it is not a string")
    reader = _PromptReader(text)
    groups = reader.groups()
    bg = reader.background()
    pairs = [(g.colour, g.shape) for g in groups]
    for i, pair in enumerate(pairs):
        if pair in pairs[:i]:
            raise reader.bad(f"two groups share the colour and shape '{pair[0]} {pair[1]}'")
    places = [g.place for g in groups if g.place]
    for i, place in enumerate(places):
        if place in places[:i]:
            raise reader.bad(f"two objects are placed in the {place}")
    if sum(g.count for g in groups) > MAX_OBJECTS:
        raise reader.bad(f"it names {sum(g.count for g in groups)} objects; at most {MAX_OBJECTS}")
    prompt = Prompt(tuple(groups), bg)
    if prompt.text != text:
        raise reader.bad("spacing or punctuation differs from the grammar (e.g. 'a red circle, a blue square and "
                         "a yellow triangle on a white background')")
    return prompt


# ---------------------------------------------------------------------------- sampling
_PARTITIONS: dict[int, list[tuple[int, ...]]] = {
    1: [(1,)], 2: [(2,), (1, 1)], 3: [(3,), (2, 1), (1, 1, 1)],
    4: [(4,), (3, 1), (2, 2), (2, 1, 1), (1, 1, 1, 1)],
}
_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]


def sample_prompt(rng: np.random.Generator, num_objects: int | None = None, split: str = "train") -> Prompt:
    """A random prompt of the first world (no places) of the given split (``train``, ``heldout`` or ``any``).

    Kept draw for draw: it generates the bundled ``toy-train`` / ``toy-heldout`` sets the shipped backbone uses."""
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split must be 'train', 'heldout' or 'any', got {split!r}")
    for _ in range(10_000):
        n = int(num_objects or rng.integers(1, MAX_OBJECTS + 1))
        parts = _PARTITIONS[n][int(rng.integers(len(_PARTITIONS[n])))]
        pairs = rng.choice(len(_PAIRS), size=len(parts), replace=False)
        groups = tuple(Group(int(k), *_PAIRS[int(p)]) for k, p in zip(parts, pairs))
        order = rng.permutation(len(groups))
        prompt = Prompt(tuple(groups[int(i)] for i in order), list(BACKGROUNDS)[int(rng.integers(3))])
        if split == "any" or prompt.heldout == (split == "heldout"):
            return prompt
    raise RuntimeError("could not draw a prompt of the requested split")  # unreachable in practice


def cells(size: int = IMAGE_SIZE) -> list[tuple[int, int, int, int]]:
    """The grid's cells as (x0, y0, width, height), row by row."""
    edges = [round(k * size / GRID) for k in range(GRID + 1)]
    return [(edges[c], edges[r], edges[c + 1] - edges[c], edges[r + 1] - edges[r])
            for r in range(GRID) for c in range(GRID)]


def _kinds_for(num_objects: int | None) -> tuple[str, ...]:
    return KINDS if num_objects is None or num_objects >= 2 else (KINDS[0], KINDS[2])


def _levels_for(kind: str) -> tuple[int, ...]:
    return (2, 3, 4) if kind == KINDS[1] else (1, 2, 3, 4)


def sample_places_prompt(rng: np.random.Generator, num_objects: int | None = None, split: str = "train",
                         kind: str | None = None) -> Prompt:
    """A random prompt of the places world: ``kind`` (``all placed``, ``mixed``, ``none placed``; drawn evenly
    when None) and then the object count (drawn evenly over the counts the kind allows when None).

    ``all placed``: every group is one object with its own quadrant. ``mixed`` (2+ groups): at least one object
    placed and one not. ``none placed``: the first world's prompts."""
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split must be 'train', 'heldout' or 'any', got {split!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == KINDS[1] and num_objects == 1:
        raise ValueError("a mixed prompt needs at least 2 objects")
    for _ in range(10_000):
        k = kind or _kinds_for(num_objects)[int(rng.integers(len(_kinds_for(num_objects))))]
        levels = _levels_for(k)
        n = int(num_objects or levels[int(rng.integers(len(levels)))])
        if k == KINDS[0]:
            parts: tuple[int, ...] = (1,) * n
        else:
            options = [q for q in _PARTITIONS[n] if k == KINDS[2] or (len(q) >= 2 and 1 in q)]
            parts = options[int(rng.integers(len(options)))]
        pairs = rng.choice(len(_PAIRS), size=len(parts), replace=False)
        singles = [i for i, c in enumerate(parts) if c == 1]
        if k == KINDS[0]:
            placed = singles
        elif k == KINDS[1]:  # a non-empty set of singles, leaving at least one object unplaced
            most = len(singles) - (1 if len(singles) == len(parts) else 0)
            m = int(rng.integers(1, most + 1))
            placed = sorted(int(i) for i in rng.choice(singles, size=m, replace=False))
        else:
            placed = []
        quads = rng.permutation(len(PLACES))
        where = {i: PLACES[int(quads[j])] for j, i in enumerate(placed)}
        groups = tuple(Group(int(c), *_PAIRS[int(p)], where.get(i)) for i, (c, p) in enumerate(zip(parts, pairs)))
        order = rng.permutation(len(groups))
        prompt = Prompt(tuple(groups[int(i)] for i in order), list(BACKGROUNDS)[int(rng.integers(3))])
        if split == "any" or prompt.heldout == (split == "heldout"):
            return prompt
    raise RuntimeError("could not draw a prompt of the requested split")  # unreachable in practice


def placed_box(place: str, size: int = IMAGE_SIZE) -> tuple[int, int, int]:
    """(x0, y0, side) of a placed object: :data:`PLACED_SIZE` centred in its quadrant (at 64 px, then scaled)."""
    cx, cy, cw, ch = cells(IMAGE_SIZE)[PLACES.index(place)]
    x0, y0 = cx + (cw - PLACED_SIZE) // 2, cy + (ch - PLACED_SIZE) // 2
    scale = size / IMAGE_SIZE
    return round(x0 * scale), round(y0 * scale), round(PLACED_SIZE * scale)


def layout(prompt: Prompt, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """Place the prompt's objects (listed in the order the prompt names them).

    A placed object is fixed by the prompt: :data:`PLACED_SIZE` px centred in its quadrant. An unplaced object
    is free: it takes a quadrant no other object holds, drawn at random, with a side from :data:`SIZE_RANGE`
    (by object count) and an offset anywhere inside the quadrant (``CELL_MARGIN`` px to its edges), both on the
    :data:`LATTICE`; boxes in different quadrants are therefore :data:`MIN_GAP` apart. That freedom is the
    world's ambiguity: the more unplaced objects, the more layouts fit the prompt (a discrete choice of
    quadrants, which a tiny backbone learns, instead of a continuum of positions, which it drew as blends).
    Everything at 64 px, then scaled to ``size``; a pure function of ``rng``."""
    scale = size / IMAGE_SIZE
    lo, hi = SIZE_RANGE[prompt.num_objects]
    items = [(g.colour, g.shape, g.place) for g in prompt.groups for _ in range(g.count)]
    boxes = {i: placed_box(p) for i, (_, _, p) in enumerate(items) if p}
    taken = {PLACES.index(p) for _, _, p in items if p}
    free = [int(c) for c in rng.permutation(GRID * GRID) if int(c) not in taken]
    grid = cells(IMAGE_SIZE)
    for i, (_, _, p) in enumerate(items):
        if p:
            continue
        cx, cy, cw, ch = grid[free.pop(0)]
        s = LATTICE * int(rng.integers(lo // LATTICE, hi // LATTICE + 1))
        sx = (cw - 2 * CELL_MARGIN - s) // LATTICE + 1
        sy = (ch - 2 * CELL_MARGIN - s) // LATTICE + 1
        ox, oy = (int(v) for v in rng.integers(0, (sx, sy)))
        boxes[i] = (cx + CELL_MARGIN + LATTICE * ox, cy + CELL_MARGIN + LATTICE * oy, s)
    placed = [PlacedObject(c, sh, round(boxes[i][0] * scale), round(boxes[i][1] * scale), round(boxes[i][2] * scale))
              for i, (c, sh, _) in enumerate(items)]
    return Scene(prompt, placed)


def shape_mask(shape: str, s: int) -> np.ndarray:
    """The exact s x s pixel mask of a shape (pixel centres inside the ideal figure)."""
    c = (np.arange(s) + 0.5)
    xx, yy = np.meshgrid(c, c)
    if shape == "square":
        return np.ones((s, s), dtype=bool)
    if shape == "circle":
        r = s / 2.0
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r + 1e-9
    if shape == "triangle":  # apex up: half-width grows from 1/2 px at the top row to s/2 at the bottom
        half = (yy + 0.5) / s * (s / 2.0)
        return np.abs(xx - s / 2.0) <= half + 1e-9
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as uint8 RGB [size, size, 3]: flat fills, no anti-aliasing, deterministic."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[scene.prompt.background]
    for o in scene.objects:
        m = shape_mask(o.shape, o.size)
        region = img[o.y0:o.y0 + o.size, o.x0:o.x0 + o.size]
        region[m] = COLOURS[o.colour]
    return img


def sample_scene(seed: int, num_objects: int | None = None, split: str = "train",
                 size: int = IMAGE_SIZE, kind: str | None = None) -> Scene:
    """One scene of the places world (kinds balanced unless ``kind`` is given), a pure function of the seed."""
    rng = np.random.default_rng(seed)
    return layout(sample_places_prompt(rng, num_objects, split, kind), rng, size)


def prompt_set(seed: int, count: int, split: str, per_complexity: bool = True, places: bool = False) -> list[str]:
    """``count`` prompt texts of a split, as evenly spread over 1..4 objects as ``per_complexity`` asks.

    ``places=False``: the first world's prompts (none placed; what ``toy-train`` / ``toy-heldout`` hold).
    ``places=True``: the places world, cycling the kinds (all placed, mixed, none placed) and, within each kind,
    the object counts it allows (mixed: 2-4), so the three kinds are balanced to within one prompt.
    Distinct texts where the split has enough of them (the 1-object held-out level has only a few
    combinations; those repeat and are sampled with different noise seeds).
    """
    rng = np.random.default_rng(seed)
    out: list[str] = []
    if places:
        cells_ = [(KINDS[i % 3], _levels_for(KINDS[i % 3])[(i // 3) % len(_levels_for(KINDS[i % 3]))])
                  for i in range(count)]
        levels: list = cells_ if per_complexity else [(KINDS[i % 3], None) for i in range(count)]
    else:
        levels = [1 + i % MAX_OBJECTS for i in range(count)] if per_complexity else [None] * count
    seen: set[str] = set()
    for lv in levels:
        for attempt in range(200):
            if places:
                text = sample_places_prompt(rng, lv[1], split, lv[0]).text
            else:
                text = sample_prompt(rng, lv, split).text
            if text not in seen or attempt == 199:
                break
        seen.add(text)
        out.append(text)
    return out


def complexity(text: str) -> tuple[int, int]:
    """(number of objects, number of groups) of a prompt."""
    p = parse_prompt(text)
    return p.num_objects, p.num_groups


def ambiguity(text: str) -> int:
    """The number of unplaced objects of a prompt (0-4): the places world's step-need class."""
    return parse_prompt(text).num_unplaced


#: the bundled prompt sets (``builtin:<name>``): (seed, count, split, file, places world?). ``toy-train`` and
#: ``toy-heldout`` are the first world's (the shipped backbone's); the ``toy-places-*`` sets balance kinds.
TOY_PROMPT_SETS = {"toy-train": (1000, 2000, "train", "toy_train.txt", False),
                   "toy-heldout": (2000, 200, "heldout", "toy_heldout.txt", False),
                   "toy-places-train": (3000, 2400, "train", "toy_places_train.txt", True),
                   "toy-places-heldout": (4000, 210, "heldout", "toy_places_heldout.txt", True)}


def toy_prompt_file(name: str) -> str:
    """The text of a bundled toy prompt set: a header comment, then one prompt per line.

    ``toy-train`` keeps each distinct prompt once; the other sets keep their even spread (kinds and object
    counts), so the few small combinations repeat (each line gets its own noise seed)."""
    seed, count, split, _, places = TOY_PROMPT_SETS[name]
    prompts = prompt_set(seed, count, split, places=places)
    if split == "train" and not places:
        prompts = list(dict.fromkeys(prompts))
    call = f"toyworld.prompt_set({seed}, {count}, {split!r}" + (", places=True))" if places else "))")
    world = "toy world (places)" if places else "toy world"
    head = (f"# tpdm-rl {world}, {split} split: {len(prompts)} prompts ({call}; train and held-out sets never "
            "share a combination\n")
    return head + "".join(p + "\n" for p in prompts)
