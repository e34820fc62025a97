"""The bundle format stands on its own: casam_bundle imports no training code and no torch,
and the exporter reads bundles through casam_bundle, never through trainer/."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> set[str]:
    """Every module named in an import statement of ``package``'s files (static, no import)."""
    names: set[str] = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return names


def test_exporter_and_format_never_import_the_trainer():
    for package in ("casam_export", "casam_bundle", "runtime", "models"):
        climbing = sorted(m for m in imported_modules(package) if m == "trainer" or m.startswith("trainer."))
        assert not climbing, f"{package} imports {climbing}"
    assert "casam_bundle" in imported_modules("casam_export")
    heavy = sorted(m for m in imported_modules("casam_bundle")
                   if m.split(".")[0] in ("torch", "models", "casam_export", "safetensors", "onnx"))
    assert not heavy, f"casam_bundle imports {heavy}"


def test_bundle_format_imports_without_torch():
    """Importing every part of casam_bundle loads no torch (checked in a fresh interpreter)."""
    code = ("import sys, casam_bundle, casam_bundle.package, casam_bundle.signing, casam_bundle.calibration; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer', 'models')); "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
