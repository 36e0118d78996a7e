"""The toy world: a grammar of prompts, a seeded scene sampler and an exact renderer.

A scene is 1 to 4 flat-filled shapes (circle, axis-aligned square, upright triangle) in a palette
colour on a plain background, each in its own quadrant of the image, the quadrants filled in reading order
in the order the prompt names the objects. Sizes and offsets lie on a
4-pixel lattice (the VAE's latent grid), so an object's edges fall on latent-pixel boundaries: this is
what lets a denoiser trained for under an hour on 2 CPU cores draw crisp shapes (the first world, with
free offsets in a 3 x 3 grid, left the same recipe drawing blobs). Objects keep at least 8 px apart
and 4 px from the border. Its prompt follows one grammar exactly::

    prompt := group ((", " group)* " and " group)? " on a " bg " background"
    group  := count " " colour " " shape          (count: a | two | three | four; plural shape if > 1)

for example ``two red circles, a blue square and a yellow triangle on a white background``.

Everything a model must get right is in the prompt (counts, colours, shapes, background); what the
prompt leaves open (offsets within a quadrant, sizes) is drawn from the seed. Scenes with more objects use smaller
objects, so complexity (the number of objects and of groups) is known and makes prompts harder.

Train and held-out prompts are disjoint as *combinations* (the background plus the multiset of
groups, whatever their order in the sentence): a held-out prompt names a combination that neither
the toy backbone nor the TPM saw in training.
"""

from __future__ import annotations

import hashlib
import re
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
HELDOUT_PERCENT = 15  # share of combinations held out of every training set
#: every word the grammar can produce (the toy text encoders' vocabulary)
VOCABULARY: tuple[str, ...] = tuple(
    list(COUNTS) + list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES]
    + list(BACKGROUNDS) + ["and", "on", "background", ","])


class PromptError(ValueError):
    """A prompt is outside the toy grammar (one-line message naming the prompt)."""


@dataclass(frozen=True, order=True)
class Group:
    """``count`` objects of one colour and shape."""

    count: int
    colour: str
    shape: str

    def words(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}"


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
    def combination(self) -> str:
        """The order-free identity of the prompt (what train and held-out sets never share)."""
        groups = ";".join(f"{g.count}-{g.colour}-{g.shape}" for g in sorted(self.groups))
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
_GROUP = re.compile(r"^(a|two|three|four) (red|green|blue|yellow|purple|orange) (circle|square|triangle)(s?)$")
_TAIL = re.compile(r"^(.+) on a (black|white|gray) background$")


def parse_prompt(text: str) -> Prompt:
    """Parse a prompt of the toy grammar; anything else raises :class:`PromptError` naming it."""
    def bad(why: str) -> PromptError:
        return PromptError(f"prompt {text!r} is not in the toy grammar ({why}); expected e.g. "
                           "'two red circles, a blue square and a yellow triangle on a white background'")

    m = _TAIL.match(text) if isinstance(text, str) else None
    if m is None:
        raise bad("it must end with ' on a black|white|gray background'")
    head, bg = m.group(1), m.group(2)
    if " and " in head:
        left, last = head.rsplit(" and ", 1)
        items = left.split(", ") + [last]
    else:
        items = [head]
    groups = []
    for item in items:
        g = _GROUP.match(item)
        if g is None:
            raise bad(f"group {item!r} is not 'COUNT COLOUR SHAPE'")
        count, plural = COUNTS[g.group(1)], g.group(4) == "s"
        if plural != (count > 1):
            raise bad(f"group {item!r}: the shape is plural exactly when the count is above one")
        groups.append(Group(count, g.group(2), g.group(3)))
    if len({(g.colour, g.shape) for g in groups}) != len(groups):
        raise bad("two groups share a colour and shape")
    if sum(g.count for g in groups) > MAX_OBJECTS:
        raise bad(f"more than {MAX_OBJECTS} objects")
    prompt = Prompt(tuple(groups), bg)
    if prompt.text != text:
        raise bad("spacing or punctuation differs from the grammar")
    return prompt


# ---------------------------------------------------------------------------- sampling
_PARTITIONS: dict[int, list[tuple[int, ...]]] = {
    1: [(1,)], 2: [(2,), (1, 1)], 3: [(3,), (2, 1), (1, 1, 1)],
    4: [(4,), (3, 1), (2, 2), (2, 1, 1), (1, 1, 1, 1)],
}
_PAIRS = [(c, s) for c in COLOURS for s in SHAPES]


def sample_prompt(rng: np.random.Generator, num_objects: int | None = None, split: str = "train") -> Prompt:
    """A random prompt of the given split (``train``, ``heldout`` or ``any``)."""
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


def layout(prompt: Prompt, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Scene:
    """Place the prompt's objects in the cells in reading order (the k-th object named goes to the k-th
    cell, row by row), sizes from :data:`SIZE_RANGE`, at a random offset on the :data:`LATTICE` that keeps
    ``CELL_MARGIN`` pixels free on every side of the cell (all at 64 px, then scaled to ``size``).

    Reading order makes *where* each named object goes a function of the sentence, as in a caption that
    lists objects left to right: a small denoiser then learns which colour and shape belong together
    (binding) instead of inventing a layout at high noise and drawing a blend of several."""
    scale = size / IMAGE_SIZE
    lo, hi = SIZE_RANGE[prompt.num_objects]
    items = [(g.colour, g.shape) for g in prompt.groups for _ in range(g.count)]
    grid = cells(IMAGE_SIZE)
    placed: list[PlacedObject] = []
    for (colour, shape), cell in zip(items, grid):
        cx, cy, cw, ch = cell
        s = LATTICE * int(rng.integers(lo // LATTICE, hi // LATTICE + 1))
        slots_x = (cw - 2 * CELL_MARGIN - s) // LATTICE + 1
        slots_y = (ch - 2 * CELL_MARGIN - s) // LATTICE + 1
        x0 = cx + CELL_MARGIN + LATTICE * int(rng.integers(0, slots_x))
        y0 = cy + CELL_MARGIN + LATTICE * int(rng.integers(0, slots_y))
        placed.append(PlacedObject(colour, shape, round(x0 * scale), round(y0 * scale), round(s * scale)))
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
                 size: int = IMAGE_SIZE) -> Scene:
    """One scene, a pure function of the seed."""
    rng = np.random.default_rng(seed)
    return layout(sample_prompt(rng, num_objects, split), rng, size)


def prompt_set(seed: int, count: int, split: str, per_complexity: bool = True) -> list[str]:
    """``count`` prompt texts of a split, as evenly spread over 1..4 objects as ``per_complexity`` asks.

    Distinct texts where the split has enough of them (the 1-object held-out level has only a few
    combinations; those repeat and are sampled with different noise seeds).
    """
    rng = np.random.default_rng(seed)
    out: list[str] = []
    levels = [1 + i % MAX_OBJECTS for i in range(count)] if per_complexity else [None] * count
    seen: set[str] = set()
    for n in levels:
        for attempt in range(200):
            text = sample_prompt(rng, n, split).text
            if text not in seen or attempt == 199:
                break
        seen.add(text)
        out.append(text)
    return out


def complexity(text: str) -> tuple[int, int]:
    """(number of objects, number of groups) of a prompt."""
    p = parse_prompt(text)
    return p.num_objects, p.num_groups


#: the bundled prompt sets (``builtin:toy-train`` / ``builtin:toy-heldout``): (seed, count, split, file)
TOY_PROMPT_SETS = {"toy-train": (1000, 2000, "train", "toy_train.txt"),
                   "toy-heldout": (2000, 200, "heldout", "toy_heldout.txt")}


def toy_prompt_file(name: str) -> str:
    """The text of a bundled toy prompt set: a header comment, then one prompt per line.

    ``toy-train`` keeps each distinct prompt once; ``toy-heldout`` keeps its 50 prompts per object
    count, so the few 1-object held-out combinations repeat (each line gets its own noise seed)."""
    seed, count, split, _ = TOY_PROMPT_SETS[name]
    prompts = prompt_set(seed, count, split)
    if split == "train":
        prompts = list(dict.fromkeys(prompts))
    head = (f"# tpdm-rl toy world, {split} split: {len(prompts)} prompts (toyworld.prompt_set({seed}, {count}, "
            f"{split!r})); train and held-out sets never share a combination\n")
    return head + "".join(p + "\n" for p in prompts)
