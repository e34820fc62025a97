"""The casam-label command: its cheap refusals before any engine loads, and one real server
process on 127.0.0.1 driven over HTTP (upload, box, NDJSON propagation, result), stopped
with SIGTERM and cleaned up."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from casam_label.cli import main
from label_support import label_server
from runtime_support import one_error_line

nib = pytest.importorskip("nibabel")
httpx = pytest.importorskip("httpx")

KEY = "k" * 32


def run_cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_binding_beyond_localhost_without_a_key_is_refused_before_the_engines(host, tmp_path):
    result = run_cli("--engines", tmp_path / "no-engines-here", "--host", host)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "--api-key" in line and "--insecure" in line


def test_a_short_key_or_a_dicomweb_datastore_or_no_engines_is_one_line(engines, tmp_path):
    short = run_cli("--engines", engines, "--api-key", "short")
    assert short.exit_code == 2 and "at least 16" in one_error_line(short)
    url = run_cli("--engines", engines, "--datastore", "https://user:secret@pacs.example/dicom-web")
    assert url.exit_code == 2 and "must not hold credentials" in one_error_line(url)  # checked before any request
    none = run_cli("--engines", tmp_path)
    assert none.exit_code == 2 and "manifest.json" in one_error_line(none)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = run_cli("--engines", engines, "--port", busy.getsockname()[1])
    assert taken.exit_code == 2 and "cannot listen" in one_error_line(taken)


def test_the_help_explains_the_command():
    result = run_cli("--help")
    assert result.exit_code == 0
    for words in ("--api-key", "--max-upload-mb", "--datastore", "MONAI Label", "CASAM_LABEL_API_KEY"):
        assert words in result.output


@pytest.fixture
def server(engines, tmp_path):
    """casam-label with an API key, its TMPDIR in the test's folder (to see its uploads)."""
    with label_server(engines, tmp_path / "server.log", ["--task", "alpha", "--max-upload-mb", "8"],
                      env={"CASAM_LABEL_API_KEY": KEY, "TMPDIR": str(tmp_path)},
                      headers={"Authorization": f"Bearer {KEY}"}, cwd=tmp_path) as running:
        yield running


def test_a_real_server_process_serves_a_session_end_to_end(server, tmp_path):
    from nibabel.testing import data_path

    url, process = server
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{url}/api/info", timeout=30).status_code == 401
    assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}
    data = (Path(data_path) / "anatomical.nii").read_bytes()
    opened = httpx.post(f"{url}/api/sessions", files={"file": ("anatomical.nii", data)}, headers=auth, timeout=300)
    assert opened.status_code == 201, opened.text
    sid = opened.json()["session_id"]
    assert len(list(tmp_path.glob("casam-upload-*"))) == 1  # the memory-mapped upload, in the server's TMPDIR
    boxed = httpx.post(f"{url}/api/sessions/{sid}/interact", headers=auth, timeout=300,
                       json={"action": "box", "label": "organ", "slice": 12, "box": [6, 6, 26, 34]})
    assert boxed.status_code == 200 and boxed.json()["route"]["task"] == "alpha"
    with httpx.stream("POST", f"{url}/api/sessions/{sid}/propagate", json={"label": "organ", "slice": 12},
                      headers={**auth, "Accept": "application/x-ndjson"}, timeout=600) as stream:
        lines = [json.loads(line) for line in stream.iter_lines() if line]
    assert "progress" in lines[0] and "result" in lines[-1]
    nifti = httpx.get(f"{url}/api/sessions/{sid}/result", params={"format": "nifti"}, headers=auth, timeout=120)
    labels = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(nifti.content)).dataobj)
    assert labels.shape == (33, 41, 25) and set(np.unique(labels)) == {0, 1}
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0  # a clean stop
    assert list(tmp_path.glob("casam-upload-*")) == []  # and shutdown closed the session, removing its upload


def test_the_reaper_closes_idle_sessions_without_waiting_for_a_request(pipe, tmp_path):
    from casam_io.intensity import Source
    from casam_io.scan import Scan
    from casam_label.cli import reap
    from runtime.sessions import SessionSource, SessionStore, StoreOptions

    class Once:
        """A stop event whose first wait times out (one sweep), then says stop."""

        def __init__(self) -> None:
            self.waits = 0

        def wait(self, _: float) -> bool:
            self.waits += 1
            return self.waits > 1

    now = [0.0]
    store = SessionStore(pipe, StoreOptions(cache_mb=16, idle_timeout_s=60, prefetch=False), clock=lambda: now[0])
    released = []
    source = SessionSource.open(Scan(Path("p.png"), np.zeros((8, 8, 3), np.uint8), Source(kind="image")),
                                pipe.preprocessing)
    source.cleanup = lambda: released.append(True)
    store.create(source)

    class State:
        pass

    state = State()
    state.store = store
    now[0] = 61.0
    reap(state, Once(), 0.0)
    assert len(store) == 0 and released == [True]
    store.shutdown()


def test_the_server_heap_is_applied_unless_the_operator_set_it():
    """casam-label's heap settings (server_heap: two arenas, 1 MB mmap threshold) kept the
    8-annotator load's growth bounded (BENCHMARKS.md, "bench/interactive_latency.py"); an
    operator's own MALLOC_ARENA_MAX and MALLOC_MMAP_THRESHOLD_ win. In a child process, so
    this test process keeps glibc's defaults."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    probe = "from casam_label.cli import server_heap; print(server_heap())"
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_")}
    clean["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])

    def applied(env: dict) -> str:
        return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert applied(clean) == "True"
    assert applied({**clean, "MALLOC_ARENA_MAX": "4", "MALLOC_MMAP_THRESHOLD_": "65536"}) == "False"
