"""The window kernels (kernels/windows.cu) against small Python models."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_pipeline.backend.base import Backend

ALL_ONES = np.uint64(2**64 - 1)
READY, NONE, PENDING = 2, -1, -2
ERR_LOAD, ERR_FULL = 1, 2
NCOL = 9
EVENTS, VIEWS, CARTS, PURCHASES, REVENUE, USERS, EARLY, LATE, DIRTY = range(NCOL)
VIEW, CART, PURCHASE = 1, 3, 6


class Table:
    """Device arrays of one hash table, as the operator lays them out."""

    def __init__(self, backend: Backend, capacity: int) -> None:
        xp = backend.xp
        self.capacity = capacity
        self.state = xp.zeros(capacity, dtype=xp.int32)
        self.keys = xp.zeros(2 * capacity, dtype=xp.int64)
        self.size = xp.zeros(1, dtype=xp.int64)

    def contents(self, backend: Backend) -> dict[tuple[int, int], int]:
        """Ready key -> slot."""
        state = backend.to_host(self.state)
        keys = backend.to_host(self.keys).reshape(-1, 2)
        return {(int(keys[s, 0]), int(keys[s, 1])): int(s) for s in np.flatnonzero(state == READY)}


def find_windows(
    backend: Backend,
    table: Table,
    ts: list[int],
    key: list[int],
    has_key: list[bool],
    slide: int,
    wpe: int,
    mask: np.uint64 = ALL_ONES,
    max_size: int | None = None,
    slots: Any = None,
) -> tuple[np.ndarray, int]:
    xp = backend.xp
    n = len(ts)
    if slots is None:
        slots = xp.full(n * wpe, PENDING, dtype=xp.int64)
    error = xp.zeros(1, dtype=xp.int32)
    backend.kernels.win_find_windows(
        n, xp.asarray(np.array(ts, dtype=np.int64)), xp.asarray(np.array(key, dtype=np.int64)),
        xp.asarray(np.array(has_key, dtype=np.uint8)), slide, wpe, mask, table.capacity,
        table.state, table.keys, table.size,
        table.capacity if max_size is None else max_size, slots, error,
    )  # fmt: skip
    return backend.to_host(slots), int(backend.to_host(error)[0])


def expected_windows(ts: int, slide: int, wpe: int) -> list[int]:
    last = (ts // slide) * slide
    return [last - j * slide for j in range(wpe)]


def check_slots(
    backend: Backend, table: Table, slots: np.ndarray, ts: list[int], key: list[int],
    has_key: list[bool], slide: int, wpe: int,
) -> None:  # fmt: skip
    """Every element maps to the slot of its own key; distinct keys have distinct slots."""
    contents = table.contents(backend)
    assert len(set(contents.values())) == len(contents)
    for i in range(len(ts)):
        for j, start in enumerate(expected_windows(ts[i], slide, wpe)):
            slot = slots[i * wpe + j]
            if not has_key[i]:
                assert slot == NONE
            elif slot != PENDING:
                assert contents[(start, key[i])] == slot
    assert int(backend.to_host(table.size)[0]) == len(contents)


rows_strategy = st.lists(
    st.tuples(st.integers(-10_000, 10_000), st.integers(0, 5), st.booleans()),
    max_size=60,
)


@settings(max_examples=60, deadline=None)
@given(
    rows=rows_strategy,
    slide=st.sampled_from([1, 7, 1000]),
    wpe=st.integers(1, 5),
    mask=st.sampled_from([ALL_ONES, np.uint64(3), np.uint64(0)]),
)
def test_find_windows_matches_model(
    backend: Backend, rows: list[tuple[int, int, bool]], slide: int, wpe: int, mask: np.uint64
) -> None:
    ts = [r[0] for r in rows]
    key = [r[1] for r in rows]
    has_key = [r[2] for r in rows]
    table = Table(backend, 1024)
    slots, error = find_windows(backend, table, ts, key, has_key, slide, wpe, mask)
    assert error == 0
    assert not (slots == PENDING).any()
    check_slots(backend, table, slots, ts, key, has_key, slide, wpe)
    distinct = {(s, k) for t, k, h in rows if h for s in expected_windows(t, slide, wpe)}
    assert set(table.contents(backend)) == distinct


def test_find_windows_all_equal_keys_and_empty(backend: Backend) -> None:
    table = Table(backend, 64)
    slots, error = find_windows(backend, table, [], [], [], 60, 5)
    assert error == 0 and slots.shape == (0,)
    slots, error = find_windows(backend, table, [42] * 500, [3] * 500, [True] * 500, 60, 1)
    assert error == 0 and len(set(slots.tolist())) == 1
    assert table.contents(backend) == {(0, 3): int(slots[0])}


def test_full_table_sets_error_and_never_hangs(backend: Backend) -> None:
    table = Table(backend, 8)
    ts = list(range(0, 20_000, 1000))
    n = len(ts)
    slots, error = find_windows(backend, table, ts, [1] * n, [True] * n, 1000, 1, max_size=100)
    assert error & ERR_FULL
    assert len(table.contents(backend)) == 8
    assert (slots == PENDING).sum() == n - 8
    check_slots(backend, table, slots, ts, [1] * n, [True] * n, 1000, 1)


def test_load_limit_stops_claiming_and_rerun_completes(backend: Backend) -> None:
    """Past max_size the kernel stops; running again (here with a larger limit) is idempotent."""
    table = Table(backend, 256)
    ts = [t * 10 for t in range(100)] * 3
    n = len(ts)
    key = [t % 4 for t in range(n)]
    slots, error = find_windows(backend, table, ts, key, [True] * n, 10, 2, max_size=20)
    assert error & ERR_LOAD
    assert (slots == PENDING).any()
    check_slots(backend, table, slots, ts, key, [True] * n, 10, 2)
    again, error = find_windows(
        backend, table, ts, key, [True] * n, 10, 2, slots=backend.asarray(slots)
    )
    assert error == 0 and not (again == PENDING).any()
    check_slots(backend, table, again, ts, key, [True] * n, 10, 2)
    assert set(table.contents(backend)) == {
        (s, k) for t, k in zip(ts, key, strict=True) for s in expected_windows(t, 10, 2)
    }


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-1, 5),  # slot (-1 = no window)
            st.integers(-3, 3),  # w relative to the window end
            st.integers(0, 6),  # event type
            st.integers(0, 10**9),  # revenue
        ),
        max_size=80,
    )
)
def test_accumulate_matches_model(backend: Backend, rows: list[tuple[int, int, int, int]]) -> None:
    xp = backend.xp
    size_ms = 100
    starts = np.arange(6, dtype=np.int64) * 1000
    keys = np.zeros(12, dtype=np.int64)
    keys[0::2] = starts
    n = len(rows)
    slots = np.array([r[0] for r in rows], dtype=np.int64)
    w = (
        np.array([starts[max(r[0], 0)] + size_ms + r[1] for r in rows], dtype=np.int64)
        if rows
        else np.zeros(0, dtype=np.int64)
    )
    et = np.array([r[2] for r in rows], dtype=np.int8)
    revenue = np.array([r[3] for r in rows], dtype=np.int64)
    acc = xp.zeros(6 * NCOL, dtype=xp.int64)
    backend.kernels.win_accumulate(
        n, xp.asarray(slots), xp.asarray(w), xp.asarray(et), xp.asarray(revenue), 1, size_ms,
        VIEW, CART, PURCHASE, xp.asarray(keys), acc,
    )  # fmt: skip
    expected = np.zeros((6, NCOL), dtype=np.int64)
    for slot, dw, kind, rev in rows:
        if slot < 0:
            continue
        row = expected[slot]
        row[EVENTS] += 1
        row[VIEWS] += kind == VIEW
        row[CARTS] += kind == CART
        row[PURCHASES] += kind == PURCHASE
        row[REVENUE] += rev
        row[EARLY] |= dw < 0
        row[LATE] += dw >= 0
        row[DIRTY] = 1
    np.testing.assert_array_equal(backend.to_host(acc).reshape(6, NCOL), expected)


def insert_users(
    backend: Backend, table: Table, acc: Any, slots: list[int], users: list[int],
    mask: np.uint64 = ALL_ONES, count: int = 1, max_size: int | None = None,
    pending: Any = None,
) -> tuple[np.ndarray, int]:  # fmt: skip
    xp = backend.xp
    n = len(slots)
    if pending is None:
        pending = xp.ones(n, dtype=xp.uint8)
    error = xp.zeros(1, dtype=xp.int32)
    backend.kernels.win_insert_users(
        n, xp.asarray(np.array(slots, dtype=np.int64)),
        xp.asarray(np.array(users, dtype=np.int64)), 1, mask, table.capacity, table.state,
        table.keys, table.size, table.capacity if max_size is None else max_size, acc, count,
        pending, error,
    )  # fmt: skip
    return backend.to_host(pending), int(backend.to_host(error)[0])


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.integers(-1, 4), st.integers(0, 2**63 - 1) | st.integers(0, 6)), max_size=100
    ),
    mask=st.sampled_from([ALL_ONES, np.uint64(1), np.uint64(0)]),
)
def test_insert_users_counts_distinct_pairs(
    backend: Backend, pairs: list[tuple[int, int]], mask: np.uint64
) -> None:
    xp = backend.xp
    table = Table(backend, 256)
    acc = xp.zeros(5 * NCOL, dtype=xp.int64)
    slots = [p[0] for p in pairs]
    users = [p[1] for p in pairs]
    for _ in range(2):  # a second run finds every pair: idempotent
        pending, error = insert_users(backend, table, acc, slots, users, mask)
        assert error == 0 and not pending.any()
    distinct = {p for p in pairs if p[0] >= 0}
    assert set(table.contents(backend)) == distinct
    counts = Counter(slot for slot, _ in distinct)
    got = backend.to_host(acc).reshape(5, NCOL)[:, USERS]
    assert got.tolist() == [counts.get(s, 0) for s in range(5)]


def test_insert_users_full_table_then_regrown_counts_once(backend: Backend) -> None:
    """A full set reports an error; re-inserting everything into a larger set adds only the rest."""
    xp = backend.xp
    small = Table(backend, 4)
    acc = xp.zeros(NCOL, dtype=xp.int64)
    users = list(range(10)) * 2
    pending, error = insert_users(backend, small, acc, [0] * 20, users, max_size=100)
    assert error & ERR_FULL
    assert int(backend.to_host(acc)[USERS]) == 4 == len(small.contents(backend))
    big = Table(backend, 64)
    rebuilt = list(small.contents(backend))
    insert_users(backend, big, acc, [s for s, _ in rebuilt], [u for _, u in rebuilt], count=0)
    pending, error = insert_users(
        backend, big, acc, [0] * 20, users, pending=backend.asarray(pending)
    )
    assert error == 0 and not pending.any()
    assert int(backend.to_host(acc)[USERS]) == 10 == len(big.contents(backend))


def test_insert_users_without_count_leaves_accumulators(backend: Backend) -> None:
    xp = backend.xp
    table = Table(backend, 64)
    acc = xp.zeros(2 * NCOL, dtype=xp.int64)
    pending, error = insert_users(backend, table, acc, [0, 1, 1], [5, 5, 6], count=0)
    assert error == 0 and not pending.any()
    assert not backend.to_host(acc).any()
    assert set(table.contents(backend)) == {(0, 5), (1, 5), (1, 6)}
