"""Event-time window aggregation (SPEC §2.6 and §3): one window table of one partition.

Windows are ``[s, s + size)`` with ``s`` a multiple of the slide; an on-time event with a
key value adds to each of the ``size / slide`` windows that hold its ``ts``.  The state is
two device hash tables (``kernels/windows.cu``):

* the window table, ``(window_start, key) -> accumulators``: counts, revenue in exact
  integer micro-units, distinct users, an EARLY flag (some event arrived while the
  watermark was below the window end), a LATE count (events that arrived at or after it)
  and a DIRTY flag (changed since last written);
* the user set, ``(window slot, user_id)``: whoever inserts a pair counts it, so ``users``
  is exact and independent of thread interleaving.

All sums are integer atomics, so results do not depend on the order of the rows, the
engine or the batch split.  The version of a written row is
``EARLY + LATE``: 1 for the write when the watermark reaches the end, +1 for each event
that arrived after that, which again does not depend on how the stream was batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from gpu_pipeline import schema
from gpu_pipeline.backend.base import Backend
from gpu_pipeline.errors import CheckpointError, ConfigError, KernelError
from gpu_pipeline.semantics import WindowSpec

MIN_CAPACITY = 64
"""Smallest capacity of either hash table (a power of two)."""
MAX_GROW_ATTEMPTS = 64
HASH_MASK = np.uint64(2**64 - 1)
"""Mask applied to every hash; tests narrow it to force collisions, which never change results."""

EVENTS, VIEWS, CARTS, PURCHASES, REVENUE, USERS, EARLY, LATE, DIRTY = range(9)
NCOL = 9
"""Accumulator columns of a window slot, as laid out by ``kernels/windows.cu``."""

READY = 2
RETIRED = 3
PENDING = -2
ERR_FULL = 2

_MEASURES: dict[str, int] = {
    "events": EVENTS,
    "views": VIEWS,
    "add_to_carts": CARTS,
    "purchases": PURCHASES,
    "users": USERS,
}
_SNAPSHOT_COUNTS: tuple[tuple[str, int], ...] = (
    ("events", EVENTS),
    ("views", VIEWS),
    ("add_to_carts", CARTS),
    ("purchases", PURCHASES),
    ("revenue_micros", REVENUE),
    ("users", USERS),
    ("early", EARLY),
    ("late", LATE),
    ("dirty", DIRTY),
)
SNAPSHOT_SCHEMA = pa.schema(
    [
        pa.field("window_start", pa.int64(), nullable=False),
        pa.field("key", pa.int64(), nullable=False),
    ]
    + [pa.field(name, pa.int64(), nullable=False) for name, _ in _SNAPSHOT_COUNTS]
    + [
        pa.field(
            "user_ids", pa.large_list(pa.field("item", pa.int64(), nullable=False)), nullable=False
        )
    ]
)
"""One row per held window, with the sorted ids of its distinct users."""
_CONFIG_KEY = b"gpu_pipeline.windows.config"


def _next_pow2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def _fit_capacity(live: int, current: int) -> int:
    """Capacity after a rebuild: keep the current one while it suits, so tables do not thrash.

    Load stays <= 0.5; a table more than 32x too large shrinks to 8-16x, so memory follows
    the state without shrinking and regrowing at every batch.
    """
    if 2 * live <= current <= max(MIN_CAPACITY, 32 * live):
        return current
    return max(MIN_CAPACITY, _next_pow2(8 * live))


@dataclass
class _Table:
    """One open-addressing table: state words, two key words per slot, a device size counter."""

    state: Any  # int32[cap]: 0 empty, 1 being written, 2 ready, 3 retired
    keys: Any  # int64[2 * cap]
    size: Any  # int64[1], number of ready slots

    @staticmethod
    def empty(xp: Any, capacity: int) -> _Table:
        return _Table(
            xp.zeros(capacity, dtype=xp.int32),
            xp.zeros(2 * capacity, dtype=xp.int64),
            xp.zeros(1, dtype=xp.int64),
        )

    @property
    def capacity(self) -> int:
        return int(self.state.shape[0])


def output_schema(spec: WindowSpec) -> pa.Schema:
    """The Arrow schema of a window table's rows; its key column must be ``spec.key``."""
    table_schema = schema.OUTPUT_TABLES.get(spec.table)
    if table_schema is None or spec.table not in schema.VERSIONED_TABLES:
        raise ConfigError(
            f"windows.{spec.table}",
            f"unknown window table; choose one of {sorted(schema.VERSIONED_TABLES)}",
        )
    if spec.key not in table_schema.names:
        raise ConfigError(
            f"windows.{spec.table}.key", f"the table {spec.table} has no column {spec.key}"
        )
    return table_schema


class WindowAggregator:
    """Windowed aggregates of one window table for one partition, emitted with versions.

    Parameters
    ----------
    spec
        The windows (size, slide, key) and the output table.
    allowed_lateness_ms
        L: a window's state is dropped once the watermark is strictly greater than end + L.
    backend
        The engine whose arrays and kernels hold the state.
    partition
        Written into every output row.
    """

    def __init__(
        self, spec: WindowSpec, allowed_lateness_ms: int, backend: Backend, partition: int
    ) -> None:
        if (
            not isinstance(allowed_lateness_ms, int | np.integer)
            or isinstance(allowed_lateness_ms, bool)
            or allowed_lateness_ms < 0
        ):
            raise ConfigError(
                "allowed_lateness_ms",
                f"must be a non-negative integer of milliseconds, got {allowed_lateness_ms!r}",
            )
        self.spec = spec
        self.allowed_lateness_ms = int(allowed_lateness_ms)
        self.partition = int(partition)
        self.schema = output_schema(spec)
        self._backend = backend
        self._xp = backend.xp
        self._kernels = backend.kernels
        self._error = self._xp.zeros(1, dtype=self._xp.int32)
        self._reset()

    # ------------------------------------------------------------------ public API

    def apply(
        self,
        key: Any,
        has_key: Any,
        user_id: Any,
        ts: Any,
        w: Any,
        event_type: Any,
        revenue_micros: Any,
    ) -> None:
        """Add on-time rows (arrival order) to their windows.

        Parameters
        ----------
        key, has_key
            The key value (event_type code or product_id, int64) and whether the row has one;
            rows without a key count nowhere in this table.
        user_id, ts, w, revenue_micros
            int64; ``w`` is the row's watermark (int64 min = -infinity).
        event_type
            int8 type codes (``schema.EVENT_TYPE_CODE``).
        """
        xp = self._xp
        i64 = xp.int64
        key, user_id, ts, w, revenue_micros = (
            xp.ascontiguousarray(a, dtype=i64) for a in (key, user_id, ts, w, revenue_micros)
        )
        event_type = xp.ascontiguousarray(event_type, dtype=xp.int8)
        present = xp.ascontiguousarray(has_key, dtype=xp.bool_).view(xp.uint8)
        n = int(ts.shape[0])
        lengths = {int(a.shape[0]) for a in (key, present, user_id, w, event_type, revenue_micros)}
        if lengths - {n}:
            raise ValueError(
                f"WindowAggregator.apply: columns differ in length ({sorted(lengths | {n})})"
            )
        if n == 0:
            return
        slots = self._find_windows(n, ts, key, present)
        codes = schema.EVENT_TYPE_CODE
        self._kernels.win_accumulate(
            n, slots, w, event_type, revenue_micros, self._wpe, self.spec.size_ms,
            codes["product_view"], codes["add_to_cart"], codes["purchase"],
            self._windows.keys, self._acc,
        )  # fmt: skip
        self._insert_users(n, slots, user_id)

    def emit(self, watermark: int | None) -> pa.Table:
        """Rows of windows with end <= watermark changed since last written, then drop expired ones.

        ``watermark=None`` is the end of input: every window not yet written in its latest
        state is written and the state is cleared.  Rows are ordered by (window_start, key).
        """
        xp = self._xp
        acc = self._acc.reshape(-1, NCOL)
        ready = self._windows.state == READY
        starts = self._windows.keys[0::2]
        chosen = ready & (acc[:, DIRTY] != 0)
        if watermark is not None:
            chosen &= starts + self.spec.size_ms <= watermark
        index = xp.flatnonzero(chosen)
        rows = self._rows(index)
        acc[index, DIRTY] = 0
        if watermark is None:
            self._reset()
        else:
            expired = ready & (starts + (self.spec.size_ms + self.allowed_lateness_ms) < watermark)
            if bool(expired.any()):
                self._retire(expired)
        return rows

    def snapshot(self) -> pa.Table:
        """The complete state: one row per held window (see ``SNAPSHOT_SCHEMA``), in key order."""
        to_host = self._backend.to_host
        index = to_host(self._xp.flatnonzero(self._windows.state == READY))
        keys = to_host(self._windows.keys).reshape(-1, 2)[index]
        order = np.lexsort((keys[:, 1], keys[:, 0]))
        index, keys = index[order], keys[order]
        acc = to_host(self._acc).reshape(-1, NCOL)[index]
        position = np.full(self._windows.capacity, -1, dtype=np.int64)
        position[index] = np.arange(index.shape[0], dtype=np.int64)
        pairs = to_host(self._users.keys).reshape(-1, 2)[to_host(self._users.state) == READY]
        rows = position[pairs[:, 0]]
        pair_order = np.lexsort((pairs[:, 1], rows))
        offsets = np.zeros(index.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=index.shape[0]), out=offsets[1:])
        columns = [pa.array(keys[:, 0]), pa.array(keys[:, 1])]
        columns += [pa.array(acc[:, col]) for _, col in _SNAPSHOT_COUNTS]
        columns.append(
            pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(pairs[pair_order, 1]))
        )
        table = pa.Table.from_arrays(columns, schema=SNAPSHOT_SCHEMA)
        return table.replace_schema_metadata({_CONFIG_KEY: self._config_tag()})

    def restore(self, table: pa.Table) -> None:
        """Replace the state with a :meth:`snapshot` of an aggregator of the same configuration."""
        metadata = table.schema.metadata or {}
        if metadata.get(_CONFIG_KEY) != self._config_tag():
            raise CheckpointError(
                f"window state for {self.spec.table} was written by another configuration "
                f"({metadata.get(_CONFIG_KEY)!r}, expected {self._config_tag()!r}); "
                "start from an empty checkpoint directory"
            )
        if not table.schema.remove_metadata().equals(SNAPSHOT_SCHEMA):
            raise CheckpointError(f"window state for {self.spec.table} has an unexpected schema")
        xp, n = self._xp, table.num_rows
        user_lists = table.column("user_ids").combine_chunks()
        lengths = user_lists.value_lengths().to_numpy(zero_copy_only=False)
        if not np.array_equal(lengths, table.column("users").to_numpy()):
            raise CheckpointError(f"window state for {self.spec.table} is corrupt (user counts)")
        windows = _Table.empty(xp, _fit_capacity(n, MIN_CAPACITY))
        slots = self._insert_window_keys(
            windows,
            xp.asarray(table.column("window_start").to_numpy()),
            xp.asarray(table.column("key").to_numpy()),
        )
        acc = xp.zeros(windows.capacity * NCOL, dtype=xp.int64)
        counts = np.stack([table.column(name).to_numpy() for name, _ in _SNAPSHOT_COUNTS], axis=1)
        acc.reshape(-1, NCOL)[slots[:, None], xp.asarray([c for _, c in _SNAPSHOT_COUNTS])] = (
            xp.asarray(counts)
        )
        self._windows, self._acc = windows, acc
        pair_slots = xp.repeat(slots, xp.asarray(lengths.astype(np.int64)))
        pair_users = xp.asarray(user_lists.flatten().to_numpy(zero_copy_only=False))
        self._users = self._build_users(
            pair_slots, pair_users, _fit_capacity(len(pair_users), MIN_CAPACITY)
        )

    def __len__(self) -> int:
        """Windows held."""
        return int(self._xp.count_nonzero(self._windows.state == READY))

    # ------------------------------------------------------------------ kernels and tables

    @property
    def _wpe(self) -> int:
        return self.spec.windows_per_event

    def _reset(self) -> None:
        xp = self._xp
        self._windows = _Table.empty(xp, MIN_CAPACITY)
        self._acc = xp.zeros(MIN_CAPACITY * NCOL, dtype=xp.int64)
        self._users = _Table.empty(xp, MIN_CAPACITY)

    def _retire(self, expired: Any) -> None:
        """Drop expired windows and their users: retire their slots, compact when worthwhile.

        Retired slots cost probe length and memory but no rebuild; a table is rebuilt once
        its retired slots outnumber its live ones, so compaction is amortised over batches.
        """
        xp = self._xp
        windows, users = self._windows, self._users
        windows.state[expired] = RETIRED
        dead_pairs = (users.state == READY) & expired[users.keys[0::2]]
        users.state[dead_pairs] = RETIRED
        live = int(xp.count_nonzero(windows.state == READY))
        if self._count(windows) - live >= max(live, MIN_CAPACITY):
            self._rebuild()
            return
        live = int(xp.count_nonzero(users.state == READY))
        if self._count(users) - live >= max(live, MIN_CAPACITY):
            self._users = self._rebuild_users(None, None)

    def _count(self, table: _Table) -> int:
        """Occupied slots (ready or retired)."""
        return int(self._backend.to_host(table.size)[0])

    def _launch_error(self) -> int:
        return int(self._backend.to_host(self._error)[0])

    def _find_windows(self, n: int, ts: Any, key: Any, present: Any) -> Any:
        """The window slot of every (row, window) element, inserting new windows.

        A launch that fills the table past half its capacity stops claiming; the table
        grows (which renumbers slots) and the still-pending elements run again.
        """
        xp = self._xp
        slots = xp.full(n * self._wpe, PENDING, dtype=xp.int64)
        pending = n * self._wpe
        for _ in range(MAX_GROW_ATTEMPTS):
            table = self._windows
            size = self._count(table)
            self._error.fill(0)
            self._kernels.win_find_windows(
                n, ts, key, present, self.spec.slide_ms, self._wpe, HASH_MASK, table.capacity,
                table.state, table.keys, table.size, table.capacity // 2, slots, self._error,
            )  # fmt: skip
            if not self._launch_error():
                return slots
            left = int(xp.count_nonzero(slots == PENDING))
            capacity = self._grown(table, size, pending - left, left)
            pending = left
            remap = self._rebuild(window_capacity=capacity)
            slots = xp.where(slots >= 0, remap[xp.maximum(slots, 0)], slots)
        raise KernelError(f"window table {self.spec.table} could not grow to fit the batch")

    def _insert_users(self, n: int, slots: Any, user_id: Any) -> None:
        """Insert every (window, user) pair, counting new ones; grow the set when it fills."""
        xp = self._xp
        pending = xp.ones(n * self._wpe, dtype=xp.uint8)
        waiting = n * self._wpe
        for _ in range(MAX_GROW_ATTEMPTS):
            table = self._users
            size = self._count(table)
            self._error.fill(0)
            self._kernels.win_insert_users(
                n, slots, user_id, self._wpe, HASH_MASK, table.capacity, table.state, table.keys,
                table.size, table.capacity // 2, self._acc, 1, pending, self._error,
            )  # fmt: skip
            if not self._launch_error():
                return
            left = int(xp.count_nonzero(pending))
            capacity = self._grown(table, size, waiting - left, left)
            waiting = left
            self._users = self._rebuild_users(None, capacity)
        raise KernelError(f"user set of {self.spec.table} could not grow to fit the batch")

    def _grown(self, table: _Table, size_before: int, done: int, left: int) -> int:
        """A capacity for the entries plus the inserts the ``left`` elements will probably make.

        The guess extrapolates the share of new keys among the ``done`` elements of the
        failed launch; growth per step is kept within 2x..64x, so a poor guess costs at
        most a few more rounds or a table a few times too large.
        """
        size = self._count(table)
        new_per_element = (size - size_before) / max(done, 1)
        need = size + int(new_per_element * left * 1.25) + MIN_CAPACITY
        return min(64 * table.capacity, max(2 * table.capacity, _next_pow2(2 * need)))

    def _insert_window_keys(self, table: _Table, starts: Any, keys: Any) -> Any:
        """Insert distinct window keys into a table with room for them; return their slots."""
        xp = self._xp
        n = int(starts.shape[0])
        slots = xp.full(n, PENDING, dtype=xp.int64)
        self._error.fill(0)
        self._kernels.win_find_windows(
            n, xp.ascontiguousarray(starts), xp.ascontiguousarray(keys),
            xp.ones(n, dtype=xp.uint8), 1, 1, HASH_MASK, table.capacity, table.state,
            table.keys, table.size, table.capacity, slots, self._error,
        )  # fmt: skip
        if self._launch_error() & ERR_FULL:
            raise KernelError(f"rebuilding the window table of {self.spec.table} overflowed")
        return slots

    def _build_users(self, slots: Any, users: Any, capacity: int) -> _Table:
        """A user set of the given capacity holding the distinct pairs (slots, users)."""
        xp = self._xp
        table = _Table.empty(xp, capacity)
        n = int(slots.shape[0])
        self._error.fill(0)
        self._kernels.win_insert_users(
            n, xp.ascontiguousarray(slots), xp.ascontiguousarray(users), 1, HASH_MASK, capacity,
            table.state, table.keys, table.size, capacity, self._acc, 0,
            xp.ones(n, dtype=xp.uint8), self._error,
        )  # fmt: skip
        if self._launch_error() & ERR_FULL:
            raise KernelError(f"rebuilding the user set of {self.spec.table} overflowed")
        return table

    def _rebuild(self, window_capacity: int | None = None) -> Any:
        """Rehash the live windows into a new table; return old slot -> new slot (-1: gone).

        The user set is rebuilt with it, since its pairs name window slots; retired slots
        and pairs leave.
        """
        xp = self._xp
        old, old_acc = self._windows, self._acc.reshape(-1, NCOL)
        live = xp.flatnonzero(old.state == READY)
        capacity = window_capacity or _fit_capacity(int(live.shape[0]), old.capacity)
        table = _Table.empty(xp, capacity)
        slots = self._insert_window_keys(table, old.keys[2 * live], old.keys[2 * live + 1])
        acc = xp.zeros(capacity * NCOL, dtype=xp.int64)
        acc.reshape(-1, NCOL)[slots] = old_acc[live]
        remap = xp.full(old.capacity, -1, dtype=xp.int64)
        remap[live] = slots
        self._windows, self._acc = table, acc
        self._users = self._rebuild_users(remap, None)
        return remap

    def _rebuild_users(self, remap: Any, capacity: int | None) -> _Table:
        """The user set rehashed into ``capacity`` (or a fitting size), slots mapped by remap."""
        xp = self._xp
        old = self._users
        pairs = old.keys.reshape(-1, 2)[xp.flatnonzero(old.state == READY)]
        slots, users = pairs[:, 0], pairs[:, 1]
        if remap is not None:
            slots = remap[slots]
            kept = slots >= 0
            slots, users = slots[kept], users[kept]
        capacity = capacity or _fit_capacity(int(slots.shape[0]), old.capacity)
        return self._build_users(slots, users, capacity)

    # ------------------------------------------------------------------ output

    def _rows(self, index: Any) -> pa.Table:
        """Output rows of the given window slots, ordered by (window_start, key)."""
        to_host = self._backend.to_host
        keys = to_host(self._windows.keys.reshape(-1, 2)[index])
        acc = to_host(self._acc.reshape(-1, NCOL)[index])
        order = np.lexsort((keys[:, 1], keys[:, 0]))
        keys, acc = keys[order], acc[order]
        n = int(keys.shape[0])
        starts = keys[:, 0]
        columns: dict[str, pa.Array] = {
            "window_start": pa.array(starts, type=pa.int64()).cast(schema.TS),
            "window_end": pa.array(starts + self.spec.size_ms, type=pa.int64()).cast(schema.TS),
            "revenue": pa.array(acc[:, REVENUE].astype(np.float64) / schema.REVENUE_SCALE),
            "partition": pa.array(np.full(n, self.partition, dtype=np.int32)),
            "version": pa.array((acc[:, EARLY] + acc[:, LATE]).astype(np.uint64)),
        }
        if self.spec.key == "event_type":
            columns["event_type"] = pa.array(schema.EVENT_TYPES, type=pa.string()).take(
                pa.array(keys[:, 1])
            )
        else:
            columns[self.spec.key] = pa.array(keys[:, 1], type=pa.int64())
        for name, col in _MEASURES.items():
            columns[name] = pa.array(acc[:, col], type=pa.int64())
        return pa.Table.from_arrays([columns[f.name] for f in self.schema], schema=self.schema)

    def _config_tag(self) -> bytes:
        spec = self.spec
        return (
            f"{spec.table}:{spec.key}:{spec.size_ms}:{spec.slide_ms}:{self.allowed_lateness_ms}"
        ).encode()
