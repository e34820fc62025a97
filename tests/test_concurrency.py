"""casam-infer's concurrent request window (casam_infer/cli.py ``in_order``), without a server:
results in input order whatever order calls finish in, failures handed back in place,
a broken export ending the run, and an early stop leaving later calls unstarted."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from casam_infer.cli import in_order
from casam_core.errors import InputError, ManifestError


def test_results_come_in_input_order_with_failures_in_place():
    items = [Path(f"im{i}") for i in range(8)]
    active, peak, lock = [0], [0], threading.Lock()

    def call(path: Path) -> str:
        i = int(path.name[2:])
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02 * (8 - i))  # later items finish first
        with lock:
            active[0] -= 1
        if i == 3:
            raise InputError("corrupt")
        return path.name

    got = list(in_order(call, items, 4))
    assert [p for p, _ in got] == items
    assert [o for _, o in got if not isinstance(o, InputError)] == [p.name for p in items if p.name != "im3"]
    assert isinstance(got[3][1], InputError)
    assert peak[0] == 4  # the window was full


def test_a_broken_export_ends_the_run():
    def call(path: Path) -> str:
        raise ManifestError("align/alpha.onnx is missing")

    with pytest.raises(ManifestError):
        list(in_order(call, [Path("a"), Path("b")], 2))


def test_stopping_early_starts_nothing_more():
    started: list[str] = []

    def call(path: Path) -> str:
        started.append(path.name)
        time.sleep(0.01)
        return path.name

    for _ in in_order(call, [Path(f"im{i}") for i in range(20)], 2):
        break
    time.sleep(0.05)
    assert len(started) <= 3  # the first, the one in flight, and the one started as it was handed back
