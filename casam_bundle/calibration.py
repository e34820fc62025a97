"""Checking that a task's routing threshold is what its recorded calibration says.

A task's VAE wins an image when its score is the lowest and under its threshold τ, so a
τ that is too high (or infinite, or NaN) lets one task capture images that are not its
own. τ is the percentile of the held-out scores that calibration.json records
(trainer/calibration.py), so whoever receives a task can recompute it instead of taking
it on trust. Torch-free: numpy only.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import numpy as np

from casam_bundle.errors import BundleError

#: Threshold keys that are a percentile of the held-out scores: "p97", "p99.5" …
PERCENTILE_KEY = re.compile(r"p(\d+(?:\.\d+)?)")
MEAN_PLUS_2STD = "mean_plus_2std"


def _scores(calibration: Mapping[str, Any], where: str) -> np.ndarray:
    raw = calibration.get("scores")
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in raw):
        raise BundleError(f"{where}: 'scores' must list the held-out scores (at least 2 numbers) from which τ is recomputed")
    scores = np.asarray(raw, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise BundleError(f"{where}: the recorded held-out scores include non-finite values")
    return scores


def recompute(key: str, scores: np.ndarray) -> tuple[float, float]:
    """(the value of threshold ``key`` for ``scores``, the rounding allowance of that value).

    The scores are float64 and were written with ``repr`` (exact round trip), and the writer
    used ``numpy.percentile`` with linear interpolation, so a reader recomputes the same
    float64 operations. Another numpy version may order them differently (``a + (b-a)·t``
    or ``b - (b-a)·(1-t)``): each of those 3 roundings is at most ½ ulp of the largest
    magnitude involved, hence the 4-ulp allowance. The mean and std sum n terms, each
    rounding at most 1 ulp of the largest |score|, hence 4·n ulp.
    """
    ulp = float(np.spacing(np.abs(scores).max()))
    match = PERCENTILE_KEY.fullmatch(key)
    if match is not None and 0 < float(match.group(1)) <= 100:
        return float(np.percentile(scores, float(match.group(1)))), 4 * ulp
    if key == MEAN_PLUS_2STD:
        return float(scores.mean() + 2 * scores.std()), 4 * len(scores) * ulp
    raise BundleError(f"unknown threshold key {key!r}: use 'p<percentile>' or {MEAN_PLUS_2STD!r}")


def check_calibration(record: Mapping[str, Any], calibration: Mapping[str, Any], where: str) -> None:
    """Refuse a threshold that is not finite, or that the recorded scores do not reproduce.

    ``record`` is the task's bundle.json entry (``threshold_key``, ``threshold``);
    ``calibration`` its calibration.json. Every threshold calibration.json offers (the
    routing one and the alternatives the runtime may switch to) is recomputed.
    """
    key, tau = record.get("threshold_key"), record.get("threshold")
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not math.isfinite(tau):
        raise BundleError(f"{where}: threshold {tau!r} is not a finite number")
    if not isinstance(key, str) or key not in calibration:
        raise BundleError(f"{where}: threshold_key {key!r} is not an entry of calibration.json")
    if calibration[key] != tau:
        raise BundleError(f"{where}: threshold {tau!r} differs from calibration.json[{key!r}] = {calibration[key]!r}")
    scores = _scores(calibration, where)
    if calibration.get("count") != len(scores):
        raise BundleError(f"{where}: calibration count {calibration.get('count')!r} differs from the {len(scores)} recorded scores")
    candidates: Sequence[str] = [k for k in calibration if PERCENTILE_KEY.fullmatch(k) or k == MEAN_PLUS_2STD]
    for name in candidates:
        value = calibration[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise BundleError(f"{where}: calibration {name} = {value!r} is not a finite number")
        expected, allowance = recompute(name, scores)
        if abs(value - expected) > allowance:
            raise BundleError(
                f"{where}: calibration {name} = {value!r}, but the recorded held-out scores give {expected!r}; "
                "the threshold does not come from its calibration"
            )
