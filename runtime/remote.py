"""``RemotePipeline``: ``Pipeline.predict`` answered by a casam-serve (Triton) server.

Same call, same ``Result``, so ``casam-infer --server URL`` writes what a local run
writes: the image travels as uint8 (what the local pipeline would make of it anyway, with
the server's recorded intensity, see ``runtime.wire.wire_image``), and masks, IoU, scores
and logits come back exactly. tritonclient is imported on first use, so the plain runtime
does not need it.

Every reply is checked: a server that answers but is not a casam server (a web page, an
empty JSON, anything else on that port) is one CasamError naming the URL, never a
traceback from deep inside the client library.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any, Optional
from urllib.parse import urlsplit

import numpy as np

from casam_io.intensity import Intensity
from casam_core.optional import optional_import
from casam_core.errors import CasamError, InputError, ManifestError
from runtime.manifest import check_task
from runtime.predictor import Capabilities, Result
from runtime.preprocess import Preprocessing
from runtime.prompts import Prompts
from runtime.wire import INFO_MODEL_NAME, MODEL_NAME
from runtime.wire import INPUTS, OUTPUTS, Call, read_response, request_arrays

DEFAULT_PORTS = {"http": 8000, "https": 8000, "grpc": 8001}
_SPECS = {spec.name: spec for spec in INPUTS}
# A CasamError raised in the server's model reaches the client inside a traceback text.
_RAISED = re.compile(r"(?:^|[\s.])(InputError|ManifestError|CasamError): (.+)$")
# Triton's own checks against the model config (wrong dtype, wrong rank, missing input).
_TRITON_INPUT = re.compile(r"(unexpected shape|data-type is|expected \d+ inputs|missing input|unexpected inference input)")
_ERRORS = {"InputError": InputError, "ManifestError": ManifestError, "CasamError": CasamError}
# What tritonclient raises when a reply is not the KServe protocol it expects (a body that
# is not JSON, JSON without the expected keys, binary data of the wrong length, …).
_GARBLED = (ValueError, KeyError, AttributeError, TypeError, IndexError, UnicodeDecodeError)


def parse_server_url(url: str) -> tuple[str, str]:
    """``http://host:port``, ``https://…`` or ``grpc://host:port`` → (scheme, "host:port")."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in DEFAULT_PORTS:
        raise InputError(f"server URL {url!r}: use http://HOST:PORT, https://HOST:PORT or grpc://HOST:PORT")
    if not parts.hostname:
        raise InputError(f"server URL {url!r} has no host")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise InputError(f"server URL {url!r} has a bad port") from exc
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return parts.scheme, f"{host}:{port}"


#: How long a client waits by default for a starting server's models (``--server-timeout``).
DEFAULT_READY_TIMEOUT_S = 60.0
_READY_POLL_S = 0.25


class RemotePipeline:
    """A casam-serve server at ``url``, used like ``runtime.pipeline.Pipeline`` (a
    ``runtime.predictor.Predictor``; it runs whole predictions only, no volumes). Thread-safe.

    Triton answers ``/v2/health/ready`` before casam-serve has loaded its models, so the
    first request waits until both models report ready, up to ``ready_timeout_s``; a server
    still loading after that is reported as such, not as a missing model.
    """

    def __init__(self, url: str, model: str = MODEL_NAME, timeout_s: float = 300.0,
                 ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        self.url = url
        self.scheme, self.address = parse_server_url(url)
        self.model = model
        self.timeout_s = timeout_s
        self.ready_timeout_s = ready_timeout_s
        self._ready = False
        self._client_module, self._server_exception = _tritonclient(self.scheme)
        self._local = threading.local()  # one client per thread: tritonclient's are not shareable
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._info: Optional[dict[str, Any]] = None
        self.capabilities = Capabilities(volumes=False, mask_input=False)

    # ----- what the server holds ----------------------------------------------------------
    def info(self, refresh: bool = False) -> dict[str, Any]:
        """The server's description of its engines (tasks, thresholds, backend, …) and its
        encoder batch statistics; cached unless ``refresh``."""
        if self._info is None or refresh:
            response = self._infer(INFO_MODEL_NAME, [], ["info"])
            self._info = self._checked_info(response)
        return self._info

    def _checked_info(self, response: Any) -> dict[str, Any]:
        """The ``casam_info`` reply → its JSON object, or the CasamError of a server that is not casam's."""
        try:
            info = json.loads(bytes(response.as_numpy("info").reshape(-1)[0]).decode("utf-8"))
            tasks = info["tasks"]
            if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
                raise TypeError("tasks is not a list of names")
            if "preprocessing" in info:
                Preprocessing.from_dict(info["preprocessing"])
            Intensity.from_dict(info.get("intensity"))
        except (*_GARBLED, CasamError) as exc:
            raise self._not_casam(exc) from None
        return info

    def _not_casam(self, exc: BaseException) -> CasamError:
        detail = str(exc).splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        return CasamError(f"{self.url} did not answer as a casam server ({detail}); check the --server URL and port")

    @property
    def task_names(self) -> list[str]:
        return list(self.info()["tasks"])

    @property
    def preprocessing(self) -> Preprocessing:
        """The served engines' preprocessing (servers that predate recording it: the default,
        with the intensity they report, or auto)."""
        info = self.info()
        if isinstance(info.get("preprocessing"), dict):
            return Preprocessing.from_dict(info["preprocessing"])
        return Preprocessing(intensity=Intensity.from_dict(info.get("intensity")))

    def check_task(self, task: str) -> str:
        return check_task(task, self.task_names)

    def describe(self) -> dict[str, Any]:
        return {"backend": "remote", "server": self.url, "protocol": self.scheme, "server_engines": self.info()}

    # ----- prediction ---------------------------------------------------------------------
    def predict(self, image: np.ndarray, prompts: Prompts, task: Optional[str] = None) -> Result:
        """Same arguments and result as ``Pipeline.predict``; ``timings_ms`` holds the round trip."""
        start = time.perf_counter()
        prompts.check_image(np.shape(image))
        if prompts.mask_input is not None and not self.capabilities.mask_input:
            raise InputError("the casam server's decoder takes no previous mask (mask_input); give boxes or points only")
        arrays = request_arrays(Call(image, prompts, task), self.preprocessing.intensity)
        inputs = []
        for name, array in arrays.items():
            tensor = self._client_module.InferInput(name, list(array.shape), _SPECS[name].triton_dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        response = self._infer(self.model, inputs, [spec.name for spec in OUTPUTS])
        try:
            fields = read_response({spec.name: response.as_numpy(spec.name) for spec in OUTPUTS})
        except (*_GARBLED, CasamError) as exc:
            raise self._not_casam(exc) from None
        # The client's own clipping warnings: the server checks the boxes already clipped.
        fields["warnings"] = list(prompts.warnings) + list(fields["warnings"])  # type: ignore[arg-type]
        return Result(timings_ms={"total": (time.perf_counter() - start) * 1000.0}, **fields)  # type: ignore[arg-type]

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    def __enter__(self) -> "RemotePipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----- transport ----------------------------------------------------------------------
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            module = self._client_module
            if self.scheme == "grpc":
                client = module.InferenceServerClient(self.address)
            else:
                client = module.InferenceServerClient(self.address, ssl=self.scheme == "https",
                                                      connection_timeout=self.timeout_s, network_timeout=self.timeout_s)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def wait_until_ready(self) -> None:
        """Return once the server's ``casam`` and ``casam_info`` models are ready; raise
        ``CasamError`` ("still loading", or "cannot reach") after ``ready_timeout_s``."""
        if self._ready:
            return
        deadline = time.monotonic() + self.ready_timeout_s
        models = (self.model, INFO_MODEL_NAME)
        reached, loading = False, list(models)
        while True:
            try:
                client = self._client()
                reached = client.is_server_live()
                loading = [m for m in models if not client.is_model_ready(m)]
                if reached and not loading:
                    self._ready = True
                    return
            except self._server_exception:
                pass  # e.g. "unknown model" while the model repository is still being filled
            except OSError:
                reached = False
            except _GARBLED as exc:  # it answers, but not as a Triton server
                raise self._not_casam(exc) from None
            if time.monotonic() >= deadline:
                break
            time.sleep(_READY_POLL_S)
        if not reached:
            raise CasamError(f"cannot reach the casam server at {self.url} (waited {self.ready_timeout_s:g} s; --server-timeout)")
        raise CasamError(f"server {self.url} is still loading: model(s) {', '.join(loading)} not ready after "
                         f"{self.ready_timeout_s:g} s (--server-timeout)")

    def _infer(self, model: str, inputs: list[Any], outputs: list[str]) -> Any:
        self.wait_until_ready()
        module = self._client_module
        requested = [module.InferRequestedOutput(name, **({} if self.scheme == "grpc" else {"binary_data": True}))
                     for name in outputs]
        kwargs = {"client_timeout": self.timeout_s} if self.scheme == "grpc" else {}
        try:
            return self._client().infer(model, inputs, outputs=requested, **kwargs)
        except self._server_exception as exc:
            raise self._error(exc.message() or str(exc)) from None
        except OSError as exc:  # connection refused, reset, timed out (HTTP)
            raise CasamError(f"cannot reach the casam server at {self.url}: {exc}") from None
        except _GARBLED as exc:  # e.g. a reply that is not JSON: not a casam (Triton) server
            raise self._not_casam(exc) from None

    def _error(self, message: str) -> CasamError:
        """A server error text → the CasamError it stands for, without the server's traceback."""
        for line in reversed(message.splitlines()):
            found = _RAISED.search(line.strip())
            if found:
                return _ERRORS[found.group(1)](found.group(2))
        first = re.sub(r"^(\[\w+\]\s*)*(\[request id: [^]]*\]\s*)?", "", message.strip().splitlines()[0] if message.strip() else "")
        if _TRITON_INPUT.search(first):
            return InputError(first)
        if "unknown model" in message.lower() or "is not found" in message.lower():
            return CasamError(f"server {self.url} is still loading (or serves no casam model): {first}")
        if "unavailable" in message.lower() or "failed to connect" in message.lower():
            return CasamError(f"cannot reach the casam server at {self.url}: {first}")
        return CasamError(f"the casam server at {self.url} failed: {first or message}")


def _tritonclient(scheme: str) -> tuple[Any, type]:
    """(tritonclient.http or .grpc, its server-error type), imported only when used."""
    module = optional_import(f"tritonclient.{'grpc' if scheme == 'grpc' else 'http'}", "serve", "--server")
    return module, optional_import("tritonclient.utils", "serve", "--server").InferenceServerException
