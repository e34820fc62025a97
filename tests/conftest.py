"""Shared fixtures: the tiny seeded SAM and a valid bundle built without the trainer.

The random bundle holds seeded, untrained alignment layers and VAEs in exactly the bundle
format, so export and runtime tests exercise real graphs without paying for training.
Tests that need trained behaviour train their own tasks through ``trainer``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import NoReturn, Optional, Sequence

import numpy as np
import pytest
import torch

# Under pytest-xdist (`make test` runs two workers on the 2-core CI machine) each worker gets
# one torch thread: two workers × two threads on two cores only adds contention.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

#: Markers of the only tests that may skip under CI=true: CI machines have no GPU or TensorRT.
MAY_SKIP_IN_CI = ("gpu", "trt")


def in_ci() -> bool:
    """CI=true (set by GitHub Actions, GitLab CI and most others): everything the suite can
    use is meant to be installed, so a missing piece is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(reason: str) -> NoReturn:
    """Skip the test because ``reason`` (something it needs is absent); under CI=true fail
    instead, so that a CI machine without pydicom, say, goes red rather than green."""
    if in_ci():
        pytest.fail(f"CI=true, but {reason}: CI must have it (only GPU and TensorRT tests may skip)", pytrace=False)
    pytest.skip(reason)


def need(module: str, extra: str = "medical") -> ModuleType:
    """``module`` imported, or a skip (a failure under CI=true) naming what to install.
    Called inside each test that needs it, so a test skips only for what it uses itself."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing(f"{module} is not installed ({exc}; pip install -e '.[{extra}]')")


def real_data_root() -> Path:
    """../shared/data/real next to the checkout, or $CASAM_REAL_DATA (read at each call, so
    a test can point it elsewhere)."""
    default = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"
    return Path(os.environ.get("CASAM_REAL_DATA", default)).resolve()


def real_data_or_skip(*names: str) -> Path:
    """The real data folder; a skip when ../shared/data/real (or one of ``names`` in it) is
    absent, and a failure under CI=true, where the data is meant to be present."""
    root = real_data_root()
    for name in names or ("",):
        if not (root / name).is_dir():
            missing(f"real data not found at {root / name}")
    return root


def dciodvfy(path: Path) -> list[str]:
    """The output lines of David Clunie's ``dciodvfy`` (Debian's dicom3tools) on a DICOM
    file: an IOD validator that shares no code with pydicom or highdicom. One line names
    the IOD it validated against; problems are ``Error - …``, ``Warning - …`` (a dubious
    value copied from the source, say) and ``Abort - …`` lines. A missing dciodvfy skips
    (fails under CI=true)."""
    program = shutil.which("dciodvfy")
    if program is None:
        missing("dciodvfy is not installed (apt-get install dicom3tools; `make test` does it as root)")
    run = subprocess.run([program, str(path)], capture_output=True, text=True, timeout=120)
    return (run.stdout + run.stderr).splitlines()


def assert_valid_dicom(path: Path, iod: str = "Segmentation") -> None:
    """``path`` passes dciodvfy with no error, validated as ``iod``. Called by every test
    that writes a DICOM file (the SEGs), after its own checks."""
    lines = dciodvfy(path)
    errors = [line for line in lines if line.startswith(("Error", "Abort"))]
    assert not errors, f"dciodvfy {path}:\n" + "\n".join(errors)
    named = [line for line in lines if not line.startswith(("Warning", "Error", "Abort"))]
    assert named[:1] == [iod], f"dciodvfy read {path} as {named[:1]}, not {iod}"


SEG_SUFFIX = "_seg.dcm"  # what casam names every DICOM SEG it writes


@pytest.fixture(autouse=True)
def every_seg_written_passes_dciodvfy(request: pytest.FixtureRequest):
    """After each test, every DICOM SEG written during it anywhere under this worker's
    temporary root (its own tmp_path and the module fixtures' folders alike) is checked
    with dciodvfy: no SEG the suite produces escapes the independent validator, including
    those of tests that never look at their SEG."""
    if shutil.which("dciodvfy") is None:
        yield  # the tests that need it say so (and fail under CI=true)
        return
    root = request.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    before = {p: p.stat().st_mtime_ns for p in root.rglob(f"*{SEG_SUFFIX}")}
    yield
    for path in root.rglob(f"*{SEG_SUFFIX}"):
        if path.is_file() and before.get(path) != path.stat().st_mtime_ns:
            assert_valid_dicom(path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI=true every skip fails the run, whatever raised it (``pytest.importorskip``,
    ``skipif``, a helper), except in tests marked ``gpu`` or ``trt``."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    if any(item.get_closest_marker(name) for name in MAY_SKIP_IN_CI):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"CI=true, but the test skipped ({reason}); only tests marked gpu or trt may skip in CI"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module skipped as a whole at import (a module-level ``importorskip``) fails under CI=true."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true, but {collector.nodeid} was skipped at collection ({reason})"


@pytest.fixture(scope="session")
def engines(tmp_path_factory) -> Path:
    """The session's shared export of a seeded 2-task tiny bundle (fp32, unverified; built
    once by ``runtime_support.exported``). Read-only: a test that damages an export takes
    a private copy (``runtime_support.copy_engines``)."""
    from runtime_support import exported

    return exported(tmp_path_factory)[1]


@pytest.fixture(scope="session")
def pipe(engines: Path):
    """An onnxruntime-CPU ``Pipeline`` on the shared export, opened once for the session
    (tests read it and build their own Pipelines from its manifest; none changes it)."""
    from runtime.pipeline import Pipeline

    return Pipeline.from_manifest(engines, backend="ort-cpu")


@pytest.fixture(scope="session")
def tiny_sam():
    from models.sam_loader import load_frozen_sam

    return load_frozen_sam("tiny")


def make_random_bundle(
    root: Path,
    names: Sequence[str] = ("alpha", "beta"),
    seed: int = 0,
    thresholds: Optional[Sequence[float]] = None,
    resize: str = "longest",
    intensity=None,
):
    """A valid bundle of seeded, untrained tasks (format-exact, no training); ``intensity``
    (casam_io.intensity.Intensity) is recorded in its preprocessing (default: auto)."""
    from models.alignment import AlignmentLayer
    from models.sam_loader import TINY_CHECKPOINT_SHA
    from models.vae import TaskVAE
    from casam_core.files import atomic_write_json
    from runtime.preprocess import Preprocessing
    from casam_bundle import Bundle, TaskRecord
    from models.bundle_models import save_module

    prep = Preprocessing(resize=resize) if intensity is None else Preprocessing(resize=resize, intensity=intensity)
    bundle = Bundle.create(root, "tiny", TINY_CHECKPOINT_SHA.format(seed=0), prep, untrained_sam=True)
    for i, name in enumerate(names):
        torch.manual_seed(seed * 100 + i)
        staged = bundle.staging_dir(name)
        staged.mkdir(parents=True, exist_ok=True)
        layer = AlignmentLayer()
        # Untrained layers are near-identity maps; perturb them so that routing matters.
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        save_module(layer, staged / "alignment.safetensors")
        save_module(TaskVAE(), staged / "vae.safetensors")
        tau = float(thresholds[i]) if thresholds is not None else 1e6
        # Held-out scores all equal to τ: every recorded percentile reproduces τ exactly, so
        # the bundle passes the calibration check of task packages.
        calib = {"folds": 5, "seed": 2025, "percentile": 97, "count": 5, "mean": tau, "std": 0.0,
                 "p95": tau, "p97": tau, "p99": tau, "mean_plus_2std": tau, "scores": [tau] * 5}
        atomic_write_json(staged / "calibration.json", calib)
        atomic_write_json(staged / "split.json", {"train": [], "test": [], "seed": seed})
        atomic_write_json(staged / "train_log.json", {"epochs": [], "note": "random test bundle, untrained"})
        record = TaskRecord(name=name, files={}, alignment={"num_blocks": 3, "dim": 256},
                            vae={"in_dim": 256, "latent_dim": 64, "hidden_dim": 128, "beta": 16.5},
                            threshold_key="p97", threshold=tau)
        bundle.commit_task(record, staged)
    return bundle


@pytest.fixture
def random_bundle(tmp_path):
    return make_random_bundle(tmp_path / "bundle")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
