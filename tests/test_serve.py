"""casam-serve end to end: a real Triton (PyTriton) server in a child process, on loopback
with ephemeral ports, serving engines exported from the tiny random bundle.

One server serves the module (start-up costs ~10 s); the SIGTERM test starts its own.
Every test compares the server's answers with a local ``Pipeline`` on the same engines.
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import need
from float32 import SAME_LIBRARY, f32_tol, peak, vae_score_tol
from runtime_support import one_error_line
from casam_core.errors import CasamError, InputError
from runtime.prompts import Prompts
from runtime.remote import RemotePipeline
from runtime.wire import MODEL_NAME
from casam_serve.process import ServerProcess
from casam_serve.process_tree import alive, descendants


def need_triton():
    """PyTriton (the server) and tritonclient (the client), asked for by each test that
    starts or calls a server: a skip without the serve extra, a failure under CI=true."""
    need("pytriton", "serve")
    return need("tritonclient.http", "serve")


@pytest.fixture(scope="module")
def server(engines):
    need_triton()
    with ServerProcess(engines, max_batch=8) as srv:
        yield srv


def cases() -> list[dict]:
    """Requests covering grey and colour images, boxes, points, forced tasks and identity."""
    rng = np.random.default_rng(7)
    grey = rng.integers(0, 256, (180, 240), dtype=np.uint8)
    rgb = rng.integers(0, 256, (200, 150, 3), dtype=np.uint8)
    scan = rng.integers(0, 3000, (128, 128), dtype=np.uint16)
    return [
        dict(image=grey, prompts=Prompts.for_image(grey.shape, boxes=np.array([[10, 20, 200, 150], [0, 0, 60, 60]], np.float32))),
        dict(image=rgb, prompts=Prompts.for_image(rgb.shape, points=np.array([[[30, 40], [100, 120]]], np.float32),
                                                  labels=np.array([[1, 0]]))),
        dict(image=rgb, prompts=Prompts.for_image(rgb.shape, boxes=np.array([[5, 5, 140, 190]], np.float32)), task="beta"),
        dict(image=scan, prompts=Prompts.for_image(scan.shape, boxes=np.array([[-10, 10, 90, 140]], np.float32)),
             task="identity"),  # clipped box
    ]


def assert_same(remote, local, exact: bool = True) -> None:
    """Same route and identical masks; floats bit-equal when the server encoded the image
    alone, and equal to float32 rounding when it shared a batched encoder run (a batch
    changes the encoder's summation order, not its result)."""
    assert remote.route == local.route
    assert remote.masks.dtype == bool and np.array_equal(remote.masks, local.masks)
    assert remote.thresholds == local.thresholds and remote.warnings == local.warnings
    # Batched: one library, the encoder's sums over 64×64 tokens in another order.
    def tol(reference, scores: bool = False) -> dict:
        bound = vae_score_tol(reference, k=SAME_LIBRARY) if scores else f32_tol(peak(reference), n=64 * 64)
        return {"rtol": 0, "atol": 0 if exact else bound}
    np.testing.assert_allclose(remote.iou, local.iou, **tol(local.iou))
    np.testing.assert_allclose(remote.low_res_logits, local.low_res_logits, **tol(local.low_res_logits))
    assert list(remote.scores) == list(local.scores)
    local_scores = list(local.scores.values())
    np.testing.assert_allclose(list(remote.scores.values()), local_scores, **tol(local_scores, scores=True))


@pytest.fixture(scope="module")
def expected(pipe):
    return [pipe.predict(**case) for case in cases()]


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_remote_equals_local(server, expected, scheme):
    url = server.http_url if scheme == "http" else server.grpc_url
    with RemotePipeline(url) as remote:
        assert remote.task_names == ["alpha", "beta"]
        for case, want in zip(cases(), expected):
            assert_same(remote.predict(**case), want)
    assert {r.route for r in expected} >= {"beta", "identity"}
    assert any(r.warnings for r in expected)


def test_eight_clients_twenty_requests_each(server, expected):
    all_cases = cases()
    remote_http, remote_grpc = RemotePipeline(server.http_url), RemotePipeline(server.grpc_url)

    def client(worker: int) -> int:
        remote = remote_http if worker % 2 else remote_grpc  # one client object per protocol, shared by threads
        for i in range(20):
            k = (worker + i) % len(all_cases)
            assert_same(remote.predict(**all_cases[k]), expected[k], exact=False)
        return 20

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(client, range(8))) == 160
    batches = remote_http.info(refresh=True)["encoder_batches"]
    remote_http.close()
    remote_grpc.close()
    assert sum(int(size) * runs for size, runs in batches.items()) >= 160
    assert max(int(size) for size in batches) > 1, f"concurrent requests never shared an encoder run: {batches}"


def _raw_infer(server, image: np.ndarray, dtype: str):
    tritonclient_http = need_triton()
    client = tritonclient_http.InferenceServerClient(f"{server.host}:{server.http_port}")
    tensor = tritonclient_http.InferInput("image", list(image.shape), dtype)
    tensor.set_data_from_numpy(image)
    boxes = tritonclient_http.InferInput("boxes", [1, 4], "FP32")
    boxes.set_data_from_numpy(np.array([[1, 1, 5, 5]], np.float32))
    try:
        return client.infer("casam", [tensor, boxes])
    finally:
        client.close()


def test_bad_requests_get_errors_and_the_server_keeps_serving(server, expected):
    case, want = cases()[0], expected[0]
    with RemotePipeline(server.http_url) as remote:
        assert_same(remote.predict(**case), want)
        with pytest.raises(InputError, match=r"box #1 \(200 150 10 20\) is inverted"):
            remote.predict(case["image"], Prompts.for_image(case["image"].shape,
                                                            boxes=np.array([[200, 150, 10, 20]], np.float32)))
        assert_same(remote.predict(**case), want)
        with pytest.raises(InputError, match="unknown task 'gamma'"):
            remote.predict(case["image"], case["prompts"], task="gamma")
        with pytest.raises(need_triton().InferenceServerException, match="FP32.*UINT8|UINT8.*FP32"):
            _raw_infer(server, np.zeros((8, 8, 3), np.float32), "FP32")
        with pytest.raises(need_triton().InferenceServerException, match="unexpected shape for input 'image'"):
            _raw_infer(server, np.zeros((8, 8), np.uint8), "UINT8")
        assert_same(remote.predict(**case), want)


def test_casam_infer_with_server_writes_what_a_local_run_writes(server, engines, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from casam_infer.cli import main

    image = tmp_path / "scan.png"
    Image.fromarray(cases()[1]["image"]).save(image)
    args = [str(image), "--box", "10", "20", "120", "180", "--box", "0", "0", "50", "50", "--json"]
    runner = CliRunner()
    local_run = runner.invoke(main, [*args, "--engines", str(engines), "--backend", "ort-cpu", "--out", str(tmp_path / "local")])
    remote_run = runner.invoke(main, [*args, "--server", server.grpc_url, "--out", str(tmp_path / "remote")])
    assert local_run.exit_code == 0, local_run.output
    assert remote_run.exit_code == 0, remote_run.output
    local_record, remote_record = json.loads(local_run.stdout), json.loads(remote_run.stdout)
    for key in ("route", "scores", "thresholds", "prompts", "warnings", "size"):
        assert remote_record[key] == local_record[key], key
    assert remote_record["backend"]["backend"] == "remote"
    for name in ("scan_mask0.png", "scan_mask1.png"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    bad = runner.invoke(main, [str(image), "--box", "9", "9", "1", "1", "--server", server.http_url, "--out", str(tmp_path / "bad")])
    assert "is inverted" in one_error_line(bad)


def _command(pid: int) -> str:
    """A process's command line (for messages), or "?" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def test_request_at_first_health_ready_is_answered_and_sigterm_stops_without_orphans(engines, expected):
    """One fresh server (its start-up is what costs) for two guarantees.

    Readiness: Triton's /v2/health/ready turns 200 before casam-serve's models are loaded.
    A request sent that very moment is still answered (the client waits for the models,
    up to --server-timeout); one that may not wait hears "still loading".
    Shutdown: SIGTERM stops the server within ten seconds and leaves no process behind.
    """
    need_triton()
    srv = ServerProcess(engines, max_batch=2).start(wait_for=("health",))
    try:
        assert not srv._ready(f"models/{MODEL_NAME}"), "the models were loaded before health/ready: no window to test"
        with pytest.raises(CasamError, match=rf"server {srv.http_url} is still loading: model\(s\) casam"):
            RemotePipeline(srv.http_url, ready_timeout_s=0).predict(**cases()[0])
        with RemotePipeline(srv.http_url, ready_timeout_s=120) as remote:
            assert_same(remote.predict(**cases()[0]), expected[0])
        children = descendants(srv.process.pid)
        assert any("tritonserver" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                   for p in children if alive(p, children[p]))
        commands = {p: _command(p) for p in children}
        t0 = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        code = srv.process.wait(timeout=10)
        elapsed = time.monotonic() - t0
        # casam-serve ends what outlives Triton before it exits (casam_serve/process_tree.py);
        # the moments allowed here are for the kernel to reap the last of them.
        deadline = time.monotonic() + 2
        while any(alive(p, s) for p, s in children.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = {p: commands.get(p, "?") for p, s in children.items() if alive(p, s)}
        assert code == 0, srv.log_tail()
        assert elapsed < 10
        assert not orphans, f"left running after SIGTERM: {orphans}"
        assert not list(Path("/dev/shm").glob(f"pytrtion{srv.process.pid}-*")), "shared memory left behind"
        assert "listening on" in srv.log_path.read_text()
    finally:
        srv.close()


def test_sigkill_leaves_no_process_of_its_tree(engines):
    """SIGKILL gives casam-serve no chance to stop Triton; its watchdog (casam_serve/watchdog.py)
    ends the tree instead: no process of it, Python-backend stubs included, runs 5 s later."""
    srv = ServerProcess(engines, max_batch=2).start()
    try:
        watchdog_and_tree = descendants(srv.process.pid)
        commands = {p: _command(p) for p in watchdog_and_tree}
        assert any("triton_python_backend_stub" in c for c in commands.values()), commands
        srv.process.send_signal(signal.SIGKILL)
        srv.process.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(alive(p, s) for p, s in watchdog_and_tree.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = {p: commands.get(p, "?") for p, s in watchdog_and_tree.items() if alive(p, s)}
        assert not orphans, f"left running after SIGKILL: {orphans}"
        assert not list(Path("/dev/shm").glob(f"pytrtion{srv.process.pid}-*")), "shared memory left behind"
    finally:
        srv.close()


def test_casam_infer_concurrency_keeps_input_order_and_reports_failures(server, tmp_path):
    """--concurrency 4 against the server writes what a sequential run writes, in the same
    order; a corrupt image is reported, the others go on, and the run exits 2 (issue 14).
    --fail-fast stops there: nothing after the corrupt image is written."""
    from click.testing import CliRunner
    from PIL import Image

    from casam_infer.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(6):  # sizes differ so the records differ
        Image.fromarray(rng.integers(0, 256, (90 + 10 * i, 120, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    (folder / "im3.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    runner = CliRunner()

    def infer(name: str, *extra: str):
        args = [str(folder), "--box", "10", "10", "80", "70", "--json", "--server", server.grpc_url,
                "--out", str(tmp_path / name), *extra]
        return runner.invoke(main, args)

    one, four = infer("one", "--concurrency", "1"), infer("four", "--concurrency", "4")
    for run in (one, four):
        assert run.exit_code == 2 and "Traceback" not in run.output
        assert "im3.png" in run.stderr and "1 of 6 images failed" in run.stderr
    records = [[json.loads(line) for line in r.stdout.splitlines()] for r in (one, four)]
    assert [Path(r["image"]).name for r in records[1]] == [f"im{i}.png" for i in (0, 1, 2, 4, 5)]
    for a, b in zip(*records):
        for key in ("image", "size", "route", "thresholds", "warnings", "overlay"):
            assert a[key] == b[key], key
        assert [(p["mask"], p["area"], p["box"]) for p in a["prompts"]] == [(p["mask"], p["area"], p["box"]) for p in b["prompts"]]
        # IoU heads and scores to float32 rounding, as in assert_same: a shared (batched)
        # encoder run changes the summation order over the 64×64 tokens, not the result.
        ious = [p["iou"] for p in a["prompts"]]
        np.testing.assert_allclose(ious, [p["iou"] for p in b["prompts"]], rtol=0, atol=f32_tol(peak(ious), n=64 * 64))
        scores = list(a["scores"].values())
        np.testing.assert_allclose(scores, list(b["scores"].values()), rtol=0, atol=vae_score_tol(scores, k=SAME_LIBRARY))
    for i in (0, 1, 2, 4, 5):
        assert (tmp_path / "four" / f"im{i}_mask0.png").read_bytes() == (tmp_path / "one" / f"im{i}_mask0.png").read_bytes()
    fast = infer("fast", "--concurrency", "4", "--fail-fast")
    assert fast.exit_code == 2 and len(fast.stdout.splitlines()) == 3
    assert not (tmp_path / "fast" / "im4_mask0.png").exists()
