"""Read and decode the next micro-batches on a background thread.

Reading (generator, file) and decoding (pyarrow, which releases the GIL) of batch N+1 then
overlap the operators and sink inserts of batch N.  Batches keep their order and their
boundaries, so results and insert tokens are exactly those of a sequential run.  Kafka
sources are not prefetched: their rebalance callbacks must run on the loop's thread.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
U = TypeVar("U")
_DONE = object()


def prefetch(items: Iterator[T], work: Callable[[T], U], depth: int = 2) -> Iterator[tuple[T, U]]:
    """Yield ``(item, work(item))`` in order, computing up to ``depth`` ahead on a thread.

    An exception in the background is re-raised in the consumer at the same position.
    Closing the returned generator stops the background thread after its current item.
    """
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put((item, work(item)))
        except BaseException as exc:
            slots.put(exc)
            return
        slots.put(_DONE)

    thread = threading.Thread(target=produce, name="gpu-pipeline-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            entry = slots.get()
            if entry is _DONE:
                return
            if isinstance(entry, BaseException):
                raise entry
            yield entry
    finally:
        stop.set()
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                slots.get(timeout=0.05)
