"""Trusting an export folder, the torch-free guarantee, and the engine LRU."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runtime.engine_cache import EngineCache
from casam_core.errors import ManifestError
from runtime.manifest import Manifest
from runtime.pipeline import Pipeline
from runtime_support import copy_engines

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "models", "trainer", "casam_export", "segment_anything")


def test_runtime_sources_import_no_torch_side_package():
    for path in (REPO / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path} imports {name}"


def test_prediction_and_cli_leave_torch_unimported(engines, tmp_path):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    script = f"""
import sys
import numpy as np
from runtime.pipeline import Pipeline
from runtime.prompts import Prompts
from casam_infer.cli import main
pipe = Pipeline.from_manifest({str(engines)!r}, backend="auto")
image = np.zeros((64, 80), np.uint8)
result = pipe.predict(image, Prompts.for_image(image.shape, boxes=np.array([[4, 4, 40, 50]])))
assert result.masks.shape == (1, 64, 80)
main([{str(tmp_path / "a.png")!r}, "--box", "5", "5", "60", "60", "--engines", {str(engines)!r},
      "--out", {str(tmp_path / "out")!r}, "--overlay", "--quiet"], standalone_mode=False)
leaked = [m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r}]
print("LEAKED", leaked)
sys.exit(1 if leaked else 0)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LEAKED []" in proc.stdout
    assert (tmp_path / "out" / "a_mask0.png").is_file()


def test_unknown_format_version_is_refused(engines):
    data = json.loads((engines / "manifest.json").read_text())
    with pytest.raises(ManifestError, match="format version 2"):
        Manifest.load(engines, {**data, "format_version": 2})
    with pytest.raises(ManifestError, match="not a casam manifest"):
        Manifest.load(engines, {**data, "format": "something-else"})


def test_sha_mismatch_and_missing_files_are_refused(engines, tmp_path):
    bad = copy_engines(engines, tmp_path / "engines")
    files = Manifest.load(bad, verify=False)  # graph files are content-named: ask the manifest
    with open(files.task("beta").graph.path, "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ManifestError, match=r"beta-[0-9a-f]{12}\.onnx .*sha256"):
        Pipeline.from_manifest(bad, backend="ort-cpu")
    files.graphs["decoder"].path.unlink()
    with pytest.raises(ManifestError, match=r"decoder-[0-9a-f]{12}\.onnx .*missing"):
        Manifest.load(bad)
    with pytest.raises(ManifestError, match="no manifest.json"):
        Manifest.load(tmp_path)


def test_manifest_paths_cannot_escape_the_folder(engines):
    data = json.loads((engines / "manifest.json").read_text())
    data["graphs"]["decoder"]["file"] = "../../etc/passwd"
    with pytest.raises(ManifestError, match="outside the export folder"):
        Manifest.load(engines, data)


def test_manifest_tasks_and_thresholds(engines):
    manifest = Manifest.load(engines)
    data = json.loads((engines / "manifest.json").read_text())
    assert manifest.task_names == [t["name"] for t in data["tasks"]]
    assert [t.threshold for t in manifest.tasks] == [t["threshold"] for t in data["tasks"]]
    assert manifest.max_prompts == data["max_prompts"]
    assert manifest.preprocessing.resize == data["preprocessing"]["resize"]


def test_engine_cache_is_an_lru_and_loads_each_key_once():
    loaded: list[str] = []

    def loader(key: str) -> str:
        time.sleep(0.01)
        loaded.append(key)
        return key.upper()

    cache = EngineCache(loader, max_resident=2)
    assert [cache.get(k) for k in ("a", "b", "a", "c")] == ["A", "B", "A", "C"]
    assert cache.resident() == ["a", "c"] and cache.evictions == 1  # b was least recently used
    cache.get("b")
    assert cache.resident() == ["c", "b"] and loaded == ["a", "b", "c", "b"]

    fresh = EngineCache(loader, max_resident=4)
    loaded.clear()
    threads = [threading.Thread(target=fresh.get, args=("x",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loaded == ["x"] and fresh.loads == 1
    with pytest.raises(ValueError):
        EngineCache(loader, max_resident=0)
