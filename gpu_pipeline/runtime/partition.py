"""One partition's operators, run in the SPEC §2 order on each decoded batch.

watermark -> dedup -> lateness (side output) -> sessions -> windows, then, at the batch's
closing watermark: expire dedup ids, close sessions, emit windows.  All state lives in the
operators; :meth:`PartitionProcessor.snapshot` captures it completely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from gpu_pipeline import schema
from gpu_pipeline.backend.base import Backend
from gpu_pipeline.decode.validate import event_type_codes, revenue_micros
from gpu_pipeline.operators.dedup import Dedup, DedupConfig
from gpu_pipeline.operators.sessionize import SessionConfig, Sessionizer
from gpu_pipeline.operators.watermark import NEG_INF, Watermark
from gpu_pipeline.operators.windows import WindowAggregator
from gpu_pipeline.semantics import Semantics


@dataclass
class BatchCounts:
    """What one batch (or a flush) did, for metrics and the run summary."""

    events: int = 0
    duplicates: int = 0
    late: int = 0
    on_time: int = 0

    def add(self, other: BatchCounts) -> None:
        self.events += other.events
        self.duplicates += other.duplicates
        self.late += other.late
        self.on_time += other.on_time


@dataclass
class BatchOutput:
    """Rows to write, by output table name, and the batch's counts."""

    tables: dict[str, pa.Table] = field(default_factory=dict)
    counts: BatchCounts = field(default_factory=BatchCounts)


class PartitionProcessor:
    """The operators of one partition and the order in which they run."""

    def __init__(self, partition: int, semantics: Semantics, backend: Backend) -> None:
        self.partition = partition
        self.semantics = semantics
        self.backend = backend
        self.watermark = Watermark(semantics.max_out_of_orderness_ms)
        self.dedup = Dedup(DedupConfig(ttl_ms=semantics.dedup_ttl_ms), backend)
        self.sessions = Sessionizer(
            SessionConfig(semantics.session_gap_ms, semantics.allowed_lateness_ms),
            backend,
            partition,
        )
        self.windows = [
            WindowAggregator(spec, semantics.allowed_lateness_ms, backend, partition)
            for spec in semantics.windows
        ]

    # ------------------------------------------------------------------ processing

    def process(self, events: pa.Table) -> BatchOutput:
        """Run one decoded batch (schema.DECODED_EVENTS, arrival order) through every operator."""
        output = BatchOutput()
        if events.num_rows:
            self._process_events(events, output)
        self._close(self.watermark.current(), output)
        return output

    def advance_idle(self, clock_ms: int) -> BatchOutput:
        """Idle policy: treat ``clock_ms`` as event time seen, then close what it passes."""
        self.watermark.advance(clock_ms)
        output = BatchOutput()
        self._close(self.watermark.current(), output)
        return output

    def flush(self) -> BatchOutput:
        """End of input: the watermark goes to +infinity; every session and window is written."""
        output = BatchOutput()
        self._close(None, output)
        return output

    def _process_events(self, events: pa.Table, output: BatchOutput) -> None:
        xp = self.backend.xp
        asarray = self.backend.asarray
        lateness = self.semantics.allowed_lateness_ms
        ts_host = _int64(events["ts"])
        ts = asarray(ts_host)
        w = self.watermark.apply(ts, xp)
        duplicate = self.dedup.apply(self.backend.strings(events["event_id"]), ts, w)
        finite = w != NEG_INF
        late = ~duplicate & finite & (ts < xp.where(finite, w, 0) - lateness)
        on_time = ~duplicate & ~late
        late_rows = self.backend.to_host(xp.flatnonzero(late))
        on_rows = self.backend.to_host(xp.flatnonzero(on_time))
        counts = output.counts
        counts.events = events.num_rows
        counts.duplicates = int(self.backend.to_host(duplicate).sum())
        counts.late = int(late_rows.shape[0])
        counts.on_time = int(on_rows.shape[0])
        if late_rows.shape[0]:
            output.tables["late_events"] = self._late_rows(
                events, late_rows, self.backend.to_host(w)
            )
        if not on_rows.shape[0]:
            return
        on_events = events.take(pa.array(on_rows))
        on_idx = asarray(on_rows)
        user = asarray(_int64(on_events["user_id"]))
        on_ts = ts[on_idx]
        etype = asarray(event_type_codes(on_events))
        micros = asarray(revenue_micros(on_events))
        session_ids = self.sessions.apply(
            user,
            on_ts,
            self.backend.strings(on_events["event_id"]),
            etype,
            micros,
            on_events["page"],
        )
        output.tables["events"] = _events_rows(on_events, self.backend.to_host(session_ids))
        on_w = w[on_idx]
        product = on_events["product_id"]
        has_product = asarray(product.is_valid().to_numpy(zero_copy_only=False))
        product_ids = asarray(_int64(product.fill_null(-1)))
        for aggregator in self.windows:
            if aggregator.spec.key == "event_type":
                key, has_key = etype.astype(xp.int64), xp.ones(on_rows.shape[0], dtype=bool)
            else:
                key, has_key = product_ids, has_product
            aggregator.apply(key, has_key, user, on_ts, on_w, etype, micros)

    def _close(self, watermark: int | None, output: BatchOutput) -> None:
        """Expire, close and emit everything the watermark (None = +infinity) has passed."""
        if watermark is not None and watermark != NEG_INF:
            self.dedup.expire(watermark)
        if watermark == NEG_INF:
            return
        closed = self.sessions.close(watermark)
        if closed.num_rows:
            output.tables["sessions"] = closed
        for aggregator in self.windows:
            rows = aggregator.emit(watermark)
            if rows.num_rows:
                output.tables[aggregator.spec.table] = rows

    def _late_rows(self, events: pa.Table, rows: np.ndarray, w: np.ndarray) -> pa.Table:
        late = events.take(pa.array(rows))
        wm = w[rows]
        lag = wm - _int64(late["ts"])
        reasons = [
            f"ts is {int(d)} ms behind the watermark; allowed lateness is "
            f"{self.semantics.allowed_lateness_ms} ms"
            for d in lag
        ]
        columns: dict[str, Any] = {f.name: late[f.name] for f in schema.EVENT_FIELDS}
        columns["watermark"] = pa.array(wm, type=pa.int64()).cast(schema.TS)
        columns["reason"] = pa.array(reasons, type=pa.string())
        for f in schema.POSITION_FIELDS:
            columns[f.name] = late[f.name]
        return pa.table(columns, schema=schema.LATE_EVENTS)

    # ------------------------------------------------------------------ state

    def snapshot(self) -> dict[str, pa.Table]:
        """Every operator's state as Arrow tables (written by the checkpoint store)."""
        state = {
            "watermark": self.watermark.snapshot(),
            "dedup": self.dedup.snapshot(),
            "sessions": self.sessions.snapshot(),
        }
        for aggregator in self.windows:
            state[f"window-{aggregator.spec.table}"] = aggregator.snapshot()
        return state

    def restore(self, state: dict[str, pa.Table]) -> None:
        """Rebuild every operator from :meth:`snapshot` output."""
        self.watermark.restore(state["watermark"])
        self.dedup.restore(state["dedup"])
        self.sessions.restore(state["sessions"])
        for aggregator in self.windows:
            aggregator.restore(state[f"window-{aggregator.spec.table}"])

    def state_sizes(self) -> dict[str, int]:
        """How many entries each operator holds (bounded-state checks and progress)."""
        sizes = {"dedup_ids": len(self.dedup), "sessions": len(self.sessions)}
        for aggregator in self.windows:
            sizes[f"windows_{aggregator.spec.table}"] = len(aggregator)
        return sizes


def _int64(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A non-null integer/timestamp column as an int64 numpy array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_timestamp(column.type):
        column = column.view(pa.int64())
    return np.ascontiguousarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)


def _events_rows(on_events: pa.Table, session_ids: np.ndarray) -> pa.Table:
    columns: dict[str, Any] = {f.name: on_events[f.name] for f in schema.EVENT_FIELDS}
    columns["session_id"] = pa.array(session_ids, type=pa.uint64())
    for f in schema.POSITION_FIELDS:
        columns[f.name] = on_events[f.name]
    return pa.table(columns, schema=schema.EVENTS)
