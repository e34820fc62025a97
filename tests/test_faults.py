"""Fault injection: kills, a full disk and failed checks never break what already works.

Each section covers one stage. Kills are real SIGKILLs of a real CLI process, placed by
``casam_core.faults`` (``CASAM_FAULT=<stage>:<point>``); a full disk is ENOSPC raised from the
atomic writer (``casam_core.files.atomic_path``). After each fault the previous bundle or
deployment must load and give exactly the results it gave before.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from casam_bundle import Bundle
from casam_bundle.package import pack_task, unpack_package
from conftest import make_random_bundle
from casam_core.errors import ManifestError
from casam_core.files import read_json
from runtime.pipeline import Pipeline, UnverifiedExportWarning
from runtime.prompts import Prompts
from runtime_support import BOXES, copy_engines, exported, sample_images

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


# =====================================================================================
# Export: a deployment folder switches atomically (issue 11, defects 3 and 10)
#
# The deployment is the session's 2-task tiny export; the re-export adds a third task
# ("gamma"), so it builds a new router and a new align graph while the encoder, decoder
# and the other align graphs are reused: exactly the files a careless writer would
# overwrite in place.
# =====================================================================================
@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> dict[str, Any]:
    """The deployed export, a bundle grown by one task, and what the deployment answers today."""
    bundle_dir, engines = exported(tmp_path_factory)
    root = tmp_path_factory.mktemp("faults_export")
    grown = Bundle.open(shutil.copytree(bundle_dir, root / "grown"))
    donor = make_random_bundle(root / "donor", ("gamma",), seed=5)
    staged = grown.staging_dir("gamma")
    shutil.copytree(donor.task_dir("gamma"), staged)
    grown.commit_task(donor.task("gamma"), staged)
    return {"bundle": bundle_dir, "engines": engines, "grown": grown.root, "answers": answers(engines)}


def answers(folder: Path) -> list[tuple[str, np.ndarray]]:
    """(route, masks) of the deployment in ``folder`` on two images."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedExportWarning)  # the session export is --no-verify
        pipe = Pipeline.from_manifest(folder, backend="ort-cpu")
    results = [pipe.predict(image, Prompts.for_image(image.shape, boxes=BOXES)) for image in sample_images()[:2]]
    return [(r.route, r.masks) for r in results]


def assert_deployment_unchanged(folder: Path, deployment: dict[str, Any]) -> None:
    """The old manifest is in force, every file it names is intact, and the answers are the same."""
    engines = deployment["engines"]
    assert (folder / "manifest.json").read_bytes() == (engines / "manifest.json").read_bytes()
    got = answers(folder)  # loading re-hashes every graph the manifest names
    for (route, masks), (old_route, old_masks) in zip(got, deployment["answers"]):
        assert route == old_route
        np.testing.assert_array_equal(masks, old_masks)


def graph_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.onnx*") if p.is_file()}


def named(folder: Path) -> set[str]:
    m = read_json(folder / "manifest.json")
    return {g["file"] for g in m["graphs"].values()} | {t["align"]["file"] for t in m["tasks"]}


def run_export(bundle: Path, out: Path, fault: str = "", *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.update(CASAM_FAULT=fault, OMP_NUM_THREADS="1")  # one thread, like each pytest-xdist worker (conftest.py)
    cmd = [sys.executable, "-m", "casam_export.cli", "--bundle", str(bundle), "--out", str(out), "--no-verify",
           "--quiet", *extra]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("point, new_graphs", [
    ("export:before-graphs", set()),
    ("export:after-first-graph", {"router"}),
    ("export:before-manifest", {"router", "align/gamma"}),
])
def test_killed_reexport_leaves_the_deployment_working(deployment, tmp_path, point, new_graphs):
    folder = copy_engines(deployment["engines"], tmp_path / "engines")
    old = graph_files(folder)
    proc = run_export(deployment["grown"], folder, point)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}: {proc.returncode} {proc.stderr[-2000:]}"
    assert_deployment_unchanged(folder, deployment)
    # The kill landed where intended: exactly these new graphs had been written beside the old ones.
    assert {f.rsplit("-", 1)[0] for f in graph_files(folder) - old} == new_graphs
    assert old <= graph_files(folder)


def test_kill_right_after_the_switch_leaves_the_new_deployment(deployment, tmp_path):
    """The manifest rename is the switch: killed just after it, the new export is in force
    (old files still lie about, unreferenced), and the next export removes them."""
    from casam_export import export_bundle

    folder = copy_engines(deployment["engines"], tmp_path / "engines")
    old = graph_files(folder)
    proc = run_export(deployment["grown"], folder, "export:after-manifest")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [t["name"] for t in read_json(folder / "manifest.json")["tasks"]] == ["alpha", "beta", "gamma"]
    assert old - named(folder), "killed before the clean-up, the replaced router is still there"
    with pytest.warns(UnverifiedExportWarning):
        pipe = Pipeline.from_manifest(folder, backend="ort-cpu")
    assert pipe.task_names == ["alpha", "beta", "gamma"]
    pipe.predict(sample_images()[0], Prompts.for_image(np.shape(sample_images()[0]), boxes=BOXES))

    m = export_bundle(deployment["grown"], folder, verify=False)  # nothing to rebuild
    assert all(e["reused"] for e in [*m["graphs"].values(), *(t["align"] for t in m["tasks"])])
    assert graph_files(folder) == named(folder), "the next export removes what no manifest names"


def error_line(result) -> str:
    """The CLI's one error line (stderr may also hold the tiny SAM's notice); never a traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("casam-export: error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@contextlib.contextmanager
def disk_full_at(monkeypatch, name_prefix: str) -> Iterator[None]:
    """Every atomic write of a file whose name starts with ``name_prefix`` fills the disk:
    the temp file is written, then ENOSPC is raised before it can be renamed into place."""
    import casam_export.graphs
    import casam_core.files

    real = casam_core.files.atomic_path

    @contextlib.contextmanager
    def atomic_path(path):
        with real(path) as tmp:
            yield tmp
            if Path(path).name.startswith(name_prefix):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with monkeypatch.context() as patch:
        patch.setattr(casam_core.files, "atomic_path", atomic_path)  # atomic_write_json (the manifest)
        patch.setattr(casam_export.graphs, "atomic_path", atomic_path)  # write_graph
        yield


@pytest.mark.parametrize("victim", ["router", "manifest.json"])
def test_full_disk_leaves_the_deployment_working(deployment, tmp_path, monkeypatch, victim):
    """ENOSPC while writing the first new graph, or the manifest: exit 2 with one line, the
    old deployment answers as before, and the failed export's files are gone."""
    from casam_export.cli import main

    folder = copy_engines(deployment["engines"], tmp_path / "engines")
    before = {p.relative_to(folder) for p in folder.rglob("*")}
    with disk_full_at(monkeypatch, victim):
        result = CliRunner().invoke(main, ["--bundle", str(deployment["grown"]), "--out", str(folder), "--no-verify",
                                           "--quiet"])
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "No space left on device" in line and "previous export" in line
    assert {p.relative_to(folder) for p in folder.rglob("*")} == before, "the failed export leaves nothing behind"
    assert_deployment_unchanged(folder, deployment)


def test_failed_verification_leaves_no_new_manifest(deployment, tmp_path, monkeypatch):
    """Re-export the deployed bundle with verification after perturbing one alignment weight
    of the PyTorch reference, i.e. after the deployed graphs were traced from the true
    weights: the chains disagree, so exit 2, no new manifest (the old deployment answers as
    before), the failing report in parity-failed.json and nothing else left behind."""
    import casam_export.verify
    from casam_export.cli import main

    real_build = casam_export.verify.build_model

    def perturbed_build(bundle, sam):
        model = real_build(bundle, sam)
        with torch.no_grad():
            for p in model.alignment[0].parameters():  # weights ~0.1: noise of 1 swamps them
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        return model

    monkeypatch.setattr(casam_export.verify, "build_model", perturbed_build)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(sample_images()[0]).save(images / "one.png")
    folder = copy_engines(deployment["engines"], tmp_path / "engines")
    before = {p.relative_to(folder) for p in folder.rglob("*")}
    # The deployed bundle itself: every graph is reused, only verification runs.
    result = CliRunner().invoke(main, ["--bundle", str(deployment["bundle"]), "--out", str(folder), "--verify",
                                       "--verify-images", str(images), "--quiet"])
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert "parity bars" in line and "no manifest was written" in line
    report = read_json(folder / "parity-failed.json")
    assert report["passed"] is False and any("mask IoU" in f for f in report["failures"])
    assert {p.relative_to(folder) for p in folder.rglob("*")} == before | {Path("parity-failed.json")}
    assert_deployment_unchanged(folder, deployment)


def test_runtime_warns_once_about_an_unverified_export_and_refuses_a_failed_one(deployment, tmp_path):
    folder = copy_engines(deployment["engines"], tmp_path / "engines")
    assert read_json(folder / "manifest.json")["parity"] == {"verified": False, "passed": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Pipeline.from_manifest(folder, backend="ort-cpu")
        Pipeline.from_manifest(folder, backend="ort-cpu")
    unverified = [w for w in caught if issubclass(w.category, UnverifiedExportWarning)]
    assert len(unverified) == 1 and "not verified" in str(unverified[0].message)
    assert unverified[0].filename == __file__, "the warning points at the caller's line"

    data = read_json(folder / "manifest.json")
    (folder / "manifest.json").write_text(json.dumps({**data, "parity": {"verified": True, "passed": False}}))
    with pytest.raises(ManifestError, match="failed parity check"):
        Pipeline.from_manifest(folder, backend="ort-cpu")
