"""The bundle's error type, in its own module so that every part of the format can raise it."""

from casam_core.errors import CasamError


class BundleError(CasamError):
    """A bundle or task package that is missing, corrupt, tampered with or used inconsistently."""
