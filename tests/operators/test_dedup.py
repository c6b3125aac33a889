"""The Dedup operator against a direct Python model of SPEC §2.3, on every engine.

Streams are drawn with few distinct ids (so retries are common), out-of-order timestamps
and short TTLs (so ids expire and come back); narrow hash masks force hash collisions,
which must never change a result.  Beyond agreement with the model, the outputs must not
depend on how the stream is cut into batches, nor on a snapshot/restore at any batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.errors import CheckpointError, ConfigError
from gpu_pipeline.operators.dedup import Dedup, DedupConfig

I64_MIN = int(np.iinfo(np.int64).min)
I64_MAX = int(np.iinfo(np.int64).max)
MASKS = (2**64 - 1, 0xF, 1)


@dataclass(frozen=True)
class Stream:
    """One partition's valid events in arrival order, with W(e) per event."""

    ids: list[str]
    ts: list[int]
    w: list[int]
    delay_ms: int

    def watermark_after(self, count: int) -> int:
        """W of the event that would follow the first ``count`` events."""
        if count == 0:
            return I64_MIN
        return max(self.ts[:count]) - self.delay_ms


def make_stream(ids: Sequence[str], ts: Sequence[int], delay_ms: int) -> Stream:
    """W(e) = max ts of the earlier events minus D; -infinity before the first event."""
    w: list[int] = []
    high: int | None = None
    for t in ts:
        w.append(I64_MIN if high is None else high - delay_ms)
        high = t if high is None else max(high, t)
    return Stream(list(ids), list(ts), w, delay_ms)


def model(stream: Stream, ttl_ms: int) -> list[bool]:
    """SPEC §2.3 word for word: a duplicate iff an earlier accepted event has the same id
    and W(e) < its ts + ttl (W = -infinity: any earlier accepted event)."""
    accepted: dict[str, list[int]] = {}
    out = []
    for event_id, ts, w in zip(stream.ids, stream.ts, stream.w, strict=True):
        earlier = accepted.get(event_id, [])
        duplicate = bool(earlier) if w == I64_MIN else any(w < t + ttl_ms for t in earlier)
        out.append(duplicate)
        if not duplicate:
            accepted.setdefault(event_id, []).append(ts)
    return out


def run(
    backend: Backend,
    stream: Stream,
    config: DedupConfig,
    cuts: Sequence[int],
    restore_at: int | None = None,
    restore_config: DedupConfig | None = None,
    expire: bool = True,
) -> tuple[list[bool], Dedup]:
    """Feed the stream in batches ending at ``cuts``; expire after each batch like the
    runtime does; optionally snapshot after batch ``restore_at`` into a fresh operator."""
    op = Dedup(config, backend)
    out: list[bool] = []
    bounds = batch_bounds(cuts, len(stream.ids))
    for index, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        ids = backend.strings(pa.array(stream.ids[lo:hi], type=pa.string()))
        ts = backend.asarray(np.array(stream.ts[lo:hi], dtype=np.int64))
        w = backend.asarray(np.array(stream.w[lo:hi], dtype=np.int64))
        dup = op.apply(ids, ts, w)
        assert dup.dtype == backend.xp.bool_
        out.extend(backend.to_host(dup).tolist())
        if expire:
            op.expire(stream.watermark_after(hi))
        if index == restore_at:
            snapshot = _ipc_round_trip(op.snapshot())
            op = Dedup(restore_config or config, backend)
            op.restore(snapshot)
    return out, op


def batch_bounds(cuts: Sequence[int], n: int) -> list[int]:
    """Batch boundaries 0 = b0 < b1 < ... < bk = n from arbitrary cut positions."""
    return [0, *sorted({c for c in cuts if 0 < c < n}), n]


def _ipc_round_trip(table: pa.Table) -> pa.Table:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pa.ipc.open_stream(sink.getvalue()).read_all()


def sorted_snapshot(op: Dedup) -> list[tuple[str, int]]:
    table = op.snapshot()
    return sorted(zip(table["event_id"].to_pylist(), table["max_ts"].to_pylist(), strict=True))


@st.composite
def streams(draw: st.DrawFn, max_events: int = 120) -> tuple[Stream, int, list[int]]:
    """A stream with retries, jitter and a TTL of the order of the stream's span."""
    n = draw(st.integers(0, max_events))
    pool = draw(st.integers(1, 30))
    ids = [f"e-{draw(st.integers(0, pool - 1)):x}" for _ in range(n)]
    step = draw(st.integers(0, 20))
    jitter = draw(st.integers(0, 200))
    ts = [i * step + draw(st.integers(-jitter, jitter)) for i in range(n)]
    delay = draw(st.integers(0, 100))
    ttl = draw(st.sampled_from([0, 1, 50, 300, 10**6]))
    cuts = draw(st.lists(st.integers(0, max(n, 1)), max_size=8))
    return make_stream(ids, ts, delay), ttl, cuts


@settings(max_examples=60, deadline=None)
@given(case=streams(), mask=st.sampled_from(MASKS))
def test_matches_model(backend: Backend, case: tuple[Stream, int, list[int]], mask: int) -> None:
    stream, ttl, cuts = case
    got, op = run(backend, stream, DedupConfig(ttl, hash_mask=mask), cuts)
    assert got == model(stream, ttl)
    assert len(op) == len(sorted_snapshot(op))


@settings(max_examples=40, deadline=None)
@given(case=streams(), other_cuts=st.lists(st.integers(0, 120), max_size=8))
def test_batch_split_invariance(
    backend: Backend, case: tuple[Stream, int, list[int]], other_cuts: list[int]
) -> None:
    stream, ttl, cuts = case
    config = DedupConfig(ttl, hash_mask=0xF)
    first, op_a = run(backend, stream, config, cuts)
    second, op_b = run(backend, stream, config, [c for c in other_cuts if c < len(stream.ids)])
    one_batch, op_c = run(backend, stream, config, [])
    assert first == second == one_batch
    assert sorted_snapshot(op_a) == sorted_snapshot(op_b) == sorted_snapshot(op_c)


@settings(max_examples=40, deadline=None)
@given(case=streams(), data=st.data())
def test_snapshot_restore_invariance(
    backend: Backend, case: tuple[Stream, int, list[int]], data: st.DataObject
) -> None:
    stream, ttl, cuts = case
    config = DedupConfig(ttl)
    expected, op_plain = run(backend, stream, config, cuts)
    batches = len(batch_bounds(cuts, len(stream.ids))) - 1
    restore_at = data.draw(st.integers(0, batches - 1))
    other = DedupConfig(ttl, hash_mask=data.draw(st.sampled_from(MASKS)))
    got, op_restored = run(backend, stream, config, cuts, restore_at, other)
    assert got == expected
    assert sorted_snapshot(op_restored) == sorted_snapshot(op_plain)


def test_empty_batches_and_empty_state(backend: Backend) -> None:
    op = Dedup(DedupConfig(1000), backend)
    empty = backend.asarray(np.zeros(0, dtype=np.int64))
    dup = op.apply(backend.strings(pa.array([], type=pa.string())), empty, empty)
    assert dup.shape == (0,)
    op.expire(I64_MIN)
    assert len(op) == 0
    table = op.snapshot()
    assert table.num_rows == 0 and table.column_names == ["event_id", "max_ts"]
    fresh = Dedup(DedupConfig(1000), backend)
    fresh.restore(table)
    assert len(fresh) == 0


def test_minus_infinity_watermark_keeps_every_id(backend: Backend) -> None:
    """Before the first event W = -inf: a retry is a duplicate whatever ts and ttl say."""
    stream = Stream(["a", "b", "a", "a", "b"], [100, 0, -(10**12), 10**12, 5], [I64_MIN] * 5, 0)
    got, _ = run(backend, stream, DedupConfig(0), [2], expire=False)
    assert got == [False, False, True, True, True]


def test_single_row_and_all_equal_ids(backend: Backend) -> None:
    assert run(backend, make_stream(["x"], [7], 0), DedupConfig(10), [])[0] == [False]
    stream = make_stream(["same"] * 50, list(range(0, 500, 10)), 0)
    expected = model(stream, 35)
    assert run(backend, stream, DedupConfig(35, hash_mask=1), [7, 31])[0] == expected
    assert expected.count(False) > 1  # the TTL lets the id back in


def test_collisions_never_drop_distinct_ids(backend: Backend) -> None:
    """With every key equal (mask 1 leaves 2 keys) all distinct ids are still accepted."""
    ids = [f"id-{i}" for i in range(300)]
    stream = make_stream(ids + ids[::-1], list(range(600)), 10)
    got, op = run(backend, stream, DedupConfig(10**6, hash_mask=1), [100, 450])
    assert got == [False] * 300 + [True] * 300
    assert len(op) == 300


def test_extreme_timestamps_do_not_overflow(backend: Backend) -> None:
    ids = ["a", "b", "a", "b", "c", "c"]
    ts = [I64_MAX - 5, I64_MIN, I64_MAX, I64_MIN + 1, 0, 1]
    stream = make_stream(ids, ts, 8)
    for ttl in (0, 1, 8, I64_MAX):
        assert run(backend, stream, DedupConfig(ttl), [3])[0] == model(stream, ttl), ttl


def test_expired_ids_leave_memory(backend: Backend) -> None:
    """Unique ids under an advancing watermark: the state stays near the TTL's worth."""
    op = Dedup(DedupConfig(ttl_ms=1_000), backend)
    for batch in range(40):
        ts = np.arange(batch * 500, (batch + 1) * 500, dtype=np.int64) * 10
        ids = pa.array([f"u-{t}" for t in ts.tolist()])
        w = ts - 100
        op.apply(backend.strings(ids), backend.asarray(ts), backend.asarray(w))
        op.expire(int(ts[-1]) - 100)
        assert len(op) <= 110  # ids with ts within 1100 ms of the newest
        assert op.snapshot().num_rows == len(op)
    table_capacity = op._entries.table.shape[0]
    assert table_capacity <= 4096, "compaction must shrink the table"


def test_expire_ignores_a_backward_watermark(backend: Backend) -> None:
    op = Dedup(DedupConfig(ttl_ms=10), backend)
    ts = backend.asarray(np.array([0, 100], dtype=np.int64))
    op.apply(backend.strings(pa.array(["a", "b"])), ts, ts - 1000)
    op.expire(50)
    assert len(op) == 1
    op.expire(0)
    assert sorted_snapshot(op) == [("b", 100)]


def test_snapshot_keeps_the_expiry_watermark(backend: Backend) -> None:
    op = Dedup(DedupConfig(ttl_ms=10), backend)
    ts = backend.asarray(np.array([0, 100], dtype=np.int64))
    op.apply(backend.strings(pa.array(["a", "b"])), ts, ts - 1000)
    op.expire(5)  # "a" stays live until 10
    fresh = Dedup(op.config, backend)
    fresh.restore(op.snapshot())
    fresh.expire(10)
    assert sorted_snapshot(fresh) == [("b", 100)]


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"ttl_ms": -1}, "dedup_ttl_ms"),
        ({"ttl_ms": True}, "dedup_ttl_ms"),
        ({"ttl_ms": 1.5}, "dedup_ttl_ms"),
        ({"ttl_ms": 2**63}, "dedup_ttl_ms"),
        ({"ttl_ms": 1, "hash_mask": 0}, "dedup.hash_mask"),
        ({"ttl_ms": 1, "hash_mask": 2**64}, "dedup.hash_mask"),
    ],
)
def test_bad_config_names_the_option(kwargs: dict[str, object], option: str) -> None:
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        DedupConfig(**kwargs)  # type: ignore[arg-type]


def test_mismatched_columns_are_rejected(backend: Backend) -> None:
    op = Dedup(DedupConfig(10), backend)
    ts = backend.asarray(np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="w must hold one int64 per id"):
        op.apply(backend.strings(pa.array(["a", "b"])), ts, ts[:1])


@pytest.mark.parametrize(
    "table",
    [
        pa.table({"event_id": ["a"]}),
        pa.table({"event_id": [1], "max_ts": pa.array([1], pa.int64())}),
        pa.table({"event_id": ["a"], "max_ts": pa.array([1], pa.int32())}),
        pa.table({"event_id": ["a", None], "max_ts": pa.array([1, 2], pa.int64())}),
    ],
)
def test_restore_rejects_a_corrupt_snapshot(backend: Backend, table: pa.Table) -> None:
    with pytest.raises(CheckpointError):
        Dedup(DedupConfig(10), backend).restore(table)


def test_realistic_ids_with_retries(backend: Backend) -> None:
    """'e-<16 hex>' ids, ~2% retries, some shortly after and some after a long delay."""
    rng = np.random.default_rng(7)
    n = 20_000
    source = np.arange(n)
    retry = rng.random(n) < 0.02
    source[retry] = np.maximum(np.flatnonzero(retry) - rng.integers(1, 5_000, retry.sum()), 0)
    ids = [f"e-{v:016x}" for v in rng.integers(0, 2**62, n)[source].tolist()]
    ts = (np.arange(n) * 100 + rng.integers(-2_000, 2_000, n)).tolist()
    stream = make_stream(ids, ts, 5_000)
    got, _ = run(backend, stream, DedupConfig(ttl_ms=200_000), list(range(0, n, 3_000)))
    expected = model(stream, 200_000)
    assert got == expected
    assert 0 < sum(expected) < sum(retry)  # long-delayed retries outlived the TTL


@pytest.mark.gpu
def test_gpu_matches_cpu(cpu_backend: Backend) -> None:
    from gpu_pipeline.backend.gpu import GpuBackend

    gpu = GpuBackend()
    rng = np.random.default_rng(3)
    for mask in MASKS:
        n = 5_000
        ids = [f"e-{v:x}" for v in rng.integers(0, 800, n).tolist()]
        ts = (np.arange(n) * 3 + rng.integers(-300, 300, n)).tolist()
        stream = make_stream(ids, ts, 50)
        cuts = sorted(rng.integers(0, n, 12).tolist())
        config = DedupConfig(ttl_ms=2_000, hash_mask=mask)
        cpu_out, cpu_op = run(cpu_backend, stream, config, cuts, restore_at=3)
        gpu_out, gpu_op = run(gpu, stream, config, cuts, restore_at=5)
        assert cpu_out == gpu_out == model(stream, 2_000)
        assert sorted_snapshot(cpu_op) == sorted_snapshot(gpu_op)
