"""The event-time guard (SPEC §2.9): one corrupted far-future ``ts`` must not move the watermark.

The rule (docs/semantics.md, "Event-time guard"), per partition, over valid events in
arrival order, with bound B = ``max_future_skew_ms`` (0 turns the guard off):

* M(e) is the largest ``ts`` of the earlier events that the guard let through
  (minus infinity before the first);
* e is **suspect** when ``ts(e) > M(e) + B`` (the first event of a partition is always
  suspect: there is nothing to compare it with yet);
* a suspect e is **set apart** (a dead letter naming ``ts`` and the bound) when the next
  valid event f of the partition contradicts it: ``ts(f) < ts(e) - B``.  Otherwise (f
  agrees, or there is no f at end of input) e passes.

A lone corrupted time is contradicted by the very next event and set apart; a legitimate
pause followed by traffic is confirmed by the second event after the pause.  The verdict
depends only on the events themselves, never on batch boundaries or wall clocks: a suspect
that is the last event of a micro-batch is *held* (carried in the checkpointed state) until
its successor arrives, and is processed, in arrival order, before that successor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from gpu_pipeline import schema
from gpu_pipeline.operators.watermark import NEG_INF

HELD_SCHEMA = pa.schema(
    [
        *schema.DECODED_EVENTS,
        pa.field("raw", pa.binary(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("source_ts", pa.int64(), nullable=False),
    ]
)
"""A held suspect: the decoded event, its raw bytes and source name (for its dead letter) and
the source's time of its record (0: none)."""

_FIRST_WINDOW = 4096
"""Rows scanned per pass after a rejection; grows while passes find nothing to reject, so a
clean batch is one vectorised pass."""
_DENSE_REJECTIONS = 32
"""After this many rejections in one batch the rest of it is screened one event at a time
(linear, at Python speed) instead of one vectorised pass per rejection."""


@dataclass(frozen=True)
class GuardConfig:
    """The bound B in milliseconds; 0 disables the guard."""

    max_future_skew_ms: int

    @property
    def enabled(self) -> bool:
        return self.max_future_skew_ms > 0


@dataclass(frozen=True)
class Rejection:
    """Why the guard set row ``index`` apart: the reference M(e) and the contradicting ts(f)."""

    index: int
    ts_ms: int
    reference_ms: int
    successor_ts_ms: int


@dataclass(frozen=True)
class Screening:
    """The guard's verdict on one batch of event times."""

    rejected: list[Rejection] = field(default_factory=list)
    hold_last: bool = False

    @property
    def keep_all(self) -> bool:
        return not self.rejected and not self.hold_last


def screen(ts: np.ndarray, max_ts: int, bound_ms: int) -> Screening:
    """Apply the guard to ``ts`` (int64 epoch ms, arrival order) after a partition max ``max_ts``.

    Returns the rows to set apart and whether the last row must be held for its successor.
    A pass computes the exclusive running maximum; only a rejection changes it, so the scan
    restarts after each rejected row, over a window that grows while nothing is rejected.
    """
    n = int(ts.shape[0])
    rejected: list[Rejection] = []
    start, reference, width = 0, int(max_ts), _FIRST_WINDOW
    while start < n:
        stop = min(n, start + width)
        seg = ts[start:stop]
        before = np.empty(seg.shape[0], dtype=np.int64)
        before[0] = reference
        if seg.shape[0] > 1:
            np.maximum.accumulate(seg[:-1], out=before[1:])
            np.maximum(before[1:], reference, out=before[1:])
        suspect = (before == NEG_INF) | (seg > before + bound_ms)
        following = ts[start + 1 : stop + 1] if stop < n else ts[start + 1 : stop]
        contradicted = np.zeros(seg.shape[0], dtype=bool)
        contradicted[: following.shape[0]] = following < seg[: following.shape[0]] - bound_ms
        hits = np.flatnonzero(suspect & contradicted)
        if hits.shape[0] and len(rejected) >= _DENSE_REJECTIONS:
            # corrupt times are dense here: one plain pass is cheaper than a pass per rejection
            return _sequential(ts, start, reference, bound_ms, rejected)
        if hits.shape[0]:
            k = int(hits[0])
            rejected.append(
                Rejection(start + k, int(seg[k]), int(before[k]), int(ts[start + k + 1]))
            )
            # everything before k stands; the scan resumes after k with M(k) unchanged
            reference, start = int(before[k]), start + k + 1
            width = max(64, 2 * (k + 1))
            continue
        if stop == n:
            return Screening(rejected, hold_last=bool(suspect[-1]))
        reference = max(reference, int(seg.max()))
        start, width = stop, width * 2
    return Screening(rejected, hold_last=False)


def _sequential(
    ts: np.ndarray, start: int, reference: int, bound_ms: int, rejected: list[Rejection]
) -> Screening:
    """The rule one event at a time from ``start`` (the same verdicts as the scan)."""
    values = ts[start:].tolist()
    n = len(values)
    for k, t in enumerate(values):
        if reference == NEG_INF or t > reference + bound_ms:
            if k == n - 1:
                return Screening(rejected, hold_last=True)
            if values[k + 1] < t - bound_ms:
                rejected.append(Rejection(start + k, t, reference, values[k + 1]))
                continue
        if t > reference:
            reference = t
    return Screening(rejected, hold_last=False)


def rejection_reason(rejection: Rejection, bound_ms: int) -> str:
    """The dead letter's error: names ``ts`` and the bound, and what contradicted it."""
    ts = _iso(rejection.ts_ms)
    if rejection.reference_ms == NEG_INF:
        against = "the partition's first event time"
    else:
        against = f"the partition's event time {_iso(rejection.reference_ms)}"
    return (
        f"ts: {ts} is more than max_future_skew ({_human(bound_ms)}) ahead of {against}, "
        f"and the next event ({_iso(rejection.successor_ts_ms)}) does not confirm it"
    )


def clock_reason(ts_ms: int, clock_ms: int, bound_ms: int) -> str:
    """The error of a held event that the idle policy's wall clock refuted."""
    return (
        f"ts: {_iso(ts_ms)} is more than max_future_skew ({_human(bound_ms)}) ahead of the "
        f"wall clock {_iso(clock_ms)} while the partition was idle"
    )


class EventTimeGuard:
    """Screens each batch's event times and holds an undecided suspect between batches."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self._held = HELD_SCHEMA.empty_table()

    @property
    def held(self) -> pa.Table:
        """The held suspect (0 or 1 rows of :data:`HELD_SCHEMA`)."""
        return self._held

    def take_held(self) -> pa.Table:
        """Remove and return the held suspect."""
        held, self._held = self._held, HELD_SCHEMA.empty_table()
        return held

    def hold(self, row: pa.Table) -> None:
        """Keep ``row`` (one row of :data:`HELD_SCHEMA`) until its successor arrives."""
        self._held = row.select(HELD_SCHEMA.names).cast(HELD_SCHEMA)

    def screen(self, ts: np.ndarray, max_ts: int) -> Screening:
        """The verdict on a batch (with any held row first); everything passes when off."""
        if not self.config.enabled or ts.shape[0] == 0:
            return Screening()
        return screen(ts, max_ts, self.config.max_future_skew_ms)

    def snapshot(self) -> pa.Table:
        """The held suspect, as a table (empty when nothing is held)."""
        return self._held

    def restore(self, table: pa.Table | None) -> None:
        """Rebuild from :meth:`snapshot` (``None``: a checkpoint from before the guard)."""
        if table is None:
            self._held = HELD_SCHEMA.empty_table()
            return
        if "source_ts" not in table.column_names:  # a checkpoint from before quality counts
            table = table.append_column("source_ts", pa.array([0] * table.num_rows, pa.int64()))
        self._held = table.select(HELD_SCHEMA.names).cast(HELD_SCHEMA)


def _iso(ms: int) -> str:
    seconds, millis = divmod(int(ms), 1000)
    return np.datetime64(seconds, "s").astype(str) + f".{millis:03d}Z"


def _human(ms: int) -> str:
    for unit, size in (("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
