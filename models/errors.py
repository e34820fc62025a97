"""Errors raised while building or loading torch models."""

from casam_core.errors import CasamError


class UnknownModelError(CasamError, ValueError):
    """A SAM model name that casam does not know."""


class CheckpointError(CasamError):
    """A checkpoint that is missing, unreadable, truncated or does not fit."""


class ShapeError(CasamError, ValueError):
    """A tensor whose shape does not fit the module it is passed to."""
