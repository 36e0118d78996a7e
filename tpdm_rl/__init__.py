"""tpdm-rl: RL-trained adaptive denoising schedules (TPDM) for diffusion models.

The repository keeps ``rollout/`` and ``rewards/`` beside ``tpdm_rl/``; their import names are
``tpdm_rl.rollout`` and ``tpdm_rl.rewards``. One mechanism makes that so at run time: when this
package is imported from a source tree (its folder has no ``rollout/`` inside and the sibling
folders ``rollout/`` and ``rewards/`` exist), ``_SourceTreeFinder`` below is put first on
``sys.meta_path`` and maps the two names to the siblings of *this* ``tpdm_rl/``. That covers an
editable install, a checkout on ``PYTHONPATH``, a Ray job's uploaded ``working_dir`` (Ray puts it
first on every worker's ``PYTHONPATH``, so the uploaded copy wins over any installed one) and the
Docker image (an editable install of the copy that is also the job's ``working_dir``). A wheel
needs no mapping: the build (``[tool.setuptools.package-dir]`` in pyproject.toml) copies the two
folders into ``tpdm_rl/``, and the finder stays off. docs/design.md ("Source tree and import
names") describes it; tests/test_source_tree.py proves each case.
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
