"""A MONAI Label infer request applied to a casam ``Session``: the request is the whole state.

MONAI Label's interactive models are stateless, so its viewers send every click so far
with each request (Slicer's Deepgrow panel sends all foreground and background points of
the segment every time). casam's session is stateful: it feeds each click the previous
low-res logits. The two meet here. For each slice, the session's steps are undone until
the current step's clicks are a prefix of the request's clicks on that slice (and its box
is the request's box), then only the new clicks run the decoder. A viewer that adds one
click costs one decoder run; one that removes a click gets exactly the masks a fresh
session would give for the clicks that remain.

A ROI is a box: on its slice for a flat ROI; a 3-D ROI is a box on the middle slice of its
range and a propagation within the range (casam-infer's ``--box3d``). The same ROI sent
again is not redone (the viewer resends it with each click).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from runtime.sessions import Interaction, Session
from casam_label.monai_prompts import Click, MonaiRequest, SlicePrompt, roi_range, slice_prompts


@dataclass
class Applied:
    """What the request ran: the interactions (for timings, route and IoU) and slices touched."""

    interactions: list[Interaction] = field(default_factory=list)
    slices: set[int] = field(default_factory=set)

    def add(self, result: Interaction) -> None:
        self.interactions.append(result)
        self.slices.update(result.masks)


def _steps(session: Session, label: str, k: int) -> list[Any]:
    lb = session.labels.get(label)
    return [] if lb is None or k not in lb.slices else lb.slices[k].steps


def _wanted(step: Any, clicks: list[Click]) -> bool:
    """Whether a step's clicks are a prefix of ``clicks``."""
    have = [Click(float(x), float(y), bool(s)) for (x, y), s in zip(step.points, step.point_labels)]
    return len(have) <= len(clicks) and have == clicks[: len(have)]


def _rewind(session: Session, label: str, k: int, clicks: list[Click]) -> int:
    """Undo slice k's steps until its current clicks are a prefix of ``clicks``; returns how
    many of ``clicks`` are already applied."""
    steps = _steps(session, label, k)
    while steps and not _wanted(steps[-1], clicks):
        session.undo(label, k)
        steps = _steps(session, label, k)
    return len(steps[-1].points) if steps else 0


def _slice(session: Session, label: str, k: int, prompt: SlicePrompt, applied: Applied) -> None:
    if prompt.box is not None:
        applied.add(session.box(label, prompt.box, k))
        done = 0
    else:
        done = _rewind(session, label, k, prompt.clicks)
    for c in prompt.clicks[done:]:
        applied.add(session.click(label, c.x, c.y, positive=c.positive, k=k))
    applied.slices.add(k)


def apply_request(session: Session, label: str, request: MonaiRequest, last_roi: Optional[tuple]) -> Applied:
    """Run ``request`` on ``session`` for ``label`` (see the module's doc); ``last_roi`` is
    the ROI this label's previous request carried, so a resent ROI is not redone."""
    plan = slice_prompts(request, session.source.axis)
    span = roi_range(request, session.source.axis)
    if request.roi is not None and request.roi == last_roi:
        for prompt in plan.values():
            prompt.box = None  # already drawn (and propagated) by an earlier request
        span = None
    applied = Applied()
    with session.lock:
        order = sorted(set(plan) | (set(session.labels[label].slices) if label in session.labels else set()))
        if span is not None and span[1] > span[0] and session.source.is_volume:
            middle = (span[0] + span[1]) // 2
            _slice(session, label, middle, plan[middle], applied)
            applied.add(session.propagate(label, middle, limits=span))
            order = [k for k in order if k != middle]  # then the clicks refine the propagated slices
        for k in order:
            _slice(session, label, k, plan.get(k, SlicePrompt()), applied)
        if request.propagate and request.roi is None and plan and session.source.is_volume:
            applied.add(session.propagate(label, max(plan)))
    return applied
