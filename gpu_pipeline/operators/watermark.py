"""The watermark (SPEC §2.2): W(e) = max ts of the earlier valid events of the partition - D.

The per-row watermark is an exclusive running maximum, seeded with the maximum carried from
earlier batches: a prefix scan, which each engine provides (``Backend.running_max``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from gpu_pipeline.backend.base import Backend

NEG_INF = int(np.iinfo(np.int64).min)
"""The watermark before the first event: minus infinity."""


@dataclass
class _WatermarkState:
    max_ts: int = NEG_INF


class Watermark:
    """Per-row watermarks and the partition's running maximum event time."""

    def __init__(self, max_out_of_orderness_ms: int) -> None:
        self.delay_ms = max_out_of_orderness_ms
        self._state = _WatermarkState()

    def apply(self, ts: Any, backend: Backend) -> Any:
        """W for each row (int64, NEG_INF = -inf), and advance the running maximum."""
        xp = backend.xp
        n = int(ts.shape[0])
        if n == 0:
            return xp.zeros(0, dtype=xp.int64)
        before = xp.empty(n, dtype=xp.int64)
        before[0] = self._state.max_ts
        if n > 1:
            running = backend.running_max(ts[:-1])
            before[1:] = xp.maximum(running, self._state.max_ts)
        self._state.max_ts = max(self._state.max_ts, int(ts.max()))
        finite = before != NEG_INF
        return xp.where(finite, before - self.delay_ms, NEG_INF)

    def advance(self, ts_ms: int) -> None:
        """Count ``ts_ms`` as seen (the idle-partition policy's wall clock)."""
        self._state.max_ts = max(self._state.max_ts, ts_ms)

    def current(self) -> int:
        """The watermark after the last event seen (NEG_INF before any)."""
        m = self._state.max_ts
        return NEG_INF if m == NEG_INF else m - self.delay_ms

    @property
    def max_ts(self) -> int:
        """The largest event time seen in this partition (NEG_INF before any)."""
        return self._state.max_ts

    def snapshot(self) -> pa.Table:
        """The running maximum as a one-row table."""
        return pa.table({"max_ts": pa.array([self._state.max_ts], type=pa.int64())})

    def restore(self, table: pa.Table) -> None:
        """Rebuild from :meth:`snapshot`."""
        self._state = _WatermarkState(int(table["max_ts"][0].as_py()))
