"""Interactive evaluation with simulated clicks, by the protocol of the CVPR 2025 challenge
"Foundation Models for Interactive 3D Biomedical Image Segmentation" (its evaluation script
``CVPR25_iter_eval.py`` in github.com/JunMa11/CVPR-MedSegFMCompetition), run through the
same ``Session`` an annotator's viewer drives, so what is scored is what a person gets.

Per structure:

1. interaction 0 is one box: the tight box of the ground-truth mask (on a volume, of the
   mask on its largest slice along the session's axis, then "propagate" to the other slices);
2. interactions 1..N are simulated clicks. The error mask is ``prediction != truth``;
   its connected components use full connectivity (8 in 2-D, 26 in 3-D, as the script's
   ``cc3d.connected_components(connectivity=26)``); in the largest component the click goes
   at its centre, the voxel farthest from the component's boundary: the maximum of the
   component's Euclidean distance transform in voxel units, outside the array counting as
   boundary. Ties go to one of the maxima drawn by ``RandomState(42)``, as the script's
   ``sample_coord`` draws them. The click is positive where the truth is foreground there
   (the mask missed it), negative where it is background (the mask over-segments). A
   perfect mask gets no click, and the mask stays as it is.

After each interaction: Dice, and NSD (``casam_core.metrics.nsd``, tolerance in mm with
the voxel spacing) when Dice exceeds ``NSD_MIN_DICE`` (else 0, as the script does).
Their areas under the curve, ``auc``: the script's ``cumulative_trapezoid(v[-N:],
arange(N))[-1]``, i.e. the trapezoid over the N click interactions only, unit step, not
normalised (so 0..N−1; defined for N ≥ 2; the box is left out because the challenge made
it optional). ``auc_all`` also counts the box: the trapezoid over interactions 0..N divided
by N, a mean height in 0..1 (defined for N ≥ 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from casam_core.metrics import dice, ndimage, nsd
from casam_core.structures import tight_box
from runtime.sessions.session import Session

#: The script computes NSD only above this Dice ("NSD is also low when dice is too low").
NSD_MIN_DICE = 0.2
#: The challenge's NSD tolerance, in mm.
DEFAULT_TOLERANCE_MM = 2.0
#: casam-infer --clicks accepts 0..MAX_CLICKS (the challenge uses 5).
MAX_CLICKS = 20
#: The challenge's tie-break seed (``np.random.seed(42)`` in ``sample_coord``).
TIE_SEED = 42


@dataclass(frozen=True)
class Click:
    """One simulated click: ``index`` in the mask's array axes (row, col) or (i, j, k)."""

    index: tuple[int, ...]
    positive: bool


def error_centre(component: np.ndarray) -> tuple[int, ...]:
    """The voxel of ``component`` farthest from its boundary (max of its Euclidean distance
    transform; outside the array is boundary), ties broken as the challenge breaks them."""
    on = np.argwhere(component)
    lo, hi = on.min(axis=0), on.max(axis=0) + 1
    crop = np.pad(component[tuple(slice(a, b) for a, b in zip(lo, hi))], 1)  # one zero voxel: the array's edge
    dist = ndimage().distance_transform_edt(crop)[(slice(1, -1),) * component.ndim]
    best = np.argwhere(dist == dist.max())  # row-major, the order argwhere gives on the full array
    chosen = best[np.random.RandomState(TIE_SEED).choice(len(best))]
    return tuple(int(v) for v in chosen + lo)


def next_click(pred: np.ndarray, truth: np.ndarray) -> Optional[Click]:
    """The challenge's next click for ``pred`` against ``truth``; None when they agree."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} differ in shape")
    error = p != t
    if not error.any():
        return None
    ndi = ndimage()
    components, _ = ndi.label(error, structure=np.ones((3,) * error.ndim, dtype=bool))
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    centre = error_centre(components == int(np.argmax(sizes)))
    return Click(centre, positive=bool(t[centre]))


def auc(values: Sequence[float], clicks: int) -> Optional[float]:
    """The challenge's AUC: trapezoid over the last ``clicks`` values, unit step (None below 2)."""
    if clicks < 2:
        return None
    v = np.asarray(values[-clicks:], dtype=np.float64)
    return float(((v[1:] + v[:-1]) / 2).sum())


def auc_all(values: Sequence[float]) -> Optional[float]:
    """Trapezoid over interactions 0..N (the box included) divided by N (None for N = 0)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return None
    return float(((v[1:] + v[:-1]) / 2).sum() / (len(v) - 1))


@dataclass(frozen=True)
class Protocol:
    """``clicks``: N; ``spacing``: mm per array axis of the truth; ``tolerance``: NSD's, in mm."""

    clicks: int = 5
    spacing: tuple[float, ...] = (1.0, 1.0)
    tolerance: float = DEFAULT_TOLERANCE_MM


@dataclass
class Curve:
    """One structure's interactions and their scores (index 0: the box)."""

    box: list[float]
    slice: Optional[int]
    clicks: list[Optional[dict[str, Any]]] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    nsd: list[float] = field(default_factory=list)
    decoder_ms: list[float] = field(default_factory=list)

    def score(self, pred: np.ndarray, truth: np.ndarray, protocol: Protocol, ms: float) -> None:
        d = dice(pred, truth)
        self.dice.append(d)
        self.nsd.append(nsd(pred, truth, protocol.spacing, protocol.tolerance) if d > NSD_MIN_DICE else 0.0)
        self.decoder_ms.append(ms)

    def to_dict(self, n: int) -> dict[str, Any]:
        return {"box": self.box, "slice": self.slice, "clicks": self.clicks, "dice": self.dice, "nsd": self.nsd,
                "dice_auc": auc(self.dice, n), "nsd_auc": auc(self.nsd, n), "dice_auc_all": auc_all(self.dice),
                "nsd_auc_all": auc_all(self.nsd), "dice_final": self.dice[-1], "nsd_final": self.nsd[-1],
                "decoder_ms": self.decoder_ms}


def label_mask(session: Session, name: str) -> np.ndarray:
    """Label ``name``'s current mask over the whole source (its own, before any overlap rule)."""
    out = np.zeros(session.source.shape, dtype=bool)
    view = out[None] if session.source.axis is None else np.moveaxis(out, session.source.axis, 0)
    for k, history in session.labels[name].slices.items():
        if history.current is not None:
            view[k] = history.current.mask
    return out


def _first_box(session: Session, name: str, truth: np.ndarray,
               box: Optional[Sequence[float]]) -> tuple[list[float], Optional[int], float]:
    """Interaction 0: ``box`` (default: the truth's tight box) on an image; on a volume the
    tight box of the truth on its largest slice, then propagated."""
    axis = session.source.axis
    if axis is None:
        box = [float(v) for v in (tight_box(truth) if box is None else box)]
        return box, None, session.box(name, box).timings_ms["decoder"]
    planes = np.moveaxis(truth, axis, 0)
    k = int(np.argmax(planes.reshape(planes.shape[0], -1).sum(axis=1)))
    box = [float(v) for v in tight_box(planes[k])]
    ms = session.box(name, box, k).timings_ms["decoder"]
    return box, k, ms + session.propagate(name, k).timings_ms["decoder"]


def evaluate_structure(session: Session, name: str, truth: np.ndarray, protocol: Protocol,
                       box: Optional[Sequence[float]] = None) -> Curve:
    """Run the protocol for one structure (label ``name``) of the session's image or volume;
    ``box``: an image's first box when not the truth's tight one (casam-infer's --box-jitter)."""
    truth = np.asarray(truth, bool)
    axis = session.source.axis
    box, k, ms = _first_box(session, name, truth, box)
    curve = Curve(box, k)
    pred = label_mask(session, name)
    curve.score(pred, truth, protocol, ms)
    for _ in range(protocol.clicks):
        click = next_click(pred, truth)
        ms = 0.0
        if click is not None:
            j, (row, col) = (0, click.index) if axis is None else \
                (click.index[axis], tuple(v for i, v in enumerate(click.index) if i != axis))
            reply = session.click(name, float(col), float(row), click.positive, j)
            ms = reply.timings_ms["decoder"]
            pred = label_mask(session, name)
            curve.clicks.append({"x": col, "y": row, "slice": None if axis is None else j,
                                 "positive": click.positive})
        else:
            curve.clicks.append(None)
        curve.score(pred, truth, protocol, ms)
    return curve
