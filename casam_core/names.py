"""Task names and the identity route: the one check every stage applies to a name it reads.

A task name becomes a folder (``tasks/<name>/``), a file name (``align/<name>-<sha12>.onnx``) and a key
in JSON, and it is read back from files that may have been edited by hand or shipped by
another site. So the same check runs when a name is given on the command line and when it
is read from ``bundle.json``, ``manifest.json`` or a task package: a name that passes can
never climb out of its folder (no ``/``, no ``..``), hide a control character, or shadow
the identity route.
"""

from __future__ import annotations

import re
from typing import Type

from casam_core.errors import CasamError, InputError

#: The route name of plain SAM (no alignment layer). Reserved: no task may take it.
IDENTITY = "identity"
#: 1-64 characters, letters, digits, '_', '.', '-', starting with a letter or digit.
#: Used with ``re.fullmatch``: ``$`` in ``re.match`` also matches before a final newline.
TASK_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_task_name(name: object, error: Type[CasamError] = InputError, where: str = "") -> str:
    """``name`` when it is an allowed task name, else ``error`` saying why (and ``where`` it was read)."""
    if not _allowed(name) or name == IDENTITY:
        origin = f" in {where}" if where else ""
        raise error(
            f"task name {name!r}{origin} is not allowed: use 1-64 letters, digits, '_', '.' or '-', "
            f"starting with a letter or digit, and not {IDENTITY!r}"
        )
    return name  # type: ignore[return-value]  # _allowed checked it is a str


def check_label_name(name: object, error: Type[CasamError] = InputError) -> str:
    """A structure label's name (an interactive session's labels, a SEG segment): the task
    names' pattern, since it also becomes a JSON key and a file-name part."""
    if not _allowed(name):
        raise error(f"label name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', "
                    "starting with a letter or digit")
    return name  # type: ignore[return-value]


def _allowed(name: object) -> bool:
    return isinstance(name, str) and TASK_NAME_PATTERN.fullmatch(name) is not None
