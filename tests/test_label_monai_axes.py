"""The voxel axis order of MONAI Label clicks and ROIs, pinned against what 3D Slicer sends.

Slicer's MONAI Label module (plugins/slicer/MONAILabel/MONAILabel.py, MONAI Label 0.8.5)
turns a control point's RAS position into ``round(RASToIJK · ras)`` (``getControlPointXYZ``)
and a ROI into the rounded IJK of its min and max corners, zipped axis by axis
(``getROIPointsXYZ``: ``[i0, i1, j0, j1, k0, k1]``). For a NIfTI, Slicer's IJK→RAS is the
file's affine, and IJK is nibabel's array order. This test replays that arithmetic on a
real NIfTI's affine and checks casam lands on the same voxel of the slice it prompts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import need
from casam_label.monai_prompts import parse_params, slice_prompts


def slicer_ijk(affine: np.ndarray, ras: np.ndarray) -> list[int]:
    """Slicer's ``getControlPointXYZ``: RASToIJK (the affine's inverse) applied, rounded."""
    return [round(v) for v in (np.linalg.inv(affine) @ np.append(ras, 1.0))[:3]]


def slicer_roi(affine: np.ndarray, center: np.ndarray, size: np.ndarray) -> list[int]:
    """Slicer's ``getROIPointsXYZ``: the RAS min and max corners to IJK, zipped per axis."""
    lo, hi = slicer_ijk(affine, center - size / 2), slicer_ijk(affine, center + size / 2)
    return [v for pair in zip(lo, hi) for v in pair]


@pytest.fixture(scope="module")
def volume():
    nib = need("nibabel")
    from nibabel.testing import data_path

    img = nib.load(str(Path(data_path) / "anatomical.nii"))
    return np.asarray(img.dataobj), img.affine


def test_a_slicer_click_is_the_voxel_it_was_placed_on(volume):
    data, affine = volume
    i, j, k = 7, 30, 11  # asymmetric, so a swapped i and j cannot land on the same voxel
    ras = (affine @ np.array([i, j, k, 1.0]))[:3] + 0.2  # a point placed inside voxel (i, j, k)
    sent = slicer_ijk(affine, ras)
    assert sent == [i, j, k]
    plan = slice_prompts(parse_params(f'{{"foreground": [{sent}]}}'.replace("(", "[")), axis=2)
    (slice_k, prompt), = plan.items()
    click = prompt.clicks[0]
    image = data[:, :, slice_k]  # the session's slice k: rows are i, columns are j
    assert slice_k == k and image[int(click.y), int(click.x)] == data[i, j, k]
    assert (click.x, click.y) == (j, i)


def test_a_slicer_roi_is_a_box_over_its_voxels_on_its_middle_slice(volume):
    _, affine = volume
    lo, hi = np.array([4, 10, 6]), np.array([20, 36, 16])  # IJK corners
    center = (affine @ np.append((lo + hi) / 2, 1.0))[:3]
    size = np.abs(affine[:3, :3] @ (hi - lo))
    roi = slicer_roi(affine, center, size)
    request = parse_params(f'{{"roi": {roi}}}')
    assert request.roi == (4, 20, 10, 36, 6, 16)  # [i0, i1, j0, j1, k0, k1], each pair sorted
    (k, prompt), = slice_prompts(request, axis=2).items()
    assert k == 11 and prompt.box == (10.0, 4.0, 36.0, 20.0)  # x from j, y from i
