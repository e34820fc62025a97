"""Errors of the export stage; the CLI turns each into one line on stderr and exit code 2."""

from casam_core.errors import CasamError


class ExportError(CasamError):
    """The bundle cannot be exported as asked (wrong checkpoint, foreign --out folder …)."""


class ParityError(ExportError):
    """The exported chain disagrees with the PyTorch model beyond the documented bars."""
