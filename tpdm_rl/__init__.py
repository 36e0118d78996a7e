"""tpdm-rl: RL-trained adaptive denoising schedules (TPDM) for diffusion models.

The repository keeps ``rollout/`` and ``rewards/`` beside ``tpdm_rl/``; installed (wheel or
editable) they are ``tpdm_rl.rollout`` and ``tpdm_rl.rewards``. When this package is imported
straight from a source tree (for example a Ray job's uploaded working directory placed first on
``sys.path``), the same two names are mapped to the sibling folders, so the code that runs is the
tree's own, whatever else is installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.2.0"

_HERE = Path(__file__).resolve().parent
_SUBPACKAGES = {f"{__name__}.{name}": _HERE.parent / name for name in ("rollout", "rewards")}


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds ``tpdm_rl.rollout`` / ``tpdm_rl.rewards`` in the sibling folders of a source tree."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib protocol
        folder = _SUBPACKAGES.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


if not (_HERE / "rollout").exists() and all((p / "__init__.py").is_file() for p in _SUBPACKAGES.values()):
    sys.meta_path.insert(0, _SourceTreeFinder())
