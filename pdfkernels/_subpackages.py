"""Where ``pdfkernels.models``, ``.train``, ``.bench`` and ``.integrations`` come from.

The repository keeps them as top-level folders (``models/``, ``train/``, ``bench/``, ``integrations/``), but
they import only under the ``pdfkernels`` namespace, so that no generic top-level name (``train`` is VLM2Vec's own
``train.py``) collides with a user's project. A built wheel holds them inside the package (pyproject's
``package-dir``) and setuptools' editable install maps them; in a plain source checkout (``PYTHONPATH`` at
the repository, ``python train/run.py``) this finder maps the four names onto the folders beside the
package. It acts only in a checkout (a ``pyproject.toml`` beside the package), never in site-packages.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

SUBPACKAGES = ("models", "train", "bench", "integrations")
_ROOT = Path(__file__).resolve().parent.parent


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        parent, _, name = fullname.partition(".")
        if parent != "pdfkernels" or name not in SUBPACKAGES:
            return None
        init = _ROOT / name / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def install() -> None:
    """First on ``sys.meta_path`` in a checkout, so the subpackages come from the same tree as this package
    (an editable install of another checkout would otherwise win)."""
    if (_ROOT / "pyproject.toml").is_file() and not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFinder())
