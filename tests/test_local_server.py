"""casam_core.local_server: the one start-and-wait loop behind casam-infer's local
casam-serve and the suite's casam-label and Orthanc processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from casam_core.local_server import ServerStartError, answers, free_port, stop, wait_until_ready

#: A server that answers 503 on /ready for its first ``delay`` seconds, then 200.
SLOW_SERVER = """
import http.server, sys, time
born = time.monotonic()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        up = time.monotonic() - born > float(sys.argv[2])
        self.send_response(200 if up and self.path == "/ready" else 503)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _start(delay: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    return subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(port), str(delay)]), f"http://127.0.0.1:{port}"


def test_waits_through_refused_connections_and_503_then_returns():
    process, url = _start(delay=1.0)
    try:
        assert not answers(f"{url}/ready")  # nothing listens yet, or it answers 503
        wait_until_ready(process, lambda: answers(f"{url}/ready"), "slow server", timeout_s=60)
        assert answers(f"{url}/ready") and not answers(f"{url}/other")  # 200 only where it answers 200
    finally:
        assert stop(process) is not None
    assert process.poll() is not None


def test_a_server_that_exits_is_reported_at_once_with_its_log():
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    started = time.monotonic()
    with pytest.raises(ServerStartError) as caught:
        wait_until_ready(process, lambda: False, "broken server", timeout_s=120, log=lambda: "line 1\nport in use")
    assert time.monotonic() - started < 60  # not the deadline: the exit is noticed
    message = str(caught.value)
    assert "broken server exited with code 3" in message and message.endswith("line 1\nport in use")


def test_a_server_that_never_gets_ready_is_given_up_at_the_deadline():
    process, url = _start(delay=3600)
    try:
        with pytest.raises(ServerStartError, match="slow server was not ready after 1 s"):
            wait_until_ready(process, lambda: answers(f"{url}/ready"), "slow server", timeout_s=1)
        assert process.poll() is None  # the caller stops what it started
    finally:
        stop(process)
