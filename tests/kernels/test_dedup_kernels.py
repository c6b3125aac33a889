"""The dedup kernels (kernels/dedup.cu) against Python models, launched directly.

Narrow masks (down to 0: every key equal) force hash collisions; tables smaller than the
number of ids must set the error flag, never hang or answer wrongly.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_pipeline.backend.base import Backend, DeviceStrings
from gpu_pipeline.hashing import hash_bytes

I64_MIN = int(np.iinfo(np.int64).min)
I64_MAX = int(np.iinfo(np.int64).max)
ALL_ONES = 2**64 - 1
texts = st.text(alphabet="ab\u00e9", max_size=4)


def _strings(backend: Backend, values: list[str]) -> DeviceStrings:
    return backend.strings(pa.array(values, type=pa.string()))


def _keys(backend: Backend, strings: DeviceStrings, mask: int) -> object:
    out = backend.xp.zeros(max(len(strings), 1), dtype=backend.xp.uint64)
    backend.kernels.hash_strings(len(strings), strings.offsets, strings.chars, np.uint64(mask), out)
    return out


def _zeros(backend: Backend, n: int, dtype: type) -> object:
    return backend.xp.zeros(max(n, 1), dtype=dtype)


def group(
    backend: Backend, values: list[str], mask: int, capacity: int
) -> tuple[list[int], list[int], int]:
    """Launch dedup_group_batch; return (rep, repeated, error)."""
    xp = backend.xp
    strings = _strings(backend, values)
    n = len(values)
    slots = xp.full(capacity, -1, dtype=xp.int64)
    rep = _zeros(backend, n, np.int32)
    repeated = _zeros(backend, n, np.int32)
    error = _zeros(backend, 1, np.int32)
    backend.kernels.dedup_group_batch(
        n, _keys(backend, strings, mask), strings.offsets, strings.chars, capacity, slots, rep,
        repeated, error,
    )  # fmt: skip
    host = backend.to_host
    return host(rep)[:n].tolist(), host(repeated)[:n].tolist(), int(host(error)[0])


@settings(max_examples=60, deadline=None)
@given(values=st.lists(texts, max_size=60), mask=st.sampled_from([ALL_ONES, 0xF, 1, 0]))
def test_group_batch_partitions_rows_by_id(backend: Backend, values: list[str], mask: int) -> None:
    rep, repeated, error = group(backend, values, mask, capacity=128)
    assert error == 0
    for i, value in enumerate(values):
        owner = rep[i]
        assert values[owner] == value and rep[owner] == owner
    for i, j in ((i, j) for i in range(len(values)) for j in range(len(values))):
        assert (rep[i] == rep[j]) == (values[i] == values[j])
    for i, value in enumerate(values):
        if rep[i] == i:
            assert repeated[i] == (values.count(value) > 1)


def test_group_batch_full_table_sets_the_error(backend: Backend) -> None:
    values = [f"id{i}" for i in range(10)]
    for mask in (ALL_ONES, 0):
        _, _, error = group(backend, values, mask, capacity=4)
        assert error == 1
    assert group(backend, values * 3, 0, capacity=16)[2] == 0


def test_group_batch_empty_and_single(backend: Backend) -> None:
    assert group(backend, [], ALL_ONES, 16) == ([], [], 0)
    assert group(backend, ["only"], ALL_ONES, 16) == ([0], [0], 0)


def gather(backend: Backend, values: list[str], rows: list[int]) -> list[bytes]:
    strings = _strings(backend, values)
    lengths = [len(values[r].encode()) for r in rows]
    dst_offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64))).astype(np.int64)
    dst = _zeros(backend, int(dst_offsets[-1]), np.uint8)
    backend.kernels.dedup_gather_bytes(
        len(rows), strings.offsets, strings.chars,
        backend.asarray(np.array(rows or [0], dtype=np.int64)),
        backend.asarray(dst_offsets), dst,
    )  # fmt: skip
    raw = bytes(backend.to_host(dst))
    return [raw[a:b] for a, b in itertools.pairwise(dst_offsets)]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_gather_bytes(backend: Backend, data: st.DataObject) -> None:
    values = data.draw(st.lists(st.text(max_size=10), min_size=1, max_size=20))
    rows = data.draw(st.lists(st.integers(0, len(values) - 1), max_size=30))
    assert gather(backend, values, rows) == [values[r].encode() for r in rows]


class State:
    """Entries (ids, M) placed in a table by dedup_insert, as the operator keeps them."""

    def __init__(self, backend: Backend, ids: list[str], max_ts: list[int], mask: int,
                 capacity: int) -> None:  # fmt: skip
        xp = backend.xp
        self.backend = backend
        strings = _strings(backend, ids)
        self.offsets = strings.offsets
        self.arena = strings.chars
        self.keys = _keys(backend, strings, mask)
        self.max_ts = backend.asarray(np.array([*max_ts, 0], dtype=np.int64))
        self.table = xp.full(capacity, -1, dtype=xp.int64)
        error = _zeros(backend, 1, np.int32)
        backend.kernels.dedup_insert(len(ids), 0, self.keys, capacity, self.table, error)
        self.error = int(backend.to_host(error)[0])


def test_insert_full_table_sets_the_error(backend: Backend) -> None:
    ids = [f"x{i}" for i in range(6)]
    assert State(backend, ids, [0] * 6, ALL_ONES, capacity=4).error == 1
    assert State(backend, ids, [0] * 6, 0, capacity=8).error == 0


def test_insert_places_every_entry_once(backend: Backend) -> None:
    ids = [f"x{i}" for i in range(40)]
    state = State(backend, ids, [0] * 40, 0xF, capacity=128)
    table = backend.to_host(state.table)
    used = table[table >= 0]
    assert sorted((used & 0xFFFFFFFF).tolist()) == list(range(40))


def resolve(
    backend: Backend,
    state: State,
    batch: list[tuple[str, int, int]],
    mask: int,
    ttl: int,
    expire_wm: int,
) -> tuple[list[int], list[int], dict[int, int], int]:
    """Launch dedup_resolve on one batch of (id, ts, w); the grouping of its rows is built
    in Python.  Returns (dup, entry M after, {first row of new id: M}, error)."""
    n = len(batch)
    values = [b[0] for b in batch]
    strings = _strings(backend, values)
    first_row = {v: values.index(v) for v in values}
    rep = [first_row[v] for v in values]
    repeated = [int(rep[i] == i and values.count(values[i]) > 1) for i in range(n)]
    group_rows = sorted((i for i in range(n) if repeated[rep[i]]), key=lambda i: (rep[i], i))
    group_start = [0] * n
    for k, row in enumerate(group_rows):
        if k == 0 or rep[group_rows[k - 1]] != rep[row]:
            group_start[rep[row]] = k

    def arr(values: list[int], dtype: type) -> object:
        return backend.asarray(np.array(values or [0], dtype=dtype))

    dup = _zeros(backend, n, np.uint8)
    is_new = _zeros(backend, n, np.uint8)
    new_max = _zeros(backend, n, np.int64)
    error = _zeros(backend, 1, np.int32)
    backend.kernels.dedup_resolve(
        n, arr(rep, np.int32), arr(repeated, np.int32), arr(group_start, np.int64),
        len(group_rows), arr(group_rows, np.int64), _keys(backend, strings, mask),
        strings.offsets, strings.chars, arr([b[1] for b in batch], np.int64),
        arr([b[2] for b in batch], np.int64), ttl, expire_wm, state.table.shape[0],
        state.table, state.offsets, state.arena, state.max_ts, dup, is_new, new_max, error,
    )  # fmt: skip
    host = backend.to_host
    new = {i: int(host(new_max)[i]) for i in range(n) if host(is_new)[i]}
    return host(dup)[:n].tolist(), host(state.max_ts)[:-1].tolist(), new, int(host(error)[0])


def resolve_model(
    ids: list[str], max_ts: list[int], batch: list[tuple[str, int, int]], ttl: int, expire_wm: int
) -> tuple[list[int], list[int], dict[int, int]]:
    """M per id; a row is a duplicate iff the id's M is live and w < M + ttl."""
    state: dict[str, int | None] = dict(zip(ids, max_ts, strict=True))
    firsts: dict[str, int] = {}
    dup = []
    for row, (value, ts, w) in enumerate(batch):
        firsts.setdefault(value, row)
        m = state.get(value)
        live = m is not None and (expire_wm == I64_MIN or expire_wm < m + ttl)
        duplicate = live and m is not None and (w == I64_MIN or w < m + ttl)
        dup.append(int(duplicate))
        if not duplicate:
            state[value] = ts
    after = [state[i] or 0 for i in ids]
    new = {firsts[v]: m for v, m in state.items() if v not in ids and m is not None}
    return dup, after, new


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    mask=st.sampled_from([ALL_ONES, 0xF, 0]),
    ttl=st.sampled_from([0, 5, 30, I64_MAX]),
)
def test_resolve_matches_model(backend: Backend, data: st.DataObject, mask: int, ttl: int) -> None:
    ids = sorted(data.draw(st.sets(texts, max_size=8)))
    times = st.integers(-50, 50) | st.sampled_from([I64_MIN, I64_MAX])
    max_ts = [data.draw(times) for _ in ids]
    pool = st.sampled_from([*ids, "new", "n\u00e9w", "x"])
    n = data.draw(st.integers(0, 25))
    batch = [(data.draw(pool), data.draw(times), data.draw(times)) for _ in range(n)]
    expire_wm = data.draw(st.sampled_from([I64_MIN, -20, 0, 20]))
    state = State(backend, ids, max_ts, mask, capacity=32)
    assert state.error == 0
    dup, after, new, error = resolve(backend, state, batch, mask, ttl, expire_wm)
    assert error == 0
    assert (dup, after, new) == resolve_model(ids, max_ts, batch, ttl, expire_wm)


def test_resolve_on_a_full_table_sets_the_error(backend: Backend) -> None:
    """A table with no empty slot: the lookup of an absent id must stop and flag."""
    ids = [f"k{i}" for i in range(8)]
    state = State(backend, ids, [0] * 8, ALL_ONES, capacity=8)
    assert state.error == 0
    *_, error = resolve(backend, state, [("absent", 1, 0)], ALL_ONES, 10, I64_MIN)
    assert error == 1


def test_keys_match_python_hash(backend: Backend) -> None:
    """The table keys are the shared hash of the UTF-8 bytes (gpu_pipeline.hashing)."""
    strings = _strings(backend, ["e-00ff", "\u00e9"])
    keys = backend.to_host(_keys(backend, strings, 0xFFFF)).tolist()
    assert keys == [hash_bytes(b"e-00ff") & 0xFFFF, hash_bytes("\u00e9".encode()) & 0xFFFF]
