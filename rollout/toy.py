"""The shipped toy backbone as the runtime sees it: where it is, how ``builtin:toy`` names it, its text length.

Why here and not beside the trainer (``tpdm_rl/builders/toy_backbone.py``): a run only needs to find the
trained folder, and the runtime must not import the code that builds it (tests/test_layers.py).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

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
