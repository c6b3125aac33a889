"""One partition's operators, run in the SPEC §2 order on each decoded batch.

event-time guard -> watermark -> dedup -> lateness (side output) -> sessions -> windows,
then, at the batch's closing watermark: expire dedup ids, close sessions, emit windows; the
quality counts (``quality_1m``) of everything the call saw come last.
All state lives in the operators; :meth:`PartitionProcessor.snapshot` captures it completely.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gpu_pipeline import schema
from gpu_pipeline.backend.base import Backend
from gpu_pipeline.decode.base import DecodeResult
from gpu_pipeline.decode.validate import event_type_codes, revenue_micros
from gpu_pipeline.operators.dedup import Dedup, DedupConfig
from gpu_pipeline.operators.guard import (
    EventTimeGuard,
    GuardConfig,
    Rejection,
    clock_reason,
    rejection_reason,
)
from gpu_pipeline.operators.quality import OPTIONAL_FIELDS, EventQuality, QualityCounter
from gpu_pipeline.operators.sessionize import SessionConfig, Sessionizer
from gpu_pipeline.operators.watermark import NEG_INF, Watermark
from gpu_pipeline.operators.windows import WindowAggregator
from gpu_pipeline.semantics import Semantics
from gpu_pipeline.sources.base import RawBatch


@dataclass
class BatchCounts:
    """What one batch (or a flush) did, for metrics and the run summary."""

    events: int = 0
    """Valid events the guard let through: duplicates + late + on_time."""
    duplicates: int = 0
    late: int = 0
    on_time: int = 0
    future_ts: int = 0
    """Valid records the event-time guard set apart as dead letters."""

    def add(self, other: BatchCounts) -> None:
        self.events += other.events
        self.duplicates += other.duplicates
        self.late += other.late
        self.on_time += other.on_time
        self.future_ts += other.future_ts


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
        self.guard = EventTimeGuard(GuardConfig(semantics.max_future_skew_ms))
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
        self.quality = QualityCounter(partition)

    # ------------------------------------------------------------------ processing

    def process(self, raw: RawBatch, decoded: DecodeResult) -> BatchOutput:
        """Run one decoded batch of ``raw`` through every operator.

        The output's ``dead_letters`` are the decoder's plus the events the guard set apart.
        """
        output = BatchOutput()
        events, ts, source_ts = self._screen(raw, decoded, output)
        if events.num_rows:
            self._process_events(events, ts, source_ts, output)
        self._add_dead_letters(output, decoded.dead)
        self._close(self.watermark.current(), output)
        self._add_quality(output)
        return output

    def advance_idle(self, clock_ms: int) -> BatchOutput:
        """Idle policy: treat ``clock_ms`` as event time seen, then close what it passes.

        A held suspect is decided by the clock: it passes unless it is more than the
        guard's bound ahead of the wall clock.
        """
        output = BatchOutput()
        held = self.guard.take_held()
        if held.num_rows:
            ts_ms = int(_int64(held["ts"])[0])
            bound = self.semantics.max_future_skew_ms
            if ts_ms > clock_ms + bound:
                reason = clock_reason(ts_ms, clock_ms, bound)
                self._add_dead_letters(output, _dead_rows(held, [reason]))
                output.counts.future_ts += 1
            else:
                self._process_events(
                    _decoded(held), _int64(held["ts"]), _int64(held["source_ts"]), output
                )
        self.watermark.advance(clock_ms)
        self._close(self.watermark.current(), output)
        self._add_quality(output)
        return output

    def flush(self) -> BatchOutput:
        """End of input: a held suspect passes (nothing contradicts it), then the watermark
        goes to +infinity and every session and window is written."""
        output = BatchOutput()
        held = self.guard.take_held()
        if held.num_rows:
            self._process_events(
                _decoded(held), _int64(held["ts"]), _int64(held["source_ts"]), output
            )
        self._close(None, output)
        self._add_quality(output)
        return output

    def _screen(
        self, raw: RawBatch, decoded: DecodeResult, output: BatchOutput
    ) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """The event-time guard: the events that go on, with their times and their source
        times (0: none); the rest set apart (dead letters) or held for their successor."""
        events = decoded.events
        held = self.guard.take_held()
        if raw.timestamps is None:
            source_ts = np.zeros(events.num_rows, np.int64)
        else:
            source_ts = np.asarray(raw.timestamps, np.int64)[decoded.record_index]
        if held.num_rows:
            events = pa.concat_tables([held.select(schema.DECODED_EVENTS.names), events])
            source_ts = np.concatenate([_int64(held["source_ts"]), source_ts])
        ts = _int64(events["ts"])
        verdict = self.guard.screen(ts, self.watermark.max_ts)
        if verdict.keep_all:
            return events, ts, source_ts
        offset = held.num_rows

        def with_raw(rows: list[int]) -> pa.Table:
            """Rows of ``events`` with their raw bytes and source, as HELD_SCHEMA rows."""
            raws, sources = [], []
            for i in rows:
                if i < offset:
                    raws.append(held["raw"][i].as_py())
                    sources.append(held["source"][i].as_py())
                else:
                    raws.append(raw.record(int(decoded.record_index[i - offset])))
                    sources.append(raw.source)
            table = events.take(pa.array(rows, type=pa.int64()))
            return (
                table.append_column("raw", pa.array(raws, pa.binary()))
                .append_column("source", pa.array(sources, pa.string()))
                .append_column("source_ts", pa.array(source_ts[rows], pa.int64()))
            )

        drop = np.zeros(ts.shape[0], dtype=bool)
        if verdict.rejected:
            rejected: list[Rejection] = verdict.rejected
            rows = [r.index for r in rejected]
            bound = self.semantics.max_future_skew_ms
            reasons = [rejection_reason(r, bound) for r in rejected]
            self._add_dead_letters(output, _dead_rows(with_raw(rows), reasons))
            output.counts.future_ts += len(rows)
            drop[rows] = True
        if verdict.hold_last:
            self.guard.hold(with_raw([ts.shape[0] - 1]))
            drop[-1] = True
        keep = np.flatnonzero(~drop)
        return events.take(pa.array(keep)), ts[keep], source_ts[keep]

    def _add_dead_letters(self, output: BatchOutput, dead: pa.Table) -> None:
        """Merge ``dead`` into the output's dead letters, in arrival order."""
        if not dead.num_rows:
            return
        current = output.tables.get("dead_letters")
        if current is not None and current.num_rows:
            dead = pa.concat_tables([current, dead]).sort_by(
                [("offset", "ascending"), ("seq", "ascending")]
            )
        output.tables["dead_letters"] = dead

    def _process_events(
        self, events: pa.Table, ts_host: np.ndarray, source_ts: np.ndarray, output: BatchOutput
    ) -> None:
        xp = self.backend.xp
        asarray = self.backend.asarray
        lateness = self.semantics.allowed_lateness_ms
        ts = asarray(ts_host)
        w = self.watermark.apply(ts, self.backend)
        duplicate = self.dedup.apply(self.backend.strings(events["event_id"]), ts, w)
        finite = w != NEG_INF
        late = ~duplicate & finite & (ts < xp.where(finite, w, 0) - lateness)
        on_time = ~duplicate & ~late
        to_host = self.backend.to_host
        w_host, duplicate_host, late_host = to_host(w), to_host(duplicate), to_host(late)
        late_rows = np.flatnonzero(late_host)
        on_rows = to_host(xp.flatnonzero(on_time))
        counts = output.counts
        counts.events += events.num_rows
        counts.duplicates += int(duplicate_host.sum())
        counts.late += int(late_rows.shape[0])
        counts.on_time += int(on_rows.shape[0])
        self._count_quality(events, ts_host, source_ts, w_host, duplicate_host, late_host)
        if late_rows.shape[0]:
            _append(output, "late_events", self._late_rows(events, late_rows, w_host))
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
        _append(output, "events", _events_rows(on_events, self.backend.to_host(session_ids)))
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

    def _count_quality(
        self,
        events: pa.Table,
        ts: np.ndarray,
        source_ts: np.ndarray,
        w_host: np.ndarray,
        duplicate: np.ndarray,
        late: np.ndarray,
    ) -> None:
        """Hand the accepted events (host arrays) to the quality counts."""
        bound = self.semantics.max_future_skew_ms
        if bound > 0:
            finite = w_host != NEG_INF
            reference = np.where(finite, w_host, 0) + self.watermark.delay_ms
            suspect = ~finite | (ts > reference + bound)
        else:
            suspect = np.zeros(ts.shape[0], dtype=bool)
        self.quality.add_events(
            EventQuality(
                ts=ts,
                offsets=_int64(events["offset"]),
                seqs=_int64(events["seq"]),
                suspect=suspect,
                duplicate=np.asarray(duplicate, dtype=bool),
                late=np.asarray(late, dtype=bool),
                present={
                    name: np.asarray(
                        events[name].is_valid().to_numpy(zero_copy_only=False), dtype=bool
                    )
                    for name in OPTIONAL_FIELDS
                },
                source_ts=source_ts,
            )
        )

    def _add_quality(self, output: BatchOutput) -> None:
        """The quality rows of this call (its events and dead letters)."""
        rows = self.quality.rows(output.tables.get("dead_letters"))
        if rows is not None:
            output.tables["quality_1m"] = rows

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
        # one vectorised string build, no Python object per row
        allowed = (
            f" ms behind the watermark; allowed lateness is {self.semantics.allowed_lateness_ms}"
        )
        reasons = pc.binary_join_element_wise(
            "ts is ", pc.cast(pa.array(lag, type=pa.int64()), pa.string()), allowed + " ms", ""
        )
        columns: dict[str, Any] = {f.name: late[f.name] for f in schema.EVENT_FIELDS}
        columns["watermark"] = pa.array(wm, type=pa.int64()).cast(schema.TS)
        columns["reason"] = reasons
        for f in schema.POSITION_FIELDS:
            columns[f.name] = late[f.name]
        return pa.table(columns, schema=schema.LATE_EVENTS)

    # ------------------------------------------------------------------ state

    def snapshot(self) -> dict[str, pa.Table]:
        """Every operator's state as Arrow tables (written by the checkpoint store)."""
        state = {
            "guard": self.guard.snapshot(),
            "watermark": self.watermark.snapshot(),
            "dedup": self.dedup.snapshot(),
            "sessions": self.sessions.snapshot(),
            "quality": self.quality.snapshot(),
        }
        for aggregator in self.windows:
            state[f"window-{aggregator.spec.table}"] = aggregator.snapshot()
        return state

    def restore(self, state: dict[str, pa.Table]) -> None:
        """Rebuild every operator from :meth:`snapshot` output."""
        self.guard.restore(state.get("guard"))
        self.watermark.restore(state["watermark"])
        self.dedup.restore(state["dedup"])
        self.sessions.restore(state["sessions"])
        self.quality.restore(state.get("quality"))
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


def _append(output: BatchOutput, table: str, rows: pa.Table) -> None:
    """Add rows to an output table (an idle tick or flush may process a held event first)."""
    current = output.tables.get(table)
    output.tables[table] = rows if current is None else pa.concat_tables([current, rows])


def _decoded(held: pa.Table) -> pa.Table:
    """A held suspect as a decoded event row."""
    return held.select(schema.DECODED_EVENTS.names).cast(schema.DECODED_EVENTS)


def _dead_rows(rows: pa.Table, reasons: list[str]) -> pa.Table:
    """Dead letters for guard rows (HELD_SCHEMA) with their reasons."""
    return pa.table(
        {
            "raw": rows["raw"],
            "error": pa.array(reasons, pa.string()),
            "source": rows["source"],
            "partition": rows["partition"],
            "offset": rows["offset"],
            "seq": rows["seq"],
        },
        schema=schema.DEAD_LETTERS,
    )


def _events_rows(on_events: pa.Table, session_ids: np.ndarray) -> pa.Table:
    columns: dict[str, Any] = {f.name: on_events[f.name] for f in schema.EVENT_FIELDS}
    columns["session_id"] = pa.array(session_ids, type=pa.uint64())
    for f in schema.POSITION_FIELDS:
        columns[f.name] = on_events[f.name]
    return pa.table(columns, schema=schema.EVENTS)
