"""The shipped toy backbone as the runtime sees it: where it is, how ``builtin:toy`` names it, its text length.

Why here and not beside the trainer (``tpdm_rl/builders/toy_backbone.py``): a run only needs to find the
trained folder, and the runtime must not import the code that builds it (tests/test_layers.py).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from tpdm_rl.core.toyworld import PromptError, parse_prompt

#: ``backbone.path`` (and the benchmarks' ``--backbone``) value that selects the shipped trained toy backbone
BUILTIN_TOY = "builtin:toy"
#: the shipped backbone of the places world (prompts may pin objects to quadrants; docs/toy-world.md)
BUILTIN_TOY_PLACES = "builtin:toy-places"
#: ``builtin:`` backbone names and their folders in ``tpdm_rl/data``
SHIPPED_TOY_BACKBONES = {BUILTIN_TOY: "toy_backbone", BUILTIN_TOY_PLACES: "toy_places_backbone"}
#: the file a trained toy backbone folder describes itself in (settings, text length, image size)
TOY_MARKER = "tpdm_toy.json"


def shipped_toy_dir(name: str = BUILTIN_TOY) -> Path:
    """A trained toy backbone that ships inside the package (``builtin:toy`` or ``builtin:toy-places``)."""
    return Path(str(resources.files("tpdm_rl") / "data" / SHIPPED_TOY_BACKBONES[name]))


def toy_backbone_path(path: str) -> str:
    """``builtin:toy`` / ``builtin:toy-places``: the shipped folder; anything else as given."""
    return str(shipped_toy_dir(path)) if path in SHIPPED_TOY_BACKBONES else path


def toy_text_len(directory: str | os.PathLike) -> int:
    """The sequence length a trained toy backbone folder was trained with (its ``tpdm_toy.json``)."""
    return int(json.loads((Path(directory) / TOY_MARKER).read_text())["text_len"])


def builtin_name(path: str | os.PathLike) -> str | None:
    """The ``builtin:`` name of a shipped toy backbone given by name or by its folder, else None.

    A folder counts when it is the shipped one here or ends in ``tpdm_rl/data/<folder>`` (a clone elsewhere, as
    older TPM files recorded it), so TPM files and exports name the backbone portably."""
    text = str(path)
    if text in SHIPPED_TOY_BACKBONES:
        return text
    if not text:
        return None
    parts = Path(text).parts
    for name, folder in SHIPPED_TOY_BACKBONES.items():
        if parts[-3:] == ("tpdm_rl", "data", folder):
            return name
        try:
            if Path(text).resolve() == shipped_toy_dir(name).resolve():
                return name
        except OSError:
            continue
    return None


def toy_world(directory: str | os.PathLike) -> str | None:
    """``reading-order`` or ``places`` for a trained toy backbone folder (or ``builtin:`` name), else None."""
    marker = Path(toy_backbone_path(str(directory))) / TOY_MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return "places" if isinstance(meta, dict) and meta.get("world") == "places" else "reading-order"


def check_toy_prompts(backbone_name: str, prompts: list[str]) -> None:
    """On a toy backbone (``builtin:toy``, ``builtin:toy-places`` or a trained toy folder) every prompt must be in
    its world's grammar: one-line :class:`PromptError` naming the first that is not (other backbones: no check).

    The reading-order world (``builtin:toy``) has no places: its text encoders never saw 'in the top left'."""
    world = toy_world(backbone_name)
    if world is None:
        return
    example = "a red circle on a white background"
    for p in prompts:
        try:
            parsed = parse_prompt(p)
        except PromptError as exc:
            raise PromptError(f"{str(exc).splitlines()[0]}; backbone {backbone_name!r} draws only toy-world prompts, "
                              f"e.g. {example!r} (docs/toy-world.md)") from None
        if world == "reading-order" and any(g.place for g in parsed.groups):
            raise PromptError(f"prompt {p!r} places an object, but backbone {backbone_name!r} draws the "
                              "reading-order world, which has no places; expected a prompt without 'in the ...' or "
                              "the places backbone builtin:toy-places")
