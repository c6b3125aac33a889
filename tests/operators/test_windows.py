"""WindowAggregator against a Python model of SPEC §2.6, the reference model, and itself.

The operator receives on-time rows only, each with its own watermark ``w`` (the max ts of
the earlier events of the partition minus D), and emits at batch ends with the watermark
after the batch.  Streams here jitter timestamps and mix in late arrivals, so windows are
written, rewritten with higher versions and dropped while the test runs.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterator
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
from gpu_pipeline.operators import windows as windows_module
from gpu_pipeline.operators.windows import WindowAggregator
from gpu_pipeline.semantics import DEFAULT_WINDOWS, Semantics, WindowSpec
from tests.reference import reference_run, window_starts

I64_MIN = int(np.iinfo(np.int64).min)
D_MS = 200
L_MS = 1_500
TRAFFIC = WindowSpec("traffic_1m", 1_000, 1_000, "event_type")
PRODUCT = WindowSpec("product_5m", 3_000, 1_000, "product_id")
SPECS = [TRAFFIC, PRODUCT]
PURCHASE = schema.EVENT_TYPE_CODE["purchase"]


@dataclass
class Stream:
    """On-time rows in arrival order, and the watermark after each row (for batch ends)."""

    key: np.ndarray
    has_key: np.ndarray
    user_id: np.ndarray
    ts: np.ndarray
    w: np.ndarray
    event_type: np.ndarray
    revenue_micros: np.ndarray
    watermark_after: np.ndarray

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def columns(self, rows: slice) -> tuple[np.ndarray, ...]:
        return (
            self.key[rows], self.has_key[rows], self.user_id[rows], self.ts[rows], self.w[rows],
            self.event_type[rows], self.revenue_micros[rows],
        )  # fmt: skip


def make_stream(
    seed: int, n: int, spec: WindowSpec, step_ms: int = 37, d_ms: int = D_MS, l_ms: int = L_MS
) -> Stream:
    """A jittered stream with stragglers; too-late rows are left out, as the runtime does."""
    rng = np.random.default_rng(seed)
    ts = np.arange(n, dtype=np.int64) * step_ms + rng.integers(-3 * step_ms, 3 * step_ms, n)
    stragglers = rng.random(n) < 0.15
    ts[stragglers] -= rng.integers(0, d_ms + l_ms + 2 * spec.size_ms, int(stragglers.sum()))
    ts = np.maximum(ts, 0) + 10 * spec.size_ms
    running_max = np.maximum.accumulate(ts)
    w = np.concatenate([[I64_MIN], running_max[:-1] - d_ms])
    on_time = (w == I64_MIN) | (ts >= w - l_ms)
    event_type = rng.integers(0, len(schema.EVENT_TYPES), n).astype(np.int8)
    if spec.key == "event_type":
        key, has_key = event_type.astype(np.int64), np.ones(n, dtype=bool)
    else:
        key, has_key = rng.integers(0, 6, n), rng.random(n) < 0.8
    revenue = np.where(event_type == PURCHASE, rng.integers(1, 10**9, n), 0)
    return Stream(
        key[on_time], has_key[on_time], rng.integers(0, 9, n)[on_time], ts[on_time],
        w[on_time], event_type[on_time], revenue[on_time], (running_max - d_ms)[on_time],
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# The Python model of the rule
# --------------------------------------------------------------------------------------


@dataclass
class ModelWindow:
    events: list[tuple[int, int, int]] = field(default_factory=list)  # (user, type, revenue)
    early: bool = False
    late: int = 0
    dirty: bool = True


class Model:
    """SPEC §2.6, one row at a time, emitting at batch ends like the operator."""

    def __init__(self, spec: WindowSpec, lateness_ms: int, partition: int) -> None:
        self.spec, self.lateness_ms, self.partition = spec, lateness_ms, partition
        self.windows: dict[tuple[int, int], ModelWindow] = {}

    def apply(self, stream: Stream, rows: slice) -> None:
        for key, has_key, user, ts, w, kind, revenue in zip(*stream.columns(rows), strict=True):
            if not has_key:
                continue
            for start in window_starts(int(ts), self.spec):
                window = self.windows.setdefault((start, int(key)), ModelWindow())
                window.events.append((int(user), int(kind), int(revenue)))
                if w < start + self.spec.size_ms:
                    window.early = True
                else:
                    window.late += 1
                window.dirty = True

    def emit(self, watermark: int | None) -> pa.Table:
        rows = []
        for (start, key), window in sorted(self.windows.items()):
            end = start + self.spec.size_ms
            if window.dirty and (watermark is None or end <= watermark):
                rows.append(self._row(start, key, window))
                window.dirty = False
        if watermark is None:
            self.windows.clear()
        else:
            self.windows = {
                ident: window
                for ident, window in self.windows.items()
                if ident[0] + self.spec.size_ms + self.lateness_ms >= watermark
            }
        return pa.Table.from_pylist(rows, schema=schema.OUTPUT_TABLES[self.spec.table])

    def _row(self, start: int, key: int, window: ModelWindow) -> dict[str, Any]:
        kinds = [kind for _, kind, _ in window.events]
        code = schema.EVENT_TYPE_CODE
        return {
            "window_start": start,
            "window_end": start + self.spec.size_ms,
            "event_type": schema.EVENT_TYPES[key] if self.spec.key == "event_type" else None,
            "product_id": key,
            "events": len(window.events),
            "views": kinds.count(code["product_view"]),
            "add_to_carts": kinds.count(code["add_to_cart"]),
            "purchases": kinds.count(code["purchase"]),
            "revenue": sum(r for _, _, r in window.events) / schema.REVENUE_SCALE,
            "users": len({user for user, _, _ in window.events}),
            "partition": self.partition,
            "version": int(window.early) + window.late,
        }


# --------------------------------------------------------------------------------------
# Driving the operator
# --------------------------------------------------------------------------------------


def batches(n: int, cuts: list[int]) -> Iterator[slice]:
    bounds = sorted({0, n, *(c for c in cuts if 0 < c < n)})
    for lo, hi in itertools.pairwise(bounds):
        yield slice(lo, hi)


def run(op: Any, stream: Stream, cuts: list[int]) -> list[pa.Table]:
    """Outputs of every batch end and of end of input."""
    outputs = []
    for rows in batches(len(stream), cuts):
        op.apply(*stream.columns(rows))
        outputs.append(op.emit(int(stream.watermark_after[rows.stop - 1])))
    outputs.append(op.emit(None))
    return outputs


def latest(outputs: list[pa.Table], spec: WindowSpec) -> pa.Table:
    """The final row of every window (highest version wins)."""
    table = pa.concat_tables(outputs)
    ordered = table.sort_by(
        [("window_start", "ascending"), (spec.key, "ascending"), ("version", "descending")]
    )
    rows: dict[tuple[Any, Any], dict[str, Any]] = {}
    for row in ordered.to_pylist():
        rows.setdefault((row["window_start"], row[spec.key]), row)
    return pa.Table.from_pylist(list(rows.values()), schema=table.schema)


def assert_tables_equal(got: pa.Table, expected: pa.Table) -> None:
    assert got.schema == expected.schema
    assert got.to_pylist() == expected.to_pylist()


cuts_strategy = st.lists(st.integers(0, 400), max_size=10)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.table)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 300), cuts=cuts_strategy)
def test_matches_python_model(
    backend: Backend, spec: WindowSpec, seed: int, n: int, cuts: list[int]
) -> None:
    stream = make_stream(seed, n, spec)
    op = WindowAggregator(spec, L_MS, backend, partition=3)
    model = Model(spec, L_MS, partition=3)
    for rows in batches(len(stream), cuts):
        op.apply(*stream.columns(rows))
        model.apply(stream, rows)
        watermark = int(stream.watermark_after[rows.stop - 1])
        assert_tables_equal(op.emit(watermark), model.emit(watermark))
        assert len(op) == len(model.windows)
    assert_tables_equal(op.emit(None), model.emit(None))
    assert len(op) == 0


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.table)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cuts_a=cuts_strategy, cuts_b=cuts_strategy)
def test_batch_split_invariance(
    backend: Backend, spec: WindowSpec, seed: int, cuts_a: list[int], cuts_b: list[int]
) -> None:
    stream = make_stream(seed, 100, spec)
    reference = latest(run(WindowAggregator(spec, L_MS, backend, 0), stream, []), spec)
    for cuts in (cuts_a, cuts_b, list(range(len(stream)))):
        outputs = run(WindowAggregator(spec, L_MS, backend, 0), stream, cuts)
        assert_tables_equal(latest(outputs, spec), reference)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.table)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cuts=cuts_strategy, stop=st.integers(0, 12))
def test_snapshot_restore_invariance(
    backend: Backend, spec: WindowSpec, seed: int, cuts: list[int], stop: int
) -> None:
    stream = make_stream(seed, 400, spec)
    expected = run(WindowAggregator(spec, L_MS, backend, 0), stream, cuts)
    op = WindowAggregator(spec, L_MS, backend, 0)
    outputs = []
    for number, rows in enumerate(batches(len(stream), cuts)):
        if number == stop:
            sink = io.BytesIO()
            state = op.snapshot()
            with pa.ipc.new_file(sink, state.schema) as writer:
                writer.write_table(state)
            op = WindowAggregator(spec, L_MS, backend, 0)
            op.restore(pa.ipc.open_file(sink.getvalue()).read_all())
            assert op.snapshot().equals(state)
        op.apply(*stream.columns(rows))
        outputs.append(op.emit(int(stream.watermark_after[rows.stop - 1])))
    outputs.append(op.emit(None))
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected, strict=True):
        assert_tables_equal(got, want)


def test_forced_collisions_and_growth_change_nothing(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = make_stream(7, 2_000, PRODUCT)
    cuts = list(range(0, 2_000, 333))
    expected = run(WindowAggregator(PRODUCT, L_MS, backend, 0), stream, cuts)
    monkeypatch.setattr(windows_module, "HASH_MASK", np.uint64(7))
    monkeypatch.setattr(windows_module, "MIN_CAPACITY", 2)
    got = run(WindowAggregator(PRODUCT, L_MS, backend, 0), stream, cuts)
    for table, want in zip(got, expected, strict=True):
        assert_tables_equal(table, want)


def test_state_stays_bounded(backend: Backend) -> None:
    """Expired windows and their users leave; capacities follow the live state, not the past."""
    stream = make_stream(11, 30_000, PRODUCT, step_ms=5)
    op = WindowAggregator(PRODUCT, L_MS, backend, 0)
    capacities = []
    for rows in batches(len(stream), list(range(0, 30_000, 1_000))):
        op.apply(*stream.columns(rows))
        watermark = int(stream.watermark_after[rows.stop - 1])
        op.emit(watermark)
        state = op.snapshot()
        ends = np.asarray(state.column("window_start")) + PRODUCT.size_ms
        assert (ends + L_MS >= watermark).all()
        assert len(op) == state.num_rows
        assert sum(state.column("users").to_pylist()) == len(
            state.column("user_ids").combine_chunks().flatten()
        )
        capacities.append((op._windows.capacity, op._users.capacity))
    created = {
        (start, int(key))
        for ts, key, has in zip(stream.ts, stream.key, stream.has_key, strict=True)
        if has
        for start in window_starts(int(ts), PRODUCT)
    }
    early = max(c for c, _ in capacities[3:10]), max(u for _, u in capacities[3:10])
    assert max(c for c, _ in capacities[10:]) <= early[0] < len(created)
    assert max(u for _, u in capacities[10:]) <= early[1]


def _json_records(stream: Stream, spec: WindowSpec, rng: np.random.Generator) -> list[bytes]:
    records = []
    for i in range(len(stream)):
        kind = schema.EVENT_TYPES[int(stream.event_type[i])]
        record: dict[str, Any] = {
            "event_id": f"e{i}", "user_id": int(stream.user_id[i]), "ts": int(stream.ts[i]),
            "event_type": kind,
        }  # fmt: skip
        if spec.key == "product_id" and (stream.has_key[i] or kind in schema.NEEDS_PRODUCT_ID):
            record["product_id"] = int(stream.key[i])
        elif kind in schema.NEEDS_PRODUCT_ID:
            record["product_id"] = 1
        if kind in schema.NEEDS_PRICE:
            record["price"] = round(float(rng.random() * 100), 2)
            record["quantity"] = int(rng.integers(1, 4))
        records.append(json.dumps(record).encode())
    return records


@pytest.mark.parametrize("spec", DEFAULT_WINDOWS, ids=lambda s: s.table)
@pytest.mark.parametrize("seed", [1, 2])
def test_matches_reference_writes(backend: Backend, spec: WindowSpec, seed: int) -> None:
    """Through tests/reference.py: each batch writes the last reference write of each window."""
    from tests.reference import validate_record

    rng = np.random.default_rng(seed)
    semantics = Semantics(
        max_out_of_orderness_ms=5_000, allowed_lateness_ms=60_000, windows=(spec,)
    )
    raw = make_stream(seed, 300, spec, step_ms=4_000, d_ms=5_000, l_ms=60_000)
    records = _json_records(raw, spec, rng)
    result = reference_run({0: [(i, 0, r) for i, r in enumerate(records)]}, semantics)
    events = [validate_record(r) for r in records]
    max_ts: int | None = None
    columns: dict[str, list[int]] = {
        name: [] for name in ("key", "has", "user", "ts", "w", "et", "rev")
    }
    positions = []
    for i, event in enumerate(events):
        assert not isinstance(event, str)
        w = I64_MIN if max_ts is None else max_ts - 5_000
        max_ts = event.ts_ms if max_ts is None else max(max_ts, event.ts_ms)
        if w != I64_MIN and event.ts_ms < w - 60_000:
            continue
        key = (
            schema.EVENT_TYPE_CODE[event.event_type]
            if spec.key == "event_type"
            else event.product_id
        )
        for name, value in zip(
            columns,
            (key if key is not None else -1, key is not None, event.user_id, event.ts_ms, w,
             schema.EVENT_TYPE_CODE[event.event_type], event.revenue_micros),
            strict=True,
        ):  # fmt: skip
            columns[name].append(int(value))
        positions.append(i)
    cuts = sorted(set(rng.integers(0, len(positions), 8).tolist()))
    op = WindowAggregator(spec, 60_000, backend, partition=0)
    table_schema = schema.OUTPUT_TABLES[spec.table]
    arrays = [np.array(columns[name]) for name in columns]
    arrays[1] = arrays[1].astype(bool)
    arrays[5] = arrays[5].astype(np.int8)
    for rows in batches(len(positions), cuts):
        op.apply(*(a[rows] for a in arrays))
        first, last = positions[rows.start], positions[rows.stop - 1]
        # too-late records up to the next on-time one (or the end) belong to this batch
        last = positions[rows.stop] - 1 if rows.stop < len(positions) else len(events) - 1
        watermark = max(e.ts_ms for e in events[: last + 1] if not isinstance(e, str)) - 5_000
        if rows.start == 0:
            first = 0
        expected = _last_writes(
            result.window_writes,
            lambda after, f=first, la=last: after is not None and f <= after[0] <= la,
        )
        assert_tables_equal(op.emit(watermark), pa.Table.from_pylist(expected, schema=table_schema))
    final = _last_writes(result.window_writes, lambda after: after is None)
    assert_tables_equal(op.emit(None), pa.Table.from_pylist(final, schema=table_schema))


def _last_writes(writes: list[Any], chosen: Any) -> list[dict[str, Any]]:
    rows: dict[tuple[int, Any], dict[str, Any]] = {}
    for write in writes:
        if chosen(write.written_after):
            rows[(write.window_start_ms, write.key)] = write.row
    key_code = schema.EVENT_TYPE_CODE
    return [
        rows[k]
        for k in sorted(
            rows, key=lambda k: (k[0], key_code.get(k[1], k[1]) if isinstance(k[1], str) else k[1])
        )
    ]


def test_boundaries_of_write_rewrite_and_drop(backend: Backend) -> None:
    """Written at watermark == end; an event with w == end is late (+1); dropped past end + L."""
    op = WindowAggregator(TRAFFIC, L_MS, backend, 0)

    def add(ts: int, w: int, user: int) -> None:
        one = np.ones(1, dtype=np.int64)
        op.apply(
            one * 2,
            np.ones(1, dtype=bool),
            one * user,
            one * ts,
            one * w,
            (one * 2).astype(np.int8),
            one * 0,
        )

    add(1_500, I64_MIN, 1)
    assert op.emit(1_999).num_rows == 0
    first = op.emit(2_000).to_pylist()
    assert [(r["event_type"], r["events"], r["version"]) for r in first] == [("search", 1, 1)]
    assert op.emit(2_000).num_rows == 0
    add(1_999, 2_000, 1)
    add(1_000, 2_000, 2)
    again = op.emit(2_000).to_pylist()
    assert [(r["events"], r["users"], r["version"]) for r in again] == [(3, 2, 3)]
    op.emit(2_000 + L_MS)
    assert len(op) == 1
    op.emit(2_000 + L_MS + 1)
    assert len(op) == 0


def test_rows_without_key_count_nowhere_and_empty_batches(backend: Backend) -> None:
    op = WindowAggregator(PRODUCT, L_MS, backend, 0)
    empty = np.zeros(0, dtype=np.int64)
    op.apply(empty, empty.astype(bool), empty, empty, empty, empty.astype(np.int8), empty)
    assert op.emit(10_000).num_rows == 0
    one = np.array([5], dtype=np.int64)
    op.apply(one, np.array([False]), one, one * 1000, np.array([I64_MIN]), one.astype(np.int8), one)
    assert len(op) == 0 and op.emit(None).num_rows == 0


def test_bad_configuration_and_foreign_snapshot(backend: Backend) -> None:
    with pytest.raises(ConfigError, match="allowed_lateness_ms"):
        WindowAggregator(TRAFFIC, -1, backend, 0)
    with pytest.raises(ConfigError, match=r"windows\.sessions"):
        WindowAggregator(WindowSpec("sessions", 1_000, 1_000, "event_type"), 0, backend, 0)
    with pytest.raises(ConfigError, match=r"traffic_1m\.key"):
        WindowAggregator(WindowSpec("traffic_1m", 1_000, 1_000, "product_id"), 0, backend, 0)
    state = WindowAggregator(TRAFFIC, L_MS, backend, 0).snapshot()
    with pytest.raises(CheckpointError, match="another configuration"):
        WindowAggregator(TRAFFIC, L_MS + 1, backend, 0).restore(state)
    with pytest.raises(ValueError, match="differ in length"):
        one = np.ones(1, dtype=np.int64)
        WindowAggregator(TRAFFIC, L_MS, backend, 0).apply(
            one, np.ones(2, dtype=bool), one, one, one, one.astype(np.int8), one
        )


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.table)
def test_gpu_matches_cpu(cpu_backend: Backend, spec: WindowSpec) -> None:
    from gpu_pipeline.backend.gpu import GpuBackend

    gpu = GpuBackend()
    stream = make_stream(5, 20_000, spec, step_ms=3)
    cuts = list(range(0, 20_000, 1_777))
    expected = run(WindowAggregator(spec, L_MS, cpu_backend, 0), stream, cuts)
    op = WindowAggregator(spec, L_MS, gpu, 0)
    outputs = []
    for rows in batches(len(stream), cuts):
        op.apply(*(gpu.asarray(np.ascontiguousarray(c)) for c in stream.columns(rows)))
        outputs.append(op.emit(int(stream.watermark_after[rows.stop - 1])))
    outputs.append(op.emit(None))
    for got, want in zip(outputs, expected, strict=True):
        assert_tables_equal(got, want)
