"""Fault injection: SIGKILL at chosen points (``CASAM_FAULT``, runtime/faults.py); in every
case the previous bundle or deployment is intact and loads."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from casam_bundle import Bundle
from casam_bundle.package import pack_task, unpack_package
from conftest import make_random_bundle

REPO = Path(__file__).resolve().parents[1]


# ===== Bundle writes: unpack and remove ======================================================
UNPACK = "import sys; from casam_bundle.package import unpack_package; unpack_package(sys.argv[1], sys.argv[2])"
REMOVE = "import sys; from casam_bundle import Bundle; Bundle.open(sys.argv[1]).remove_task(sys.argv[2])"


def killed_at(point: str, script: str, *args: str) -> None:
    """Run ``script`` in a child that SIGKILLs itself at ``point``; it must die there."""
    env = {**os.environ, "CASAM_FAULT": point,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}: rc {proc.returncode} {proc.stderr[-2000:]}"


def loads(root: Path) -> Bundle:
    """The bundle opens, every recorded file matches its sha256, and every task's modules load."""
    from models.bundle_models import build_router, load_alignment

    bundle = Bundle.open(root)
    assert build_router(bundle).num_tasks == len(bundle.task_names)
    for name in bundle.task_names:
        load_alignment(bundle, name)
    return bundle


@pytest.fixture(scope="module")
def bundle_sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_sites")
    make_random_bundle(root / "site", ("gamma",), seed=7)
    pack_task(root / "site", "gamma", root / "gamma.casam")
    make_random_bundle(root / "target", ("alpha", "beta"), seed=1)
    return root


@pytest.mark.parametrize("point", ["unpack:before-commit", "commit:after-move"])
def test_sigkill_during_unpack_leaves_bundle_valid(bundle_sites, tmp_path, point):
    root = tmp_path / "bundle"
    shutil.copytree(bundle_sites / "target", root)
    killed_at(point, UNPACK, root, bundle_sites / "gamma.casam")
    assert loads(root).task_names == ["alpha", "beta"]
    unpack_package(root, bundle_sites / "gamma.casam")  # the import can simply be run again
    assert loads(root).task_names == ["alpha", "beta", "gamma"]


@pytest.mark.parametrize("point, gone", [("remove:locked", False), ("remove:after-commit", True)])
def test_sigkill_during_remove_leaves_bundle_valid(bundle_sites, tmp_path, point, gone):
    root = tmp_path / "bundle"
    shutil.copytree(bundle_sites / "target", root)
    killed_at(point, REMOVE, root, "alpha")
    assert loads(root).task_names == (["beta"] if gone else ["alpha", "beta"])
    if not gone:
        Bundle.open(root).remove_task("alpha")
    # A withdrawn name can come back later (its stale folder is replaced, not merged).
    unpack_package(root, bundle_sites / "gamma.casam", as_name="alpha")
    assert loads(root).task_names == ["beta", "alpha"]
