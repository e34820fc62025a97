"""User-facing errors shared by every casam stage.

They live in the torch-free runtime so that the edge package can raise them too; the
command-line tools turn any ``CasamError`` into one clear line and exit code 2.
"""


class CasamError(Exception):
    """Base class: the message says what is wrong and, where possible, what to do."""


class InputError(CasamError, ValueError):
    """An image, prompt or option the user gave cannot be used."""


class ManifestError(CasamError):
    """An export folder whose manifest or engine files cannot be trusted."""


class SessionError(InputError):
    """An interactive session that cannot be used: unknown, expired, another client's, or
    one too many. Servers answer it with ``status`` (404, or 429 for the session limit)
    and never say whether an id exists for someone else."""

    status = 404


class SessionLimitError(SessionError):
    """No room for another session (``casam-label --max-sessions``)."""

    status = 429
