"""The one way casam imports a package that only an extra installs.

The edge runtime installs with numpy, click, Pillow, tqdm and jsonschema alone; NIfTI,
DICOM, OpenVINO, Triton and the rest come with extras. A missing one must say which extra
brings it, in one line, with the error type the caller's layer raises.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

from casam_core.errors import CasamError


def optional_import(module: str, extra: str, feature: str, error: type[Exception] = CasamError,
                    package: Optional[str] = None) -> ModuleType:
    """``import module``, or ``error("<feature> needs <package>: pip install 'casam[<extra>]'")``.

    ``package`` is the name to install when it differs from the module's (``pytriton`` comes
    with ``nvidia-pytriton``); an empty ``extra`` means the base install should have it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        name = package or module.split(".")[0]
        install = f"pip install 'casam[{extra}]'" if extra else f"pip install {name}"
        raise error(f"{feature} needs {name}, which is not installed or cannot load ({exc}): {install}") from exc
