"""Fault injection for the crash-safety tests: one environment hook, checked at named points.

``CASAM_FAULT=<point>`` makes the process SIGKILL itself when it reaches ``<point>`` (no
cleanup, no ``finally``: exactly what a power cut or the OOM killer does), and
``CASAM_FAULT=<point>=sleep:<seconds>`` makes it pause there, which holds a race window
open so that a concurrency test does not depend on timing luck. Several faults are separated
by commas. Unset, ``fault_point`` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "CASAM_FAULT"


def fault_point(point: str) -> None:
    """Die or pause here when ``$CASAM_FAULT`` names ``point``; otherwise do nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        name, _, action = item.strip().partition("=")
        if name != point:
            continue
        if action.startswith("sleep:"):
            time.sleep(float(action[len("sleep:"):]))
        else:
            os.kill(os.getpid(), signal.SIGKILL)
