"""One exported 2-task tiny bundle per test session, shared by the runtime and CLI tests.

Exporting costs ~20 s on two cores, so it happens once; tests that need different
thresholds or max_prompts pass a modified manifest to ``Pipeline.from_manifest`` instead
of re-exporting.
"""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import Result

from conftest import make_random_bundle

_CACHE: dict[str, tuple[Path, Path]] = {}
TASKS = ("alpha", "beta")


def exported(tmp_path_factory) -> tuple[Path, Path]:
    """(bundle folder, engines folder) of a seeded 2-task tiny bundle, fp32."""
    if "tiny" not in _CACHE:
        from casam_export import export_bundle

        root = tmp_path_factory.mktemp("runtime_export")
        make_random_bundle(root / "bundle", TASKS, seed=3)
        export_bundle(root / "bundle", root / "engines", verify=False, quiet=True)
        take_unverified_warning(root / "engines")
        _CACHE["tiny"] = (root / "bundle", root / "engines")
    return _CACHE["tiny"]


def take_unverified_warning(engines: Path) -> None:
    """Take the runtime's once-per-process warning about this unverified (``verify=False``)
    test export here, so that no test's output depends on whether it was the first in its
    process to open the folder (tests of the warning itself use a copy of the folder)."""
    from runtime.manifest import Manifest
    from runtime.pipeline import UnverifiedExportWarning, check_parity

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedExportWarning)
        check_parity(Manifest.load(engines))


def one_error_line(result: Result) -> str:
    """The single stderr line of a CLI run that failed as the CLIs promise: exit code 2,
    exactly one line, no traceback (a traceback means an error escaped the InputError path)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def copy_engines(engines: Path, dest: Path) -> Path:
    """A private copy of an export folder, for tests that damage it."""
    shutil.copytree(engines, dest)
    return dest


def with_thresholds(manifest: dict[str, Any], thresholds: list[float]) -> dict[str, Any]:
    data = copy.deepcopy(manifest)
    for task, tau in zip(data["tasks"], thresholds):
        task["threshold"] = float(tau)
    return data


def sample_images() -> list[np.ndarray]:
    """Images of several sizes and modes whose scores differ (noise, smooth, flat, grey 16-bit)."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:240, 0:320]
    smooth = np.stack([xx * 0.8, yy, (xx + yy) * 0.4], axis=-1).astype(np.uint8)
    disc = ((xx - 160) ** 2 + (yy - 120) ** 2 < 60 ** 2).astype(np.uint8) * 200 + 20
    return [
        rng.integers(0, 256, (300, 500, 3), dtype=np.uint8),
        smooth,
        (rng.random((256, 200)) * 40000 + 1000).astype(np.uint16),
        np.dstack([disc, disc // 2, 255 - disc, np.full_like(disc, 255)]),
    ]


BOXES = np.array([[10, 20, 180, 200], [60, 40, 190, 230], [5, 5, 100, 90]], dtype=np.float32)
