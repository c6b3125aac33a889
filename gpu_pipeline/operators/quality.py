"""Data-quality counts per minute (the ``quality_1m`` table): what arrived and how good it was.

Every record of a partition lands in exactly one minute:

* a valid event the event-time guard let through, in the minute of its own ``ts``; it is
  counted once as an event and once as exactly one of duplicate, late or on-time;
* a dead letter (the decoder's or the guard's), which has no trusted time, in the minute of
  the partition's *quality clock* where it sits: the largest ``ts`` among the earlier
  accepted events that were not suspects of the guard (``ts <= M + max_future_skew``,
  M the running maximum the watermark uses).  Suspects are left out because their fate can
  wait for the next event, possibly in the next micro-batch, and the minute of a record must
  not depend on where batches are cut.  Before the clock has a value, dead letters land in
  the minute 1970-01-01 00:00.

Completeness (how many on-time events carry each optional field) and ingest lag (the
source's own record time minus ``ts``; Kafka message timestamps, so a replay computes the
same figures) are counted over on-time events, the rows of ``events``.

Rows are partial sums for one partition and one stretch of input; ``quality_1m_total`` adds
them up, so the figures do not depend on batch sizes, checkpoints or worker count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gpu_pipeline import schema
from gpu_pipeline.operators.watermark import NEG_INF

MINUTE_MS = 60_000

OPTIONAL_FIELDS = schema.QUALITY_FIELDS
"""Optional event fields whose presence is counted (completeness)."""
COUNT_COLUMNS = schema.QUALITY_SUMS
"""Columns that add up across rows of the same minute and partition."""


@dataclass
class EventQuality:
    """One call's accepted events, as the counts need them (host arrays, arrival order)."""

    ts: np.ndarray
    offsets: np.ndarray
    seqs: np.ndarray
    suspect: np.ndarray
    duplicate: np.ndarray
    late: np.ndarray
    present: dict[str, np.ndarray]
    """Per optional field, whether each event has it."""
    source_ts: np.ndarray
    """The source's record time per event in epoch ms, 0 when the source has none."""


class QualityCounter:
    """Counts one partition's records per minute; only the quality clock is state."""

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self.clock = NEG_INF
        self._pending: list[EventQuality] = []

    def add_events(self, batch: EventQuality) -> None:
        """Remember accepted events until :meth:`rows` (several calls may make one output)."""
        if batch.ts.shape[0]:
            self._pending.append(batch)

    def rows(self, dead: pa.Table | None) -> pa.Table | None:
        """The quality rows of everything added since the last call plus the dead letters
        ``dead`` (positioned rows of ``schema.DEAD_LETTERS``); advances the clock."""
        pending, self._pending = self._pending, []
        minutes: list[np.ndarray] = []
        columns: dict[str, list[np.ndarray]] = {name: [] for name in COUNT_COLUMNS}
        lag_max: list[np.ndarray] = []

        def add(minute: np.ndarray, **values: np.ndarray) -> None:
            n = minute.shape[0]
            minutes.append(minute)
            for name in COUNT_COLUMNS:
                column = values.get(name)
                columns[name].append(np.zeros(n, np.int64) if column is None else column)
            lag_max.append(values.get("lag_ms_max", np.full(n, NEG_INF, np.int64)))

        for batch in pending:
            on_time = ~batch.duplicate & ~batch.late
            one = np.ones(batch.ts.shape[0], np.int64)
            known = on_time & (batch.source_ts > 0)
            lag = np.where(known, batch.source_ts - batch.ts, 0)
            add(
                np.floor_divide(batch.ts, MINUTE_MS) * MINUTE_MS,
                records=one,
                events=one,
                duplicates=batch.duplicate.astype(np.int64),
                late=batch.late.astype(np.int64),
                on_time=on_time.astype(np.int64),
                **{
                    f"with_{name}": (on_time & batch.present[name]).astype(np.int64)
                    for name in OPTIONAL_FIELDS
                },
                lag_events=known.astype(np.int64),
                lag_ms_sum=lag,
                lag_ms_max=np.where(known, lag, NEG_INF),
            )
        if dead is not None and dead.num_rows:
            clock = self._clock_at(pending, dead)
            minute = np.where(clock == NEG_INF, 0, np.floor_divide(clock, MINUTE_MS) * MINUTE_MS)
            one = np.ones(dead.num_rows, np.int64)
            add(minute, records=one, dead_letters=one)
        for batch in pending:
            trusted = batch.ts[~batch.suspect]
            if trusted.shape[0]:
                self.clock = max(self.clock, int(trusted.max()))
        if not minutes:
            return None
        return _aggregate(self.partition, minutes, columns, lag_max)

    def _clock_at(self, events: list[EventQuality], dead: pa.Table) -> np.ndarray:
        """The quality clock at each dead letter's position (exclusive of later events)."""
        d_off = _ints(dead["offset"])
        d_seq = _ints(dead["seq"])
        if not events:
            return np.full(d_off.shape[0], self.clock, np.int64)
        e_off = np.concatenate([e.offsets for e in events])
        e_seq = np.concatenate([e.seqs for e in events])
        e_ts = np.concatenate([e.ts for e in events])
        e_suspect = np.concatenate([e.suspect for e in events])
        trusted = np.where(e_suspect, NEG_INF, e_ts)
        prefix = np.maximum.accumulate(trusted)
        before = np.searchsorted(e_off, d_off, side="left")
        through = np.searchsorted(e_off, d_off, side="right")
        for k in np.flatnonzero(through > before).tolist():
            # events of the same message (several NDJSON events per Kafka message): by seq
            lo, hi = int(before[k]), int(through[k])
            before[k] = lo + int(np.count_nonzero(e_seq[lo:hi] < d_seq[k]))
        earlier = np.where(before > 0, prefix[np.maximum(before - 1, 0)], NEG_INF)
        return np.maximum(earlier, self.clock)

    # ------------------------------------------------------------------ state

    def snapshot(self) -> pa.Table:
        """The quality clock as a one-row table."""
        return pa.table({"clock": pa.array([self.clock], type=pa.int64())})

    def restore(self, table: pa.Table | None) -> None:
        """Rebuild from :meth:`snapshot` (``None``: a checkpoint taken before quality counts,
        whose clock starts over; only the minute of later dead letters can differ)."""
        self.clock = NEG_INF if table is None else int(table["clock"][0].as_py())
        self._pending = []


def _aggregate(
    partition: int,
    minutes: list[np.ndarray],
    columns: dict[str, list[np.ndarray]],
    lag_max: list[np.ndarray],
) -> pa.Table:
    """One row per minute: the columns summed (exact int64), the lag maximum taken."""
    minute = np.concatenate(minutes)
    order = np.argsort(minute, kind="stable")
    ordered = minute[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    n = starts.shape[0]
    out: dict[str, pa.Array] = {
        "minute": pa.array(ordered[starts], type=pa.int64()).cast(schema.TS),
        "partition": pa.array(np.full(n, partition, np.int32)),
    }
    for name in COUNT_COLUMNS:
        values = np.concatenate(columns[name]).astype(np.int64, copy=False)[order]
        out[name] = pa.array(np.add.reduceat(values, starts))
    maxima = np.maximum.reduceat(np.concatenate(lag_max)[order], starts)
    out["lag_ms_max"] = pa.array(np.where(maxima == NEG_INF, 0, maxima))
    return pa.table(out, schema=schema.QUALITY_1M)


def _ints(column: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(column.to_numpy(), dtype=np.int64)
