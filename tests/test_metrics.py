"""Metric functions against hand-computed cases (METHOD.md definitions).

The metrics are float64 ratios of pixel counts: pytest.approx's default (rel 1e-6) sits
far above float64 rounding (≈ 1e-16 per operation) and far below any wrong formula. The
losses are float32 and carry their own bound.
"""

from __future__ import annotations

import numpy as np
import pytest

from trainer.losses import dice_loss, focal_loss, soft_iou
from casam_core.metrics import band_width, boundary, boundary_iou, continual_metrics, image_scores, iou
from float32 import EPS32


def square(size: int, x0: int, y0: int, side: int) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def test_iou_hand_cases():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :4] = True  # 4 px
    b[0, 2:4] = True
    b[1, :4] = True  # 6 px, 2 shared → union 8
    assert iou(a, b) == pytest.approx(2 / 8)
    assert iou(a, a) == pytest.approx(1.0)
    assert iou(np.zeros((3, 3)), np.zeros((3, 3))) == 0.0
    assert iou(a, ~a) == 0.0


def test_band_width_is_29_at_1024_and_odd():
    assert band_width(1024, 1024) == 29
    assert band_width(256, 256) == 7  # round(7.24)
    assert band_width(500, 500) == 15  # round(14.14) = 14 → made odd
    assert band_width(10, 10) == 1


def test_boundary_is_mask_minus_3x3_erosion():
    m = square(20, 5, 5, 10)
    ring = boundary(m)
    assert ring.sum() == 4 * 10 - 4
    assert ring[5, 5] and ring[14, 14] and not ring[6, 6]
    # A mask that fills the image has no boundary at the image edge (OpenCV's border rule).
    assert boundary(np.ones((8, 8), bool)).sum() == 0


def _rect_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Pixels shared by two half-open rectangles (x0, y0, x1, y1)."""
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return w * h


def test_boundary_iou_band_29_at_1024_by_hand():
    # A square [a, a+s)² has a one-pixel ring; dilating it by 29×29 (radius 14) gives the
    # outer square [a−14, a+s+14)² minus the inner square [a+15, a+s−15)².
    s, a, shift = 200, 300, 10
    size, r = 1024, 14
    outer = lambda x, y: (x - r, y - r, x + s + r, y + s + r)  # noqa: E731
    inner = lambda x, y: (x + r + 1, y + r + 1, x + s - r - 1, y + s - r - 1)  # noqa: E731
    area = (s + 2 * r) ** 2 - (s - 2 * r - 2) ** 2
    assert area == 228 ** 2 - 170 ** 2
    gt = square(size, a, a, s)
    pred = square(size, a + shift, a, s)
    oa, ia, ob, ib = outer(a, a), inner(a, a), outer(a + shift, a), inner(a + shift, a)
    inter = _rect_overlap(oa, ob) - _rect_overlap(oa, ib) - _rect_overlap(ia, ob) + _rect_overlap(ia, ib)
    expected = inter / (2 * area - inter)
    assert boundary_iou(pred, gt) == pytest.approx(expected, rel=1e-6)
    assert boundary_iou(gt, gt) == pytest.approx(1.0)
    # The band really is 29 wide: a narrower one gives a different (lower) score.
    assert boundary_iou(pred, gt, side=3) < expected


def test_image_scores_average_masks():
    gt = np.stack([square(64, 0, 0, 8), square(64, 30, 30, 8)])
    pred = np.stack([square(64, 0, 0, 8), np.zeros((64, 64), bool)])
    m_iou, m_biou = image_scores(pred, gt)
    assert m_iou == pytest.approx(0.5)
    assert m_biou == pytest.approx(0.5)


def test_continual_metrics_on_a_given_matrix():
    nan = float("nan")
    m = [[0.8, 0.7, 0.6], [nan, 0.9, 0.85], [nan, nan, 0.5]]
    out = continual_metrics(m, [10, 20, 10])
    assert out["per_stage"] == pytest.approx([0.8, 25 / 30, 28 / 40])
    assert out["last"] == pytest.approx(0.7)
    assert out["avg"] == pytest.approx((0.8 + 25 / 30 + 0.7) / 3)
    assert out["ff"] == pytest.approx(((0.8 - 0.6) + (0.9 - 0.85)) / 2)
    single = continual_metrics([[0.42]], [3])
    assert single == {"per_stage": [0.42], "last": 0.42, "avg": 0.42, "ff": 0.0}


def test_loss_terms_by_hand():
    import torch

    logits = torch.tensor([[[2.0, -2.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    p = torch.sigmoid(logits)
    # Focal: α(1−p)^γ·CE on positives, (1−α)p^γ·CE on negatives, mean over pixels.
    ce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p))
    w = torch.where(target > 0, 0.25 * (1 - p) ** 2, 0.75 * p ** 2)
    # float32 losses of 4 pixels, written two ways: sigmoid, log, pow and a mean of positive
    # terms, each ≤ eps32/2 relative, a few ulps for the transcendental kernels: ≤ 8·eps32.
    assert float(focal_loss(logits, target)) == pytest.approx(float((w * ce).mean()), rel=8 * EPS32)
    inter = float((p * target).sum())
    assert float(dice_loss(logits, target)) == pytest.approx(1 - (2 * inter + 1) / (float(p.sum()) + 2 + 1), rel=8 * EPS32)
    assert float(soft_iou(logits, target)[0]) == pytest.approx(inter / (float(p.sum()) + 2 - inter), rel=8 * EPS32)


def test_naive_forgetting_by_hand():
    # One layer fine-tuned task after task: task 1 peaks after stage 2 (0.7, a related
    # task helped), then task 3 overwrites it (0.2). FF takes the largest drop from ANY
    # stage to the last, not just from the diagonal: task 1 → 0.7 − 0.2 = 0.5,
    # task 2 → 0.8 − 0.3 = 0.5, so FF = 0.5. Sizes 1, 1, 2 weight the stages.
    nan = float("nan")
    naive = [[0.6, 0.7, 0.2], [nan, 0.8, 0.3], [nan, nan, 0.9]]
    out = continual_metrics(naive, [1, 1, 2])
    assert out["per_stage"] == pytest.approx([0.6, 0.75, (0.2 + 0.3 + 2 * 0.9) / 4])
    assert out["last"] == pytest.approx(0.575)
    assert out["avg"] == pytest.approx((0.6 + 0.75 + 0.575) / 3)
    assert out["ff"] == pytest.approx(0.5)
    # Drops are measured from the best earlier stage: task 1 ends 0.05 below its 0.7 peak, task 2
    # never moved, so FF = (0.05 + 0) / 2.
    assert continual_metrics([[0.6, 0.7, 0.65], [nan, 0.5, 0.5], [nan, nan, 0.4]], [1, 1, 1])["ff"] == pytest.approx(0.025)
