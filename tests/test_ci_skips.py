"""No silent skips in CI: under CI=true a test that skips for anything CI is meant to have
fails the run (tests/conftest.py); only tests marked ``gpu`` or ``trt`` may skip there.

Each case runs pytest in a child process, with and without CI=true, so the hooks are the
suite's own and the outcome is pytest's exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

SKIPPING = '''
import pytest

from conftest import need


def test_needs_a_missing_package():
    need("casam_no_such_package")


def test_importorskip_elsewhere():
    pytest.importorskip("casam_no_such_package")


@pytest.mark.gpu
def test_needs_a_gpu():
    pytest.skip("no CUDA device")


@pytest.mark.trt
def test_needs_tensorrt():
    pytest.skip("TensorRT is not installed")
'''

MODULE_SKIP = '''
import pytest

pytest.importorskip("casam_no_such_package")


def test_never_collected():
    pass
'''


def pytest_run(folder: Path, *args: str, ci: bool, **env: str) -> subprocess.CompletedProcess:
    """pytest on ``folder`` in a child process, with the suite's conftest.py hooks."""
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS")}
    base["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])
    if ci:
        base["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
                          cwd=folder, env={**base, **env}, capture_output=True, text=True, timeout=600)


def suite_copy(tmp_path: Path, **files: str) -> Path:
    """A folder with the suite's conftest.py and ``files`` (test modules)."""
    folder = tmp_path / "suite"
    folder.mkdir()
    (folder / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (folder / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n    trt: needs TensorRT\n")
    for name, text in files.items():
        (folder / f"{name}.py").write_text(text)
    return folder


def test_skips_fail_under_ci_except_gpu_and_tensorrt(tmp_path):
    folder = suite_copy(tmp_path, test_skipping=SKIPPING)
    local = pytest_run(folder, ci=False)
    assert local.returncode == 0 and "4 skipped" in local.stdout, local.stdout
    ci = pytest_run(folder, ci=True)
    assert ci.returncode == 1, ci.stdout
    assert "2 failed, 2 skipped" in ci.stdout, ci.stdout
    assert "CI=true, but casam_no_such_package is not installed" in ci.stdout
    assert "CI=true, but the test skipped (Skipped: could not import 'casam_no_such_package'" in ci.stdout
    assert "SKIPPED [1] test_skipping.py" in ci.stdout and "no CUDA device" in ci.stdout  # -rs names what skipped


def test_a_module_skipped_at_import_fails_under_ci(tmp_path):
    folder = suite_copy(tmp_path, test_module_skip=MODULE_SKIP)
    local = pytest_run(folder, ci=False)
    assert local.returncode == 5 and "1 skipped" in local.stdout, local.stdout  # 5: nothing left to run, no failure
    ci = pytest_run(folder, ci=True)
    assert ci.returncode == 2 and "was skipped at collection" in ci.stdout, ci.stdout  # 2: collection error


def test_missing_real_data_fails_under_ci(tmp_path):
    """The suite's own real-data test with CASAM_REAL_DATA pointing at a folder that is not
    there: a skip on a developer's machine, a failed run in CI."""
    missing = str(tmp_path / "no-shared-data")
    test = str(TESTS / "test_train_real.py")
    local = pytest_run(REPO, test, ci=False, CASAM_REAL_DATA=missing)
    assert local.returncode == 0 and "1 skipped" in local.stdout and "real data not found" in local.stdout, local.stdout
    ci = pytest_run(REPO, test, ci=True, CASAM_REAL_DATA=missing)
    assert ci.returncode == 1 and "1 failed" in ci.stdout, ci.stdout
    assert f"CI=true, but real data not found at {missing}" in ci.stdout
