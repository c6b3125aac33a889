"""Sessionizer against a record-at-a-time model of SPEC §2.5, across batch splits and restores."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_pipeline import schema
from gpu_pipeline.backend.base import Backend
from gpu_pipeline.errors import CheckpointError, ConfigError
from gpu_pipeline.hashing import session_id
from gpu_pipeline.operators import sessionize
from gpu_pipeline.operators.sessionize import (
    STATE_SCHEMA,
    SessionConfig,
    Sessionizer,
    _output_order,
)
from gpu_pipeline.semantics import Semantics

GAP, LATENESS, DELAY = 10, 4, 3


@dataclass(frozen=True)
class Ev:
    """One on-time event as the operator sees it."""

    user: int
    ts: int
    event_id: str
    type_code: int
    revenue_micros: int
    page: str | None


# ---------------------------------------------------------------------- the model


@dataclass
class _ModelSession:
    user: int
    sid: int
    members: list[tuple[int, Ev]] = field(default_factory=list)
    closed: bool = False

    @property
    def end(self) -> int:
        return max(e.ts for _, e in self.members)

    def row(self, partition: int) -> dict[str, Any]:
        events = [e for _, e in self.members]
        landing = min(self.members, key=lambda m: (m[1].ts, m[0]))[1]
        exit_ = max(self.members, key=lambda m: (m[1].ts, m[0]))[1]
        codes = [e.type_code for e in events]
        return {
            "user_id": self.user,
            "session_id": self.sid,
            "session_start": min(e.ts for e in events),
            "session_end": self.end,
            "events": len(events),
            "page_views": codes.count(0),
            "product_views": codes.count(1),
            "add_to_carts": codes.count(3),
            "purchases": codes.count(6),
            "revenue": sum(e.revenue_micros for e in events) / 1e6,
            "landing_page": landing.page,
            "exit_page": exit_.page,
            "partition": partition,
        }


class Model:
    """SPEC §2.5 one event at a time: join the user's latest session unless ts > max + G."""

    def __init__(self, gap: int, lateness: int, partition: int = 0) -> None:
        self.gap, self.lateness, self.partition = gap, lateness, partition
        self.latest: dict[int, _ModelSession] = {}
        self.sessions: list[_ModelSession] = []
        self.arrivals = 0

    def apply(self, batch: list[Ev]) -> list[int]:
        out = []
        for ev in batch:
            last = self.latest.get(ev.user)
            if last is None or last.closed or ev.ts > last.end + self.gap:
                last = _ModelSession(ev.user, session_id(ev.user, ev.ts, ev.event_id))
                self.latest[ev.user] = last
                self.sessions.append(last)
            last.members.append((self.arrivals, ev))
            self.arrivals += 1
            out.append(last.sid)
        return out

    def close(self, watermark: int | None) -> list[dict[str, Any]]:
        rows = []
        for s in self.sessions:
            if not s.closed and (watermark is None or watermark > s.end + self.gap + self.lateness):
                s.closed = True
                rows.append(s.row(self.partition))
        return sorted(rows, key=lambda r: (r["user_id"], r["session_start"], r["session_id"]))


# ---------------------------------------------------------------------- streams


events_strategy = st.lists(
    st.tuples(
        st.integers(0, 5),  # user
        st.integers(0, 80),  # ts
        st.integers(0, 6),  # type code
        st.integers(0, 3_000_000),  # revenue micros
        st.sampled_from(["/a", "/b", "/c", None]),
    ),
    max_size=70,
)


def on_time_stream(raw: Sequence[tuple[int, int, int, int, str | None]]) -> list[Ev]:
    """Unique ids, and only events on time under W = max earlier ts - D (lateness L)."""
    kept: list[Ev] = []
    max_ts: int | None = None
    for k, (user, ts, code, revenue, page) in enumerate(raw):
        if max_ts is not None and ts < max_ts - DELAY - LATENESS:
            continue
        kept.append(Ev(user, ts, f"e{k}", code, revenue if code == 6 else 0, page))
        max_ts = ts if max_ts is None else max(max_ts, ts)
    return kept


def cut(events: list[Ev], cuts: list[int]) -> list[list[Ev]]:
    points = sorted({c % (len(events) + 1) for c in cuts} | {0, len(events)})
    return [events[a:b] for a, b in itertools.pairwise(points)] or [[]]


def watermarks(batches: list[list[Ev]]) -> list[int | None]:
    """The watermark after each batch: max ts so far - D (None while nothing arrived)."""
    out: list[int | None] = []
    max_ts: int | None = None
    for batch in batches:
        for ev in batch:
            max_ts = ev.ts if max_ts is None else max(max_ts, ev.ts)
        out.append(None if max_ts is None else max_ts - DELAY)
    return out


def apply_batch(op: Sessionizer, backend: Backend, batch: list[Ev]) -> list[int]:
    xp = backend.xp
    ids = backend.strings(pa.array([e.event_id for e in batch], type=pa.string()))
    sids = op.apply(
        backend.asarray(np.array([e.user for e in batch], dtype=np.int64)),
        backend.asarray(np.array([e.ts for e in batch], dtype=np.int64)),
        ids,
        backend.asarray(np.array([e.type_code for e in batch], dtype=np.int8)),
        backend.asarray(np.array([e.revenue_micros for e in batch], dtype=np.int64)),
        pa.array([e.page for e in batch], type=pa.string()),
    )
    assert sids.dtype == xp.uint64
    return [int(v) for v in backend.to_host(sids)]


def rows_of(table: pa.Table) -> list[dict[str, Any]]:
    assert table.schema.equals(schema.SESSIONS)
    for name in ("session_start", "session_end"):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, table[name].cast(pa.int64()))
    return table.to_pylist()


def run_operator(
    backend: Backend,
    batches: list[list[Ev]],
    restore_after: int | None = None,
    partition: int = 0,
) -> tuple[list[list[int]], list[list[dict[str, Any]]]]:
    """Session ids per batch and closed rows per close call (the last call is the flush)."""
    op = Sessionizer(SessionConfig(GAP, LATENESS), backend, partition)
    sids, closed = [], []
    for k, (batch, w) in enumerate(zip(batches, watermarks(batches), strict=True)):
        sids.append(apply_batch(op, backend, batch))
        if w is not None:
            closed.append(rows_of(op.close(w)))
        if restore_after == k:
            op = _round_trip(op, backend, partition)
    closed.append(rows_of(op.close(None)))
    assert len(op) == 0
    return sids, closed


def _round_trip(op: Sessionizer, backend: Backend, partition: int) -> Sessionizer:
    """Snapshot through Arrow IPC into a fresh operator, as the runtime's checkpoint does."""
    snapshot = op.snapshot()
    assert snapshot.schema.equals(STATE_SCHEMA)
    assert snapshot.num_rows == len(op)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, snapshot.schema) as writer:
        writer.write_table(snapshot)
    table = pa.ipc.open_stream(sink.getvalue()).read_all()
    fresh = Sessionizer(SessionConfig(GAP, LATENESS), backend, partition)
    fresh.restore(table)
    assert len(fresh) == len(op)
    return fresh


def run_model(batches: list[list[Ev]]) -> tuple[list[list[int]], list[list[dict[str, Any]]]]:
    model = Model(GAP, LATENESS)
    sids, closed = [], []
    for batch, w in zip(batches, watermarks(batches), strict=True):
        sids.append(model.apply(batch))
        if w is not None:
            closed.append(model.close(w))
    closed.append(model.close(None))
    return sids, closed


def _flat(rows: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    flat = [row for call in rows for row in call]
    return sorted(flat, key=lambda r: (r["user_id"], r["session_start"], r["session_id"]))


# ---------------------------------------------------------------------- tests


@settings(max_examples=60, deadline=None)
@given(events_strategy, st.lists(st.integers(0, 100), max_size=6))
def test_matches_model_per_batch_and_per_close(
    backend: Backend, raw: list[Any], cuts: list[int]
) -> None:
    batches = cut(on_time_stream(raw), cuts)
    assert run_operator(backend, batches) == run_model(batches)


@settings(max_examples=40, deadline=None)
@given(
    events_strategy,
    st.lists(st.integers(0, 100), max_size=6),
    st.lists(st.integers(0, 100), max_size=6),
)
def test_batch_split_invariance(
    backend: Backend, raw: list[Any], cuts_a: list[int], cuts_b: list[int]
) -> None:
    events = on_time_stream(raw)
    sids_a, closed_a = run_operator(backend, cut(events, cuts_a))
    sids_b, closed_b = run_operator(backend, cut(events, cuts_b))
    assert [s for b in sids_a for s in b] == [s for b in sids_b for s in b]
    assert _flat(closed_a) == _flat(closed_b)


@settings(max_examples=40, deadline=None)
@given(events_strategy, st.lists(st.integers(0, 100), max_size=6), st.integers(0, 6))
def test_snapshot_restore_invariance(
    backend: Backend, raw: list[Any], cuts: list[int], stop: int
) -> None:
    batches = cut(on_time_stream(raw), cuts)
    uninterrupted = run_operator(backend, batches)
    assert run_operator(backend, batches, restore_after=stop % len(batches)) == uninterrupted


def test_empty_batches_and_empty_state(backend: Backend) -> None:
    op = Sessionizer(SessionConfig(GAP, LATENESS), backend, 3)
    assert apply_batch(op, backend, []) == []
    assert op.close(100).num_rows == 0
    assert op.close(None).num_rows == 0
    assert op.snapshot().num_rows == 0
    op.restore(op.snapshot())
    assert len(op) == 0


def test_superseded_session_waits_for_the_watermark(backend: Backend) -> None:
    op = Sessionizer(SessionConfig(GAP, LATENESS), backend, 7)
    first = Ev(1, 0, "a", 0, 0, "/in")
    second = Ev(1, 11, "b", 6, 2_500_000, "/buy")  # 11 > 0 + G: a new session
    sids = apply_batch(op, backend, [first, second])
    assert sids[0] != sids[1]
    assert len(op) == 2
    assert op.close(GAP + LATENESS).num_rows == 0  # not strictly greater than 0 + G + L
    rows = rows_of(op.close(GAP + LATENESS + 1))
    assert [r["session_id"] for r in rows] == [sids[0]]
    last = rows_of(op.close(None))
    assert last == [
        {
            "user_id": 1, "session_id": sids[1], "session_start": 11, "session_end": 11,
            "events": 1, "page_views": 0, "product_views": 0, "add_to_carts": 0,
            "purchases": 1, "revenue": 2.5, "landing_page": "/buy", "exit_page": "/buy",
            "partition": 7,
        }
    ]  # fmt: skip


def test_gap_boundary_joins(backend: Backend) -> None:
    op = Sessionizer(SessionConfig(GAP, LATENESS), backend, 0)
    sids = apply_batch(op, backend, [Ev(5, 0, "a", 0, 0, None)])
    sids += apply_batch(op, backend, [Ev(5, GAP, "b", 0, 0, None)])  # exactly G later: joins
    sids += apply_batch(op, backend, [Ev(5, 2 * GAP + 1, "c", 0, 0, None)])  # G + 1 later
    assert sids[0] == sids[1] == session_id(5, 0, "a")
    assert sids[2] == session_id(5, 2 * GAP + 1, "c")


def test_session_id_hashes_the_utf8_event_id(backend: Backend) -> None:
    op = Sessionizer(SessionConfig(GAP, LATENESS), backend, 0)
    sids = apply_batch(op, backend, [Ev(1, 0, "ü-€", 0, 0, None), Ev(2, 0, "", 0, 0, None)])
    assert sids == [session_id(1, 0, "ü-€"), session_id(2, 0, "")]


def test_landing_and_exit_ties_across_batches(backend: Backend) -> None:
    op = Sessionizer(SessionConfig(GAP, LATENESS), backend, 0)
    apply_batch(op, backend, [Ev(2, 5, "a", 0, 0, "/first"), Ev(2, 6, "b", 0, 0, None)])
    apply_batch(op, backend, [Ev(2, 5, "c", 0, 0, "/tie-min"), Ev(2, 6, "d", 0, 0, "/tie-max")])
    (row,) = rows_of(op.close(None))
    assert row["landing_page"] == "/first"  # earlier arrival wins the min tie
    assert row["exit_page"] == "/tie-max"  # later arrival wins the max tie
    assert row["events"] == 4


def test_exit_page_null_when_max_event_has_no_page(backend: Backend) -> None:
    op = Sessionizer(SessionConfig(GAP, LATENESS), backend, 0)
    apply_batch(op, backend, [Ev(2, 1, "a", 0, 0, "/p"), Ev(2, 3, "b", 1, 0, None)])
    (row,) = rows_of(op.close(None))
    assert (row["landing_page"], row["exit_page"]) == ("/p", None)


def test_one_user_many_sessions_and_large_ids(backend: Backend) -> None:
    big = 2**63 - 1
    events = [Ev(big, 100 * k + (k % 3), f"id-{k}", k % 7, 1, f"/{k}") for k in range(50)]
    batches = cut(events, [7, 19, 33])
    assert run_operator(backend, batches) == run_model(batches)


def test_restore_rejects_foreign_state(backend: Backend) -> None:
    op = Sessionizer(SessionConfig(GAP, LATENESS), backend, 0)
    with pytest.raises(CheckpointError, match="schema"):
        op.restore(pa.table({"user_id": pa.array([1], type=pa.int64())}))
    snapshot = op.snapshot()
    twice = pa.Table.from_pylist(
        [
            {"user_id": 1, "session_id": 1, "session_start": 0, "session_end": 0, "events": 1,
             "page_views": 0, "product_views": 0, "add_to_carts": 0, "purchases": 0,
             "revenue_micros": 0, "landing_page": None, "exit_page": None, "open": True},
        ] * 2,
        schema=snapshot.schema,
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="two open sessions"):
        op.restore(twice)


def test_mismatched_columns_are_rejected(backend: Backend) -> None:
    op = Sessionizer(SessionConfig(GAP, LATENESS), backend, 0)
    one = backend.asarray(np.zeros(1, dtype=np.int64))
    two = backend.asarray(np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="different lengths"):
        op.apply(
            one, two, backend.strings(pa.array(["a"])),
            backend.asarray(np.zeros(1, dtype=np.int8)), one, pa.array(["/"]),
        )  # fmt: skip


def test_page_vocabulary_stays_bounded(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessionize, "_MIN_VOCABULARY", 0)
    events = [Ev(k % 3, k, f"e{k}", 0, 0, f"/page/{k}") for k in range(0, 400, 2)]
    batches = cut(events, list(range(0, 200, 9)))
    op = Sessionizer(SessionConfig(GAP, LATENESS), backend, 0)
    for batch, w in zip(batches, watermarks(batches), strict=True):
        apply_batch(op, backend, batch)
        op.close(w)
        assert len(op._pages) <= 4 * len(op)  # only pages the state still refers to
    assert run_operator(backend, batches) == run_model(batches)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(-3, 3), st.integers(0, 2**64 - 1))),
    st.booleans(),
)
def test_output_order_is_user_start_id(rows: list[tuple[int, int, int]], presorted: bool) -> None:
    if presorted:  # the usual shape of the state: the fast path
        rows = sorted(rows)
    user = np.array([r[0] for r in rows], dtype=np.int64)
    start = np.array([r[1] for r in rows], dtype=np.int64)
    sid = np.array([r[2] for r in rows], dtype=np.uint64)
    index = _output_order(user, start, sid)
    assert [rows[k] for k in index] == sorted(rows)


@pytest.mark.parametrize(
    ("gap", "lateness", "option"),
    [(-1, 0, "session_gap_ms"), (0, -5, "allowed_lateness_ms"), (1.5, 0, "session_gap_ms")],
)
def test_bad_config_names_the_option(gap: Any, lateness: Any, option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        SessionConfig(gap, lateness)


def test_config_from_semantics() -> None:
    config = SessionConfig.from_semantics(Semantics())
    assert (config.gap_ms, config.allowed_lateness_ms) == (30 * 60_000, 60_000)


@pytest.mark.gpu
def test_gpu_matches_cpu(cpu_backend: Backend) -> None:
    from gpu_pipeline.backend.gpu import GpuBackend

    gpu = GpuBackend()
    rng = np.random.default_rng(7)
    raw = [
        (int(rng.integers(0, 300)), int(t), int(rng.integers(0, 7)), int(rng.integers(0, 10**7)),
         str(rng.choice(["/a", "/b", "/c"])))
        for t in np.sort(rng.integers(0, 5_000, 20_000)) + rng.integers(-3, 3, 20_000)
    ]  # fmt: skip
    batches = cut(on_time_stream(raw), [1, 500, 501, 7_000, 15_000])
    for stop in (None, 2):
        assert run_operator(gpu, batches, restore_after=stop) == run_operator(
            cpu_backend, batches, restore_after=stop
        )
