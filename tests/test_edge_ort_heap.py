"""glibc heap settings around onnxruntime loads (runtime/backends/ort_heap.py)."""

import sys

import pytest

from casam_core.errors import ManifestError
from runtime.backends import ort_heap
from runtime.backends.ort import OrtBackend


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(ort_heap, "_STATE", {})
    return ort_heap


def test_threshold_is_fixed_once_and_an_operators_setting_wins(fresh, monkeypatch):
    if not sys.platform.startswith("linux") or fresh._libc() is None:
        pytest.skip("mallopt is glibc's")
    calls = []

    class Recorder:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setitem(fresh._STATE, "libc", Recorder())
    assert fresh.bound_mmap_threshold() and fresh.bound_mmap_threshold()
    assert calls == [(fresh.M_MMAP_THRESHOLD, fresh.MMAP_THRESHOLD)]  # once per process

    monkeypatch.setattr(ort_heap, "_STATE", {"libc": Recorder()})
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not fresh.bound_mmap_threshold()
    assert len(calls) == 1


def test_a_session_load_releases_freed_heap(fresh, monkeypatch, engines, tmp_path):
    """Every onnxruntime session load ends with malloc_trim, also when the load fails."""
    trims = []
    monkeypatch.setattr("runtime.backends.ort.release_freed_heap", lambda: trims.append(1))

    graph = next(engines.glob("encoder*.onnx"))
    OrtBackend("ort-cpu").session(graph)
    bad = tmp_path / "not-a-graph.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ManifestError):
        OrtBackend("ort-cpu").session(bad)
    assert len(trims) == 2

