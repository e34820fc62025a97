"""A DICOMweb connection: its settings, its credentials, and the one place requests are made.

Credentials come from the environment only, never from the command line (where ``ps``, shell
history and CI logs would show them): ``CASAM_DICOMWEB_USER`` and ``CASAM_DICOMWEB_PASSWORD``
for HTTP basic authentication, or ``CASAM_DICOMWEB_TOKEN`` for a bearer token. TLS is
verified by default (``ca_bundle`` names a private CA's certificate file); there is no switch
to turn verification off.

Every request goes through ``DicomWeb.call``: transient failures (a refused or reset
connection, a timeout, HTTP 429 and 5xx) are retried ``retries`` times with exponential
back-off, and whatever still fails becomes one PacsError line that names what was being
done, the server and the HTTP status (401/403 named as an authentication failure, 404 as
something not found). Cheap checks (URL form, UID syntax, environment) run before any request.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar
from urllib.parse import urlsplit

from casam_core.cli_frame import one_line
from casam_core.optional import optional_import
from casam_pacs.errors import AuthenticationError, NotFoundError, PacsError, PacsOptionError

ENV_USER = "CASAM_DICOMWEB_USER"
ENV_PASSWORD = "CASAM_DICOMWEB_PASSWORD"
ENV_TOKEN = "CASAM_DICOMWEB_TOKEN"
EXTRA = "pacs"
#: A DICOM UID: dot-separated numbers, no leading zero in a component, at most 64 characters (PS3.5 9.1).
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})
T = TypeVar("T")


@dataclass(frozen=True)
class Credentials:
    """HTTP basic (user, password) or a bearer token, read from the environment."""

    user: Optional[str] = None
    password: Optional[str] = None
    token: Optional[str] = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Credentials":
        """The credentials the environment gives (none is fine: an open server needs none).
        Half a basic pair, or both kinds at once, is refused: a typo should not silently send
        no credentials and end in a 401 that looks like a wrong password."""
        user, password, token = (env.get(k) or None for k in (ENV_USER, ENV_PASSWORD, ENV_TOKEN))
        if token is not None and (user is not None or password is not None):
            raise PacsOptionError(f"set either {ENV_TOKEN} (bearer) or {ENV_USER} and {ENV_PASSWORD} (basic), not both")
        if (user is None) != (password is None):
            given, absent = (ENV_USER, ENV_PASSWORD) if user is not None else (ENV_PASSWORD, ENV_USER)
            raise PacsOptionError(f"{given} is set but {absent} is not: HTTP basic authentication needs both")
        return cls(user, password, token)

    def describe(self) -> str:
        """Which credentials were sent, for an authentication error (never their values)."""
        if self.token is not None:
            return f"the bearer token in {ENV_TOKEN}"
        if self.user is not None:
            return f"user {self.user!r} from {ENV_USER}/{ENV_PASSWORD}"
        return f"no credentials (set {ENV_USER}/{ENV_PASSWORD} or {ENV_TOKEN})"


@dataclass(frozen=True)
class Connection:
    """Where the DICOMweb service is and how to talk to it."""

    url: str
    ca_bundle: Optional[Path] = None
    retries: int = 3  # after the first attempt: 0.5 s, 1 s, 2 s of back-off
    backoff_s: float = 0.5
    timeout_s: float = 60.0

    def checked(self) -> "Connection":
        """This connection with its URL normalised, refused in one line when unusable."""
        return Connection(check_url(self.url), check_ca_bundle(self.ca_bundle), self.retries, self.backoff_s,
                          self.timeout_s)


def check_url(url: str) -> str:
    """An http(s) URL with a host and no credentials, query or fragment, without its trailing '/'."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsOptionError(f"--dicomweb {url!r} is not an http:// or https:// URL with a host "
                              "(e.g. http://127.0.0.1:8042/dicom-web)")
    if parts.username is not None or parts.password is not None:
        raise PacsOptionError(f"--dicomweb must not hold credentials: set {ENV_USER}/{ENV_PASSWORD} or {ENV_TOKEN}")
    if parts.query or parts.fragment:
        raise PacsOptionError(f"--dicomweb {url!r} has a query or fragment; give the DICOMweb root only")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise PacsOptionError(f"--dicomweb {url!r}: {exc}") from exc
    return url.rstrip("/")


def check_ca_bundle(path: Optional[Path]) -> Optional[Path]:
    if path is not None and not path.is_file():
        raise PacsOptionError(f"--ca-bundle {path} is not a file")
    return path


def check_uid(uid: str, what: str, error: type[Exception] = PacsOptionError) -> str:
    """A syntactically valid DICOM UID, or one line naming what gave it. UIDs a server sends
    are checked too (with ``error=PacsError``): they become folder and file names."""
    if not isinstance(uid, str) or len(uid) > 64 or not UID_PATTERN.match(uid):
        raise error(f"{what} {uid!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return uid


class DicomWeb:
    """An opened DICOMweb client (``dicomweb_client.DICOMwebClient`` on a ``requests`` session
    that carries the credentials and the TLS settings)."""

    def __init__(self, connection: Connection, credentials: Credentials,
                 sleep: Optional[Callable[[float], None]] = None):
        dwc = optional_import("dicomweb_client", EXTRA, "--dicomweb", PacsOptionError, package="dicomweb-client")
        self.requests = optional_import("requests", EXTRA, "--dicomweb", PacsOptionError)
        self.connection, self.credentials = connection, credentials
        self._sleep = sleep or (lambda seconds: time.sleep(seconds))
        session = self.requests.Session()
        if connection.ca_bundle is not None:
            # Not session.verify: requests lets $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE override a
            # session's verify setting, so a machine-wide bundle would silently replace --ca-bundle.
            adapter = _pinned_ca_adapter(self.requests, connection.ca_bundle)
            session.mount("https://", adapter)
        headers = {}
        if credentials.token is not None:
            headers["Authorization"] = f"Bearer {credentials.token}"
        elif credentials.user is not None:
            session.auth = (credentials.user, credentials.password)
        self.client = dwc.DICOMwebClient(connection.url, session=session, headers=headers,
                                         timeout=connection.timeout_s)
        self.client.set_http_retry_params(retry=False)  # one retry policy: ours, below

    def call(self, what: str, request: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``request(*args, **kwargs)``, retried while it fails transiently; any failure left
        becomes one PacsError line starting with ``what``."""
        for attempt in range(self.connection.retries + 1):
            try:
                return request(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every failure is classified below
                if attempt < self.connection.retries and self._transient(exc):
                    self._sleep(self.connection.backoff_s * 2 ** attempt)
                    continue
                raise self._error(what, exc, attempt + 1) from exc
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _transient(self, exc: Exception) -> bool:
        r = self.requests.exceptions
        if isinstance(exc, r.SSLError):
            return False  # a certificate problem does not go away by asking again
        if isinstance(exc, (r.ConnectionError, r.Timeout, r.ChunkedEncodingError)):
            return True
        return isinstance(exc, r.HTTPError) and _status(exc) in RETRIED_STATUS

    def _error(self, what: str, exc: Exception, attempts: int) -> PacsError:
        """One line for ``exc``: the kind of failure, the server, and what to do."""
        r, url = self.requests.exceptions, self.connection.url
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        status = _status(exc) if isinstance(exc, r.HTTPError) else None
        if status in (401, 403):
            return AuthenticationError(f"{what}: authentication failed at {url} (HTTP {status}) with "
                                       f"{self.credentials.describe()}")
        if status == 404:
            return NotFoundError(f"{what}: not found at {url} (HTTP 404)")
        if status is not None:
            return PacsError(f"{what}: {url} answered HTTP {status} {_reason(exc)}{tries}".rstrip())
        if isinstance(exc, r.SSLError):
            return PacsError(f"{what}: TLS verification of {url} failed ({_root_cause(exc)}); --ca-bundle FILE names "
                             "the certificate authority that signed the server's certificate")
        if isinstance(exc, (r.ConnectionError, r.Timeout, r.ChunkedEncodingError)):
            return PacsError(f"{what}: cannot reach {url}{tries}: {_root_cause(exc)}")
        if isinstance(exc, PacsError):
            return exc
        return PacsError(f"{what}: unusable answer from {url}: {one_line(exc)}")


def _pinned_ca_adapter(requests: Any, ca_bundle: Path) -> Any:
    """An HTTPS adapter that verifies against ``ca_bundle`` whatever ``verify`` a request
    arrives with (a certificate check can be narrowed to this CA, never switched off)."""

    class PinnedCaAdapter(requests.adapters.HTTPAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:
            kwargs["verify"] = str(ca_bundle)
            return super().send(request, **kwargs)

    return PinnedCaAdapter()


def _status(exc: Any) -> Optional[int]:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _reason(exc: Any) -> str:
    response = getattr(exc, "response", None)
    return str(getattr(response, "reason", "") or "")


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests/urllib3 connection error (e.g. 'Connection refused'),
    not the three nested wrappers requests puts around it."""
    inner: BaseException = exc
    seen = set()
    while id(inner) not in seen:
        seen.add(id(inner))
        nested = inner.args[0] if inner.args and isinstance(inner.args[0], BaseException) else None
        nested = nested or getattr(inner, "reason", None) or inner.__cause__ or inner.__context__
        if not isinstance(nested, BaseException):
            break
        inner = nested
    text = one_line(inner)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return match.group(1).strip() if match else text
