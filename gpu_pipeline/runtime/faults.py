"""Injected crashes for recovery tests: ``GPU_PIPELINE_CRASH_AT=point:n`` kills the process
(``os._exit(137)``, like kill -9: no cleanup, no flush) the n-th time ``point`` is reached.

Points: ``after_batch`` (a batch processed, its rows waiting for the next checkpoint),
``after_sink_write`` (a checkpoint's rows inserted, its state not yet written),
``during_snapshot`` (between two operator state files of a checkpoint),
``after_checkpoint`` (state durable, source offsets not yet committed).
Unset (the default), a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import sys

_counts: dict[str, int] = {}


def crash_point(point: str) -> None:
    """Die here if the environment asks for it (tests only)."""
    spec = os.environ.get("GPU_PIPELINE_CRASH_AT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] >= int(nth or 1):
        sys.stderr.write(f"injected crash at {point} #{_counts[point]}\n")
        sys.stderr.flush()
        os._exit(137)
