"""casam-infer's request window (--concurrency): calls in flight, results in input order."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from casam_core.errors import CasamError, ManifestError


def in_order(fn: Callable[[Any], Any], items: Iterable[Any], concurrency: int) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item) or the CasamError it raised), in input order, with up to
    ``concurrency`` calls in flight.

    The next call is started before a finished one is handed back, so ``concurrency``
    requests stay in flight while the caller writes outputs. A broken export
    (ManifestError) is no single image's failure and ends the run. Leaving the loop early
    cancels the calls not yet started.
    """
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="casam-infer")
    pending: deque[tuple[Any, Future]] = deque()
    queue = iter(items)
    try:
        for item in queue:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) == concurrency:
                break
        while pending:
            item, future = pending.popleft()
            try:
                outcome: Any = future.result()
            except ManifestError:
                raise
            except CasamError as exc:
                outcome = exc
            following = next(queue, None)
            if following is not None:
                pending.append((following, pool.submit(fn, following)))
            yield item, outcome
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
