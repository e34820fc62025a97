"""Fault injection for the reliability tests: the one hook every stage checks.

``CASAM_FAULT=<stage>:<point>`` (several may be given, comma-separated) makes the process
SIGKILL itself when it reaches that point, so tests/test_faults.py can prove that a kill at
the worst moment leaves the previous bundle or deployment intact. A kill, not an exception:
no ``finally`` block, no cleanup and no flush runs, exactly as when the OOM killer or a
power cut strikes. ``<stage>:<point>=sleep:<seconds>`` pauses there instead, which holds a
race window open so that a concurrency test does not depend on timing luck. Unset (always,
outside those tests) it costs one environment lookup.

Points in use (grep ``fault_point(`` for the exact places):

- ``export:before-graphs``      casam-export has claimed --out and loaded SAM, no graph written yet
- ``export:after-first-graph``  the first newly built graph is in --out, the others are not
- ``export:before-manifest``    every graph (and parity) is done, the new manifest is not yet renamed in
- ``export:after-manifest``     the new manifest is in place, unreferenced old files not yet removed
- ``commit:locked``             a bundle writer holds the lock and has re-read bundle.json
- ``commit:after-move``         the task folder is in tasks/, bundle.json not yet rewritten
- ``unpack:before-commit``      an imported task is fully staged, not yet committed
- ``remove:locked``             remove holds the lock, bundle.json not yet rewritten
- ``remove:after-commit``       bundle.json no longer names the task, its folder not yet moved
"""

from __future__ import annotations

import os
import signal
import time

#: The environment variable tests set; never set in production.
FAULT_ENV = "CASAM_FAULT"


def fault_point(name: str) -> None:
    """SIGKILL (or pause) this process when ``name`` is listed in ``$CASAM_FAULT``; else do nothing."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    for item in wanted.split(","):
        point, _, action = item.strip().partition("=")
        if point != name:
            continue
        if action.startswith("sleep:"):
            time.sleep(float(action[len("sleep:"):]))
        else:
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
