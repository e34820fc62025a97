"""The interactive evaluation's pieces (runtime/sessions/clicks.py, casam_core/metrics.py):
where a simulated click goes, Dice and NSD on shapes whose values are derived by hand, and
the challenge's AUC."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import need
from casam_core.metrics import dice, nsd
from runtime.sessions.clicks import auc, auc_all, next_click


@pytest.fixture(autouse=True)
def _scipy():
    need("scipy", "eval")


def rect(shape, rows, cols) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    return m


def test_the_largest_missed_region_gets_a_positive_click_at_its_deepest_point():
    truth = rect((60, 60), (10, 29), (10, 49))
    missed = rect((60, 60), (12, 25), (30, 45))  # 14×16 false negatives
    pred = truth & ~missed
    pred |= rect((60, 60), (40, 43), (5, 8))  # 4×4 false positives: a smaller error
    click = next_click(pred, truth)
    assert click is not None and click.positive
    row, col = click.index
    assert missed[row, col]
    # A rectangle's distance to its outside is min(row depth, col depth); its maximum, 7, is
    # reached on rows 18..19 (7 from either end of 12..25) and cols 36..39 (≥ 7 from 30 and 45).
    assert row in (18, 19) and 36 <= col <= 39, click


def test_over_segmentation_gets_a_negative_click_inside_it():
    truth = rect((60, 60), (10, 19), (10, 19))
    extra = rect((60, 60), (30, 50), (30, 50))  # 21×21 false positives
    pred = (truth & ~rect((60, 60), (10, 11), (10, 11))) | extra  # and 4 missed pixels
    click = next_click(pred, truth)
    assert click is not None and not click.positive
    assert click.index == (40, 40)  # the one centre of a 21×21 square: no tie


def test_the_array_edge_is_a_boundary_of_an_error_region():
    truth = rect((40, 30), (0, 9), (0, 29))  # a band along the top edge, all missed
    click = next_click(np.zeros_like(truth), truth)
    assert click is not None and click.positive
    assert click.index[0] in (4, 5)  # deepest from row −1 and row 10; not row 0 at the edge


def test_a_volume_gets_its_click_in_three_dimensions():
    truth = np.zeros((20, 30, 30), bool)
    truth[2:17, 5:25, 5:25] = True
    pred = truth.copy()
    pred[4:15, 8:22, 8:22] = False  # an 11×14×14 hole: the only error
    click = next_click(pred, truth)
    assert click is not None and click.positive
    z, y, x = click.index
    # Depth along z (hole 4..14) is 6 only at z 9; along y and x (8..21) it is ≥ 6 on 13..16.
    assert z == 9 and 13 <= y <= 16 and 13 <= x <= 16, click


def test_a_perfect_mask_gets_no_click():
    truth = rect((20, 20), (5, 10), (5, 10))
    assert next_click(truth.copy(), truth) is None


def test_dice_on_a_shifted_square():
    gt = rect((40, 40), (10, 29), (10, 29))
    pred = rect((40, 40), (10, 29), (13, 32))
    assert dice(pred, gt) == pytest.approx(2 * 20 * 17 / 800, abs=1e-12)  # 0.85, exact in float64
    assert dice(np.zeros_like(gt), np.zeros_like(gt)) == 1.0 and dice(gt, np.zeros_like(gt)) == 0.0


def test_nsd_2d_uses_the_spacing():
    """A 20×20 square against itself shifted 3 columns, columns 0.5 mm apart (1.5 mm shift).

    At τ = 2 mm every surface pixel of each is within 1.5 mm of the other: NSD 1. At τ = 1 mm,
    of each 76-pixel perimeter: 19 of each horizontal edge (all but the pixel 1.5 mm past the
    other square's corner) and 2 of one vertical edge (1 row from the other's corner) → 40.
    NSD = (40 + 40) / (76 + 76). Without the spacing the shift is 3 px and τ = 2 px is missed."""
    gt = rect((40, 40), (10, 29), (10, 29))
    pred = rect((40, 40), (10, 29), (13, 32))
    assert nsd(pred, gt, (1.0, 0.5), 2.0) == 1.0
    assert nsd(pred, gt, (1.0, 0.5), 1.0) == pytest.approx(80 / 152, abs=1e-12)
    assert nsd(pred, gt, (1.0, 1.0), 2.0) < 1.0
    assert nsd(gt, gt, (1.0, 1.0), 0.0) == 1.0


def test_nsd_3d_uses_the_slice_spacing():
    """A 10³ cube against itself one slice deeper, slices 3 mm apart, τ = 2 mm.

    Each surface has 2·100 face voxels + 8·36 rim voxels = 488. Of the cube's: its outer face
    (3 mm from the other's) 0; its inner face, the 84 voxels within 2 in-plane pixels of the
    other's rim (100 − the 4×4 core); its rim 288 (on the other's rim or face). The shifted
    cube is the mirror image: NSD = 2·372 / 2·488."""
    gt = np.zeros((24, 24, 24), bool)
    gt[5:15, 5:15, 5:15] = True
    pred = np.roll(gt, 1, axis=0)
    assert nsd(pred, gt, (3.0, 1.0, 1.0), 2.0) == pytest.approx(744 / 976, abs=1e-12)
    assert nsd(pred, gt, (1.0, 1.0, 1.0), 2.0) == 1.0  # 1 mm slices: the shift is within τ


def test_nsd_of_empty_masks():
    empty = np.zeros((10, 10), bool)
    assert nsd(empty, empty, (1, 1), 1) == 1.0 and nsd(rect((10, 10), (2, 5), (2, 5)), empty, (1, 1), 1) == 0.0
    with pytest.raises(ValueError):
        nsd(empty, empty, (1, 1, 1), 1)


def test_auc_is_the_challenges_trapezoid_over_the_clicks():
    values = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # box, then 5 clicks
    # cumulative_trapezoid([0.6, .7, .8, .9, 1.0], arange(5))[-1] = (.65 + .75 + .85 + .95)
    assert auc(values, 5) == pytest.approx(3.2, abs=1e-12)
    assert auc_all(values) == pytest.approx((0.55 + 0.65 + 0.75 + 0.85 + 0.95) / 5, abs=1e-12)
    assert auc(values[:2], 1) is None and auc_all(values[:1]) is None
