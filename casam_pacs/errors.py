"""The errors a DICOMweb server's answers become: CasamErrors, so every casam command prints
them as one line and exits 2. Kinds that a caller may treat differently get a class."""

from __future__ import annotations

from casam_core.errors import CasamError, InputError


class PacsError(CasamError):
    """The DICOMweb server could not be reached, or refused or failed a request."""


class AuthenticationError(PacsError):
    """HTTP 401 or 403: the credentials from the environment were refused (or are missing)."""


class NotFoundError(PacsError):
    """A study, series or instance the request named is not on the server."""


class PacsOptionError(InputError):
    """A PACS option or environment variable that cannot be used (checked before any request)."""
