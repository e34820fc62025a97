"""The one place that imports segment-anything.

segment-anything 1.0's package ``__init__`` imports its predictor and automatic mask
generator, which import torchvision. Where only a CUDA torchvision wheel exists (or none),
that import fails even though the model classes never touch torchvision. We therefore
register an empty package spec for ``segment_anything`` and load only the ``modeling``
and ``build_sam`` submodules, which depend on torch alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType


def _register_package_without_init() -> None:
    if "segment_anything" in sys.modules:
        return
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "segment-anything is not installed; install casam with the 'train' extra: "
            "pip install 'casam[train]'"
        )
    package = importlib.util.module_from_spec(spec)
    # Keep the package's search path so submodules resolve, but never execute __init__.py.
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["segment_anything"] = package


def load_modeling() -> ModuleType:
    """Return ``segment_anything.modeling`` without running the package ``__init__``."""
    _register_package_without_init()
    return importlib.import_module("segment_anything.modeling")


def load_build_sam() -> ModuleType:
    """Return ``segment_anything.build_sam`` without running the package ``__init__``."""
    _register_package_without_init()
    return importlib.import_module("segment_anything.build_sam")
