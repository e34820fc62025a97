"""casam-label: an interactive segmentation server on exported CA-SAM engines.

The cheap checks come first (the bind address against the API keys, the engines folder,
the datastore, the port, the interactive extra), so a mistake costs a second, not an engine
load. The server then starts answering at once: ``/health`` says it is alive and
``/ready`` says 503 until the engines are loaded in the background, then 200. SIGINT and
SIGTERM stop it cleanly: uvicorn finishes the requests in flight and every session is
closed (``SessionStore.shutdown``), which removes the uploads' temporary folders.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import click

from casam_core.cli_frame import CasamCommand
from casam_core.errors import CasamError, InputError
from casam_core.optional import optional_import
from casam_label.datastore import LocalDatastore
from casam_label.dicomweb_datastore import DEFAULT_MAX_CACHE_BYTES, DicomWebDatastore, connect
from runtime.backends import BACKENDS, backends_help
from runtime.backends.ort_heap import server_heap
from runtime.pipeline import Pipeline
from runtime.sessions import SessionStore, StoreOptions

log = logging.getLogger("casam_label")
MIN_KEY = 16
EXTRA = "interactive"

EPILOG = """\b
Examples:
  casam-label --engines casam_engines                      # http://127.0.0.1:8000, this machine only
  casam-label --engines casam_engines --datastore scans/   # open images from a folder by id
  CASAM_DICOMWEB_USER=… CASAM_DICOMWEB_PASSWORD=… casam-label --engines casam_engines \
      --datastore http://127.0.0.1:8042/dicom-web          # a PACS's series; labels go back as SEG
  CASAM_LABEL_API_KEY=$(openssl rand -hex 24) casam-label --engines casam_engines --host 0.0.0.0

\b
Then: 3D Slicer's MONAI Label module, server http://127.0.0.1:8000 (docs/INTERACTIVE.md),
or the native JSON API: curl -F file=@scan.nii.gz http://127.0.0.1:8000/api/sessions
"""


@dataclass(frozen=True)
class LabelOptions:
    """The command line, checked."""

    engines: Path
    datastore: Optional[str]
    host: str
    port: int
    store: StoreOptions
    max_upload_mb: int
    api_keys: tuple[str, ...]
    backend: str
    task: Optional[str]


def is_loopback(host: str) -> bool:
    """True for this machine only: ``localhost``, 127.0.0.0/8, ::1."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_security(host: str, api_keys: tuple[str, ...], insecure: bool) -> None:
    """Refuse to serve beyond this machine without a key, and short or blank keys."""
    for key in api_keys:
        if len(key) < MIN_KEY or any(c.isspace() for c in key):
            raise InputError(f"--api-key must be at least {MIN_KEY} characters without spaces "
                             "(e.g. openssl rand -hex 24)")
    if not is_loopback(host) and not api_keys and not insecure:
        raise InputError(f"--host {host} serves beyond this machine: give --api-key KEY (or $CASAM_LABEL_API_KEY), "
                         "or --insecure to serve without one")


def check_port(host: str, port: int) -> None:
    """The address is free to bind (checked before the engines load)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def open_datastore(spec: Optional[str], ca_bundle: Optional[Path] = None,
                   cache_mb: int = DEFAULT_MAX_CACHE_BYTES >> 20) -> Any:
    """``--datastore``: a local folder, or an http(s) URL: a DICOMweb server (the URL and the
    credentials in the environment are checked, then one request, so a wrong password is one
    line now, before the engines load), whose retrieved series keep to ``cache_mb`` of disk.
    ``--ca-bundle`` goes with a URL only."""
    if spec is None or not spec.lower().startswith(("http://", "https://")):
        if ca_bundle is not None:
            raise InputError("--ca-bundle names the CA of a DICOMweb server: it needs --datastore https://…")
        return None if spec is None else LocalDatastore(Path(spec))
    return DicomWebDatastore(connect(spec, ca_bundle), max_cache_bytes=cache_mb << 20)


def check_engines(engines: Path) -> None:
    if not (engines / "manifest.json").is_file():
        raise InputError(f"--engines {engines} is not a casam-export folder (no manifest.json); "
                         "run casam-export first")


def load_engines(state: Any, opts: LabelOptions, failed: list[BaseException], server: Any) -> None:
    """In the background: open the engines, make the session store, mark the server ready.
    A failure is kept for the main thread and stops the server."""
    try:
        pipe = Pipeline.from_manifest(opts.engines, backend=opts.backend)
        if opts.task is not None:
            pipe.check_task(opts.task)
        state.pipe, state.store = pipe, SessionStore(pipe, opts.store)
        state.ready = True
        log.info("casam-label: engines loaded from %s; ready", opts.engines)
    except BaseException as exc:  # noqa: BLE001 - reported as one line by the CLI frame
        failed.append(exc)
        server.should_exit = True


def reap(state: Any, stop: threading.Event, period_s: float) -> None:
    """Close idle sessions on time (not only when the next request arrives), so an idle
    annotator's upload folder and embeddings go when ``--idle-timeout`` says."""
    while not stop.wait(period_s):
        if state.store is not None:
            try:
                state.store.expire()
            except Exception:  # noqa: BLE001 - a failed sweep is retried at the next period
                log.exception("casam-label: expiring idle sessions failed")


def serve(opts: LabelOptions, insecure: bool, datastore: Any = None) -> None:
    """Start answering now, load the engines behind it, stop cleanly on SIGINT/SIGTERM
    (and remove what a DICOMweb datastore retrieved)."""
    optional_import("fastapi", EXTRA, "casam-label", CasamError)
    optional_import("multipart", EXTRA, "casam-label", CasamError, package="python-multipart")
    uvicorn = optional_import("uvicorn", EXTRA, "casam-label", CasamError)
    app = optional_import("casam_label.app", EXTRA, "casam-label", CasamError, package="fastapi")
    server_heap()

    state = app.ServerState(None, None, app.ServerOptions(api_keys=opts.api_keys, max_upload_mb=opts.max_upload_mb,
                                                  default_task=opts.task), datastore)
    server = uvicorn.Server(uvicorn.Config(app.create_app(state), host=opts.host, port=opts.port, log_level="info",
                                           access_log=False, timeout_graceful_shutdown=10))
    failed: list[BaseException] = []
    threading.Thread(target=load_engines, args=(state, opts, failed, server), daemon=True).start()
    if insecure and not is_loopback(opts.host):
        log.warning("casam-label: serving %s without an API key (--insecure)", opts.host)
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Ours stays behind uvicorn's: uvicorn re-raises a signal it caught once it has shut
        # down, which with the default handler would kill the process before the sessions close.
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    stop = threading.Event()
    period = min(60.0, max(1.0, opts.store.idle_timeout_s / 4))
    threading.Thread(target=reap, args=(state, stop, period), name="casam-reaper", daemon=True).start()
    try:
        server.run()
    finally:
        stop.set()
        if state.store is not None:
            state.store.shutdown()
    if failed:
        raise failed[0] if isinstance(failed[0], CasamError) else CasamError(f"engines failed to load ({failed[0]})")


@click.command("casam-label", cls=CasamCommand, epilog=EPILOG)
@click.option("--engines", type=click.Path(path_type=Path, file_okay=False), required=True, envvar="CASAM_ENGINES",
              help="casam-export folder (or $CASAM_ENGINES).")
@click.option("--datastore", default=None, metavar="DIR|URL",
              help="A folder of images and DICOM series folders that clients open by id (labels saved through "
                   "the API go to DIR/labels/), or a DICOMweb server's root URL: its image series, opened by "
                   "SeriesInstanceUID, labels stored back as DICOM SEG. Credentials from the environment only: "
                   "CASAM_DICOMWEB_USER/CASAM_DICOMWEB_PASSWORD or CASAM_DICOMWEB_TOKEN (docs/PACS.md).")
@click.option("--ca-bundle", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="FILE",
              help="With --datastore https://…: the certificate authority that signed the server's certificate "
                   "(TLS is always verified).")
@click.option("--datastore-cache-mb", type=click.IntRange(min=64), default=DEFAULT_MAX_CACHE_BYTES >> 20,
              show_default=True, help="With --datastore URL: disk kept for series retrieved from the server; past "
              "it the least recently opened are deleted (and retrieved again when opened). One series larger "
              "than this is refused.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but localhost needs --api-key (or --insecure).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--cache-mb", type=click.IntRange(min=4), default=1024, show_default=True,
              help="Memory for cached image embeddings, shared by all sessions (4 MB each; least recently used go).")
@click.option("--idle-timeout", type=click.FloatRange(min=1), default=1800, show_default=True, metavar="SECONDS",
              help="A session unused this long is closed and its upload deleted.")
@click.option("--max-sessions", type=click.IntRange(min=1), default=32, show_default=True,
              help="Sessions open at once; more are refused (429) until one closes or expires.")
@click.option("--max-upload-mb", type=click.IntRange(min=1), default=512, show_default=True,
              help="Largest upload (all files of one request); bigger ones are cut off with 413.")
@click.option("--api-key", "api_keys", multiple=True, envvar="CASAM_LABEL_API_KEY", metavar="KEY",
              help="Require this key (Authorization: Bearer KEY or X-API-Key) on every endpoint but /health; "
                   "repeat for several clients, each seeing only its own sessions. Env: CASAM_LABEL_API_KEY.")
@click.option("--insecure", is_flag=True, help="Allow a non-localhost --host without --api-key.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True, help=backends_help())
@click.option("--task", default=None, metavar="NAME|identity",
              help="Force a task's alignment (or 'identity': plain SAM) for every session instead of routing.")
def main(**params: Any) -> None:
    """Interactive segmentation server: open an image or volume once, then each box, click,
    undo or propagation runs SAM's decoder alone. Serves casam's native JSON API (/api/...),
    and the MONAI Label API for 3D Slicer and OHIF. See docs/INTERACTIVE.md."""
    p = params
    api_keys = tuple(k.strip() for k in p["api_keys"])
    check_security(p["host"], api_keys, p["insecure"])
    check_engines(p["engines"])
    check_port(p["host"], p["port"])
    datastore = open_datastore(p["datastore"], p["ca_bundle"], p["datastore_cache_mb"])
    store = StoreOptions(cache_mb=p["cache_mb"], idle_timeout_s=p["idle_timeout"], max_sessions=p["max_sessions"])
    opts = LabelOptions(p["engines"], p["datastore"], p["host"], p["port"], store, p["max_upload_mb"], api_keys,
                        p["backend"], p["task"])
    try:
        serve(opts, p["insecure"], datastore)
    finally:
        if hasattr(datastore, "close"):
            datastore.close()

if __name__ == "__main__":
    main()
