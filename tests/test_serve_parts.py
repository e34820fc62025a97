"""casam-serve parts without a server: wire format, encoder batcher, client errors, env fix.

No server here: these run without the serve extra (tritonclient only where the client
itself is built) and pin the pieces the Triton tests rely on.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from casam_core.errors import CasamError, InputError, ManifestError
from casam_io.intensity import Intensity
from runtime.preprocess import to_rgb_255
from runtime.prompts import Prompts
from casam_serve.batcher import EncoderBatcher
from casam_serve.process_tree import alive, descendants, end_survivors
from runtime.wire import INPUTS, OUTPUTS, Call, read_request, read_response, request_arrays, response_arrays
from conftest import need


def test_request_round_trip_keeps_predict_arguments(rng):
    image = rng.integers(0, 256, (30, 40), dtype=np.uint8)
    specs = {s.name: s for s in INPUTS}
    box = Prompts.for_image(image.shape, boxes=np.array([1, 2, 20, 25], np.float64))  # a flat 4-vector is one box
    clicks = Prompts.for_image(image.shape, points=np.array([[5, 6], [7, 8]], np.float32), labels=np.array([1, 0]),
                               mask_input=np.full((2, 1, 256, 256), -2.5, np.float32))  # K×2 → K one-point prompts
    for prompts in (box, clicks):
        arrays = request_arrays(Call(image, prompts, task="beta"), Intensity())
        for name, array in arrays.items():
            assert array.ndim == len(specs[name].shape), name
        call = read_request(arrays)
        assert call.image.shape == (30, 40, 1) and np.array_equal(call.image[:, :, 0], image)
        assert call.task == "beta"
        for field in ("boxes", "points", "labels", "mask_input"):
            sent, got = getattr(prompts, field), getattr(call.prompts, field)
            assert (sent is None and got is None) or (got.dtype == np.float32 and np.array_equal(sent, got)), field
    assert call.prompts.points.shape == (2, 1, 2) and call.prompts.labels.tolist() == [[1.0], [0.0]]


def test_deep_images_travel_as_the_uint8_the_server_would_make(rng):
    scan = rng.integers(0, 4096, (20, 24), dtype=np.uint16)
    ct_window = Intensity(mode="window", window=(1000.0, 2000.0))
    for intensity in (Intensity(), ct_window):  # the server's recorded intensity, applied before sending
        wire = request_arrays(Call(scan, Prompts.for_image(scan.shape, boxes=np.array([[0, 0, 5, 5]]))), intensity)["image"]
        assert wire.dtype == np.uint8
        assert np.array_equal(to_rgb_255(wire), to_rgb_255(scan, intensity))
    assert not np.array_equal(to_rgb_255(scan, Intensity()), to_rgb_255(scan, ct_window))
    with pytest.raises(InputError, match="needs an intensity handling"):
        to_rgb_255(scan)  # no silent min-max


@pytest.mark.parametrize(
    "arrays, problem",
    [
        ({"image": np.zeros((4, 4, 3), np.float32)}, "must be uint8"),
        ({"image": np.zeros((4, 4), np.uint8)}, "must have shape ?×?×?"),
        ({"image": np.zeros((4, 4, 3), np.uint8), "boxes": np.zeros((2, 3), np.float32)}, "must have shape ?×4"),
        ({"image": np.zeros((4, 4, 3), np.uint8), "colour": np.zeros(1, np.float32)}, "unknown input"),
        ({"boxes": np.zeros((1, 4), np.float32)}, "'image' is required"),
        ({"image": np.zeros((4, 4, 3), np.uint8), "task": np.array([b"\xff"], dtype=object)}, "not UTF-8"),
        ({"image": np.zeros((4, 4, 3), np.uint8)}, "give at least one box or point prompt"),
        ({"image": np.zeros((4, 4, 3), np.uint8), "boxes": np.array([[5, 5, 1, 1]], np.float32)}, "is inverted"),
        ({"image": np.zeros((4, 4, 3), np.uint8), "boxes": np.array([[0, 0, 2, 2]], np.float32),
          "mask_input": np.zeros((2, 1, 256, 256), np.float32)}, "one per prompt"),
    ],
)
def test_read_request_names_the_problem(arrays, problem):
    with pytest.raises(InputError, match=problem.replace("?", r"\?").replace("(", r"\(")):
        read_request(arrays)


def test_response_round_trip_with_no_warnings_and_no_tasks():
    masks = np.zeros((2, 5, 6), bool)
    masks[0, 1:3, 2:4] = True
    arrays = response_arrays(masks, np.ones((2, 1, 256, 256), np.float32), np.array([0.5, 0.25]), "identity",
                             np.zeros(0, np.float32), np.zeros(0, np.float32), [], [])
    assert set(arrays) == {s.name for s in OUTPUTS}
    fields = read_response({k: v.astype(object) if v.dtype.kind == "S" else v for k, v in arrays.items()})
    assert np.array_equal(fields["masks"], masks) and fields["masks"].dtype == bool
    assert fields["route"] == "identity" and fields["scores"] == {} and fields["warnings"] == []
    assert fields["iou"].tolist() == [0.5, 0.25]


def test_batcher_shares_encoder_runs_and_returns_each_callers_rows():
    """The first caller's run holds the encoder while six others queue: they share the next
    runs, at most four at a time. Events, not delays: the six start once the first run is
    inside ``encode``, and the run is let go once all six are in the queue."""
    calls = []
    running, gate = threading.Event(), threading.Event()

    def encode(batch):
        calls.append(batch.shape[0])
        running.set()
        assert gate.wait(60), "the test never let the first run finish"
        return batch * 10.0

    batcher = EncoderBatcher(encode, max_batch=4)
    results = {}

    def worker(i):
        results[i] = batcher.encode(np.full((1, 2), float(i)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(7)]
    threads[0].start()
    assert running.wait(60), "the first caller's run never started"
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 60
    while batcher._queue.qsize() < 6:  # each waiting caller is one queued job
        assert time.monotonic() < deadline, f"only {batcher._queue.qsize()} of 6 callers queued"
        time.sleep(0.001)
    gate.set()
    for t in threads:
        t.join(60)
    batcher.close()
    assert sorted(results) == list(range(7))
    for i, row in results.items():
        assert row.shape == (1, 2) and np.all(row == 10.0 * i)
    assert calls == [1, 4, 2]  # the six queued callers shared two runs, capped at four
    assert sum(size * runs for size, runs in batcher.batch_sizes.items()) == 7


def test_batcher_failure_reaches_every_waiting_caller_and_it_keeps_working():
    fail = {"on": True}

    def encode(batch):
        if fail["on"]:
            raise RuntimeError("engine exploded")
        return batch

    batcher = EncoderBatcher(encode, max_batch=2)
    with pytest.raises(RuntimeError, match="exploded"):
        batcher.encode(np.zeros((1, 1)))
    fail["on"] = False
    assert batcher.encode(np.ones((1, 1))).tolist() == [[1.0]]
    batcher.close()
    with pytest.raises(CasamError, match="closed"):
        batcher.encode(np.ones((1, 1)))


def test_server_urls():
    from runtime.remote import parse_server_url

    assert parse_server_url("http://10.0.0.5:9000") == ("http", "10.0.0.5:9000")
    assert parse_server_url("grpc://scanner-gw") == ("grpc", "scanner-gw:8001")
    assert parse_server_url("localhost:8000") == ("http", "localhost:8000")
    with pytest.raises(InputError, match="grpc://HOST:PORT"):
        parse_server_url("ftp://host:1")


def test_remote_errors_become_casam_errors_without_the_server_traceback():
    need("tritonclient.http", "serve")
    from runtime.remote import RemotePipeline

    remote = RemotePipeline("http://127.0.0.1:1", ready_timeout_s=0)  # nothing listens: no start-up to wait for
    traceback_text = ("[500] Failed to process the request(s) for model 'casam_0_3', message: Traceback (most recent "
                      "call last):\n  File \"x.py\", line 3, in check\nruntime.errors.InputError: box #1 (5 5 1 1) is "
                      "inverted: give x0 y0 x1 y1\n\nAt:\n  model.py(501): execute\n")
    error = remote._error(traceback_text)
    assert type(error) is InputError and str(error).startswith("box #1 (5 5 1 1) is inverted")
    error = remote._error("[request id: <id_unknown>] inference input 'image' data-type is 'FP32', but model 'casam' expects 'UINT8'")
    assert type(error) is InputError and str(error).startswith("inference input 'image' data-type is 'FP32'")
    assert type(remote._error("x\nruntime.errors.ManifestError: engine sha256 mismatch")) is ManifestError
    image = np.zeros((8, 8), np.uint8)
    with pytest.raises(CasamError, match="cannot reach the casam server"):
        remote.predict(image, Prompts.for_image(image.shape, boxes=np.array([[0, 0, 4, 4]])))


class _Impostor:
    """An HTTP server on 127.0.0.1 (a free port) that answers every request with 200 and
    ``body``: whatever else might listen where a casam server was expected."""

    def __init__(self, body: bytes, content_type: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args) -> None:  # keep the test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "_Impostor":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


IMPOSTORS = [(b"hello", "text/plain"), (b"{}", "application/json"),
             (b"<html><body>It works!</body></html>", "text/html")]


@pytest.mark.parametrize("body, content_type", IMPOSTORS, ids=["hello", "empty-json", "html"])
def test_a_server_that_is_not_casam_is_one_error_naming_the_url(body, content_type, tmp_path):
    """casam-infer --server at a port that answers 200 with garbage: exit 2, one line naming
    the URL, no traceback (issue 26, item 9); the library raises the same CasamError."""
    pytest.importorskip("tritonclient.http")
    from click.testing import CliRunner
    from PIL import Image

    from casam_infer.cli import main
    from runtime.remote import RemotePipeline
    from runtime_support import one_error_line

    Image.fromarray(np.zeros((120, 120), np.uint8)).save(tmp_path / "img.png")
    with _Impostor(body, content_type) as impostor:
        image = np.zeros((8, 8), np.uint8)
        with RemotePipeline(impostor.url, ready_timeout_s=3) as remote:
            with pytest.raises(CasamError, match=f"{impostor.url} did not answer as a casam server"):
                remote.predict(image, Prompts.for_image(image.shape, boxes=np.array([[0, 0, 4, 4]])))
        result = CliRunner().invoke(main, [str(tmp_path / "img.png"), "--box", "10", "10", "100", "100", "--server",
                                           impostor.url, "--server-timeout", "3", "--out", str(tmp_path / "out")])
    line = one_error_line(result)
    assert line.startswith("casam-infer: error: ") and f"{impostor.url} did not answer as a casam server" in line


def test_a_reply_missing_or_mangling_an_output_is_refused():
    good = response_arrays(np.zeros((1, 5, 6), bool), np.ones((1, 1, 256, 256), np.float32), np.array([0.5]), "identity",
                           np.zeros(0, np.float32), np.zeros(0, np.float32), [], [])
    for name, value in (("masks", None), ("iou", np.zeros((1, 1), np.float32)), ("route", np.zeros(1, np.float32))):
        with pytest.raises(CasamError, match=f"output {name!r}"):
            read_response({**good, name: value})


def test_python_libdir_goes_first_once():
    import sysconfig

    from casam_serve.server import python_libdir_first

    libdir = sysconfig.get_config_var("LIBDIR")
    env = {"LD_LIBRARY_PATH": f"/usr/lib/x86_64-linux-gnu:{libdir}:/opt/x"}
    assert python_libdir_first(env) == libdir
    assert env["LD_LIBRARY_PATH"] == f"{libdir}:/usr/lib/x86_64-linux-gnu:/opt/x"
    empty: dict[str, str] = {}
    python_libdir_first(empty)
    assert empty["LD_LIBRARY_PATH"] == libdir


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_processes_that_outlive_the_grace_are_killed_and_the_others_left_to_exit(monkeypatch):
    """casam-serve lists the processes below it before stopping Triton and kills the ones
    still running after the grace period (a Python-backend stub orphaned by Triton's exit
    timeout outlived a SIGTERMed server by over 10 s in the suite).

    No timing: ``quick`` runs until its stdin closes, which happens at the first moment
    ``end_survivors`` waits (its first sleep); so it is alive when the wait begins and gone
    within it, however slow the machine. ``stuck`` ignores SIGTERM and never exits."""
    import casam_serve.process_tree as process_tree

    log = logging.getLogger("test")
    quick = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    stuck = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                              "time.sleep(600)"])
    real_sleep = time.sleep

    def first_wait_ends_quick(seconds: float) -> None:
        if quick.returncode is None:
            assert alive(quick.pid, tree[quick.pid])  # alive when the grace began
            quick.stdin.close()
            quick.wait(timeout=60)
        real_sleep(seconds)

    try:
        tree = descendants(os.getpid())
        assert {quick.pid, stuck.pid} <= set(tree)
        # process_tree's own clock, not the time module every other caller shares
        monkeypatch.setattr(process_tree, "time", SimpleNamespace(monotonic=time.monotonic, sleep=first_wait_ends_quick))
        killed = end_survivors({p: tree[p] for p in (quick.pid, stuck.pid)}, grace_s=0.5, log=log)
        monkeypatch.undo()
        assert killed == [stuck.pid]
        assert stuck.wait(timeout=60) == -signal.SIGKILL and quick.returncode == 0
        assert not alive(stuck.pid, tree[stuck.pid])
    finally:
        for proc in (quick, stuck):
            proc.kill()
            proc.wait()
