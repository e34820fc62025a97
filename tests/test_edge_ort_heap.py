"""glibc heap settings around onnxruntime loads (runtime/backends/ort_heap.py)."""

import contextlib

import pytest

from casam_core.errors import ManifestError
from runtime.backends import ort_heap
from runtime.backends.ort import OrtBackend


class Recorder:
    """Stands in for glibc: records mallopt and malloc_trim calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = Recorder()
    monkeypatch.setattr(ort_heap, "_STATE", {"libc": fake})
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    return fake


def test_a_load_maps_its_buffers_then_trims_and_settles(libc):
    with pytest.raises(RuntimeError):
        with ort_heap.loading():
            assert libc.calls == [("mallopt", ort_heap.M_MMAP_THRESHOLD, ort_heap.LOAD_MMAP_THRESHOLD)]
            raise RuntimeError("a failed load restores the thresholds too")
    assert libc.calls[1:] == [("trim", 0),
                              ("mallopt", ort_heap.M_MMAP_THRESHOLD, ort_heap.STEADY_MMAP_THRESHOLD),
                              ("mallopt", ort_heap.M_TRIM_THRESHOLD, 2 * ort_heap.STEADY_MMAP_THRESHOLD)]


def test_a_server_caps_arenas_and_keeps_its_threshold_across_loads(libc, monkeypatch):
    """casam-label's heap: two arenas, 1 MB buffers mapped; a later load settles back to the
    server's threshold, not the one-shot default."""
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert ort_heap.server_heap()
    assert libc.calls == [("mallopt", ort_heap.M_ARENA_MAX, 2),
                          ("mallopt", ort_heap.M_MMAP_THRESHOLD, ort_heap.SERVER_MMAP_THRESHOLD)]
    libc.calls.clear()
    with ort_heap.loading():
        pass
    assert libc.calls[-2:] == [("mallopt", ort_heap.M_MMAP_THRESHOLD, ort_heap.SERVER_MMAP_THRESHOLD),
                               ("mallopt", ort_heap.M_TRIM_THRESHOLD, 2 * ort_heap.SERVER_MMAP_THRESHOLD)]


def test_an_operators_heap_settings_win_in_a_server(libc, monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not ort_heap.server_heap()
    assert libc.calls == []


def test_an_operators_threshold_wins(libc, monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    with ort_heap.loading():
        pass
    assert libc.calls == []


def test_every_session_load_goes_through_it(monkeypatch, engines, tmp_path):
    """Also a load that fails (its buffers are freed all the same)."""
    entered = []

    @contextlib.contextmanager
    def recording():
        entered.append(1)
        yield

    monkeypatch.setattr("runtime.backends.ort.loading", recording)
    OrtBackend("ort-cpu").session(next(engines.glob("encoder*.onnx")))
    bad = tmp_path / "not-a-graph.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ManifestError):
        OrtBackend("ort-cpu").session(bad)
    assert len(entered) == 2
