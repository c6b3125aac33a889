"""Dedup (SPEC §2.3): drop producer retries, per partition, with a TTL on the ids.

An event is a duplicate when an earlier *accepted* event of the partition has the same
``event_id`` and the event's watermark is below that event's ``ts + ttl``.  The rule needs
one number per id: ``M``, the ``ts`` of the id's last accepted event.  An event with a
known id is accepted only when its watermark is at or past ``M + ttl``; then every earlier
accepted event of the id is below the (non-decreasing) watermark minus ``ttl`` for good,
so ``M`` simply becomes the new event's ``ts``.

The state is a device hash set of those ids (``kernels/dedup.cu``): entries (masked 64-bit
key, ``M``, the id's bytes in an arena) found through an open-addressing table.  Equal keys
are told apart by their bytes, so a hash collision never drops a distinct event.  Ids whose
``M + ttl`` the expiry watermark has reached can never cause a duplicate again; they leave
the state when more than half of the entries are such, which keeps memory bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from gpu_pipeline.backend.base import Backend, DeviceStrings
from gpu_pipeline.errors import CheckpointError, ConfigError, KernelError

I64_MIN = int(np.iinfo(np.int64).min)
I64_MAX = int(np.iinfo(np.int64).max)
U64_MAX = 2**64 - 1
MIN_TABLE_CAPACITY = 16
MAX_BATCH_ROWS = 2**31 - 1
"""Table slots hold 32-bit row and entry indices (kernels/dedup.cu): the most rows of a
batch, and the most ids of the state."""
EXPIRE_WATERMARK_KEY = b"gpu_pipeline.dedup.expire_watermark"
"""Schema metadata of a snapshot: the last expiry watermark, so a restore is exact."""


@dataclass(frozen=True)
class DedupConfig:
    """How long an accepted id suppresses its retries, and the key mask of the hash set.

    ``hash_mask`` is all ones in production; tests narrow it (e.g. ``0xF``) so that distinct
    ids share keys, which must never change a result.
    """

    ttl_ms: int
    hash_mask: int = U64_MAX

    def __post_init__(self) -> None:
        if not _is_int(self.ttl_ms) or not 0 <= self.ttl_ms <= I64_MAX:
            raise ConfigError(
                "dedup_ttl_ms",
                f"must be a non-negative integer of milliseconds, got {self.ttl_ms!r}",
            )
        if not _is_int(self.hash_mask) or not 0 < self.hash_mask <= U64_MAX:
            raise ConfigError(
                "dedup.hash_mask", f"must be an integer in [1, 2**64 - 1], got {self.hash_mask!r}"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclass
class _Entries:
    """The accepted ids: rows ``0 .. size - 1`` of arrays that keep spare capacity."""

    keys: Any  # u64, masked hash of the id
    max_ts: Any  # i64, ts of the id's last accepted event
    offsets: Any  # i64, size + 1 used; the id's bytes are arena[offsets[e]:offsets[e + 1]]
    arena: Any  # u8
    size: int
    table: Any  # i64 entry indices, -1 = empty; power-of-two capacity, load <= 0.5

    @property
    def arena_used(self) -> int:
        return int(self.offsets[self.size])


class Dedup:
    """The dedup operator of one partition: ``apply`` flags duplicates batch by batch."""

    def __init__(self, config: DedupConfig, backend: Backend) -> None:
        self.config = config
        self._backend = backend
        self._xp = backend.xp
        self._expire_wm = I64_MIN
        self._entries = self._empty_entries()
        # Per-batch work arrays, kept between batches (fresh allocations cost page faults);
        # scratch, not state: nothing in them outlives a batch.
        self._scratch: dict[str, Any] = {}

    # ------------------------------------------------------------------ public API

    def apply(self, ids: DeviceStrings, ts: Any, w: Any) -> Any:
        """Flag the duplicates of one batch (True = duplicate) and record the accepted ids.

        ``ids``, ``ts`` (int64 ms) and ``w`` (int64 watermark per event, ``GP_I64_MIN`` for
        -infinity) are the batch's valid events in arrival order, on the backend's device.
        """
        xp = self._xp
        n = len(ids)
        ts = self._int64_column(ts, n, "ts")
        w = self._int64_column(w, n, "w")
        if n == 0:
            return xp.zeros(0, dtype=xp.bool_)
        if n > MAX_BATCH_ROWS:
            raise ValueError(f"Dedup.apply: a batch holds at most {MAX_BATCH_ROWS} events, got {n}")
        keys = self._work("keys", n, xp.uint64)
        self._backend.kernels.hash_strings(
            n, ids.offsets, ids.chars, np.uint64(self.config.hash_mask), keys
        )
        rep, repeated = self._group(ids, keys)
        dup, is_new, new_max = self._resolve(ids, keys, ts, w, rep, repeated)
        self._append(ids, keys, xp.flatnonzero(is_new), new_max)
        return dup.view(xp.bool_)

    def expire(self, watermark: int) -> None:
        """Forget the ids that can no longer cause a duplicate once the watermark is here.

        The watermark only moves forward: a smaller value than an earlier one is ignored.
        """
        self._expire_wm = max(self._expire_wm, int(watermark))
        entries = self._entries
        dead = entries.size - len(self)
        if dead > 0 and 2 * dead > entries.size:
            self._rebuild(reserve=0)

    def snapshot(self) -> pa.Table:
        """The live ids and their ``max_ts`` (ts of the last accepted event), in entry order."""
        entries = self._entries
        live = self._xp.flatnonzero(self._live_mask())
        offsets, arena = self._gather_ids(entries.offsets, entries.arena, live)
        host_offsets = self._backend.to_host(offsets)
        host_arena = self._backend.to_host(arena)
        count = int(live.shape[0])
        ids = pa.LargeStringArray.from_buffers(
            count, pa.py_buffer(host_offsets), pa.py_buffer(host_arena)
        )
        if int(host_offsets[-1]) < 2**31:
            ids = ids.cast(pa.string())
        max_ts = pa.array(self._backend.to_host(entries.max_ts[live]), type=pa.int64())
        schema = pa.schema(
            [
                pa.field("event_id", ids.type, nullable=False),
                pa.field("max_ts", pa.int64(), nullable=False),
            ],
            metadata={EXPIRE_WATERMARK_KEY: str(self._expire_wm).encode()},
        )
        return pa.Table.from_arrays([ids, max_ts], schema=schema)

    def restore(self, table: pa.Table) -> None:
        """Replace the state by a :meth:`snapshot` (taken by any engine, any hash mask)."""
        ids_column, max_ts_column, expire_wm = _check_snapshot(table)
        xp = self._xp
        ids = self._backend.strings(ids_column)
        n = len(ids)
        keys = xp.empty(max(n, 1), dtype=xp.uint64)
        self._backend.kernels.hash_strings(
            n, ids.offsets, ids.chars, np.uint64(self.config.hash_mask), keys
        )
        offsets = ids.offsets - ids.offsets[0]
        arena = xp.array(ids.chars[int(ids.offsets[0]) : int(ids.offsets[n])], dtype=xp.uint8)
        self._expire_wm = expire_wm
        self._entries = _Entries(
            keys=keys,
            max_ts=self._backend.asarray(max_ts_column),
            offsets=xp.array(offsets, dtype=xp.int64),
            arena=arena if arena.shape[0] else xp.zeros(1, dtype=xp.uint8),
            size=n,
            table=self._new_table(n),
        )
        self._insert(0, n)

    def __len__(self) -> int:
        """The number of live ids (those that can still cause a duplicate)."""
        return int(self._xp.count_nonzero(self._live_mask()))

    # ------------------------------------------------------------------ batch steps

    def _group(self, ids: DeviceStrings, keys: Any) -> tuple[Any, Any]:
        """Group the batch's rows by id (bytes, not only keys) in a batch-local table."""
        xp = self._xp
        n = int(keys.shape[0])
        slots = self._work("slots", _table_capacity(n), xp.int64, fill=-1)
        rep = self._work("rep", n, xp.int32)
        repeated = self._work("repeated", n, xp.int32, fill=0)
        error = xp.zeros(1, dtype=xp.int32)
        self._backend.kernels.dedup_group_batch(
            n, keys, ids.offsets, ids.chars, slots.shape[0], slots, rep, repeated, error
        )
        _raise_on(error, "dedup_group_batch: the batch table is full")
        return rep, repeated

    def _repeated_rows(self, rep: Any, repeated: Any) -> tuple[Any, Any]:
        """The rows of ids seen more than once in the batch, grouped by id in arrival order.

        Returns ``group_rows`` (those rows, sorted by representative, stably) and
        ``group_start`` (for each repeated id's representative, where its rows begin).  Only
        such ids need a sequential walk, and they are few (producer retries).
        """
        xp = self._xp
        n = int(rep.shape[0])
        group_start = self._work("group_start", n, xp.int64)
        rows = xp.flatnonzero(repeated[rep])
        if rows.shape[0] == 0:
            return group_start, xp.zeros(1, dtype=xp.int64)
        group_rows = xp.ascontiguousarray(rows[xp.argsort(rep[rows], kind="stable")])
        owners = rep[group_rows]
        heads = xp.flatnonzero(
            xp.concatenate((xp.ones(1, dtype=xp.bool_), owners[1:] != owners[:-1]))
        )
        group_start[owners[heads]] = heads
        return group_start, group_rows

    def _resolve(
        self, ids: DeviceStrings, keys: Any, ts: Any, w: Any, rep: Any, repeated: Any
    ) -> tuple[Any, Any, Any]:
        """Apply the TTL rule per id against the state; update known ids' ``M`` in place."""
        xp = self._xp
        n = int(keys.shape[0])
        group_start, group_rows = self._repeated_rows(rep, repeated)
        entries = self._entries
        dup = xp.empty(n, dtype=xp.uint8)  # returned to the caller: never scratch
        is_new = self._work("is_new", n, xp.uint8, fill=0)
        new_max = self._work("new_max", n, xp.int64)
        error = xp.zeros(1, dtype=xp.int32)
        self._backend.kernels.dedup_resolve(
            n, rep, repeated, group_start, group_rows.shape[0], group_rows, keys, ids.offsets,
            ids.chars, ts, w, self.config.ttl_ms, self._expire_wm, entries.table.shape[0],
            entries.table, entries.offsets, entries.arena, entries.max_ts, dup, is_new, new_max,
            error,
        )  # fmt: skip
        _raise_on(error, "dedup_resolve: the state table is full")
        return dup, is_new, new_max

    def _append(self, ids: DeviceStrings, keys: Any, rows: Any, new_max: Any) -> None:
        """Add the new accepted ids (first rows ``rows``, ascending) to the state."""
        xp = self._xp
        added = int(rows.shape[0])
        if added == 0:
            return
        if self._entries.size + added > MAX_BATCH_ROWS:
            raise KernelError(
                f"the dedup state would hold over {MAX_BATCH_ROWS} ids: lower dedup_ttl_ms"
            )
        if 2 * (self._entries.size + added) > self._entries.table.shape[0]:
            self._rebuild(reserve=added)
        entries = self._entries
        start, used = entries.size, entries.arena_used
        lengths = ids.offsets[rows + 1] - ids.offsets[rows]
        total = int(lengths.sum())
        entries.keys = _with_capacity(xp, entries.keys, start + added)
        entries.max_ts = _with_capacity(xp, entries.max_ts, start + added)
        entries.offsets = _with_capacity(xp, entries.offsets, start + added + 1)
        entries.arena = _with_capacity(xp, entries.arena, used + total)
        entries.keys[start : start + added] = keys[rows]
        entries.max_ts[start : start + added] = new_max[rows]
        entries.offsets[start + 1 : start + added + 1] = used + xp.cumsum(lengths)
        self._backend.kernels.dedup_gather_bytes(
            added, ids.offsets, ids.chars, xp.ascontiguousarray(rows),
            entries.offsets[start : start + added], entries.arena,
        )  # fmt: skip
        entries.size = start + added
        self._insert(start, added)

    # ------------------------------------------------------------------ state upkeep

    def _live_mask(self) -> Any:
        """Entries whose ``M + ttl`` is still above the expiry watermark (exact in int64)."""
        xp = self._xp
        max_ts = self._entries.max_ts[: self._entries.size]
        if self._expire_wm == I64_MIN:
            return xp.ones(max_ts.shape[0], dtype=xp.bool_)
        ttl = self.config.ttl_ms
        # max_ts + ttl wraps only where the first test is already True.
        return (max_ts > I64_MAX - ttl) | (max_ts + np.int64(ttl) > self._expire_wm)

    def _rebuild(self, reserve: int) -> None:
        """Drop the dead entries (compacting the arrays) and re-table the live ones.

        The new table holds ``reserve`` more entries at a load of at most 1/4, so that a
        growing state rebuilds only when it has doubled.
        """
        xp = self._xp
        old = self._entries
        live = xp.flatnonzero(self._live_mask())
        size = int(live.shape[0])
        if size == old.size:
            old.table = self._new_table(2 * (size + reserve))
        else:
            offsets, arena = self._gather_ids(old.offsets, old.arena, live)
            self._entries = _Entries(
                keys=xp.ascontiguousarray(old.keys[live]),
                max_ts=xp.ascontiguousarray(old.max_ts[live]),
                offsets=offsets,
                arena=arena,
                size=size,
                table=self._new_table(2 * (size + reserve)),
            )
        self._insert(0, size)

    def _gather_ids(self, offsets: Any, chars: Any, rows: Any) -> tuple[Any, Any]:
        """The strings ``rows`` of (offsets, chars), compacted into fresh arrays."""
        xp = self._xp
        count = int(rows.shape[0])
        new_offsets = xp.zeros(count + 1, dtype=xp.int64)
        if count == 0:
            return new_offsets, xp.zeros(1, dtype=xp.uint8)
        xp.cumsum(offsets[rows + 1] - offsets[rows], out=new_offsets[1:])
        arena = xp.zeros(max(int(new_offsets[-1]), 1), dtype=xp.uint8)
        self._backend.kernels.dedup_gather_bytes(
            count, offsets, chars, xp.ascontiguousarray(rows), new_offsets, arena
        )
        return new_offsets, arena

    def _insert(self, start: int, count: int) -> None:
        """Put entries ``start .. start + count - 1`` into the table."""
        if count == 0:
            return
        entries = self._entries
        error = self._xp.zeros(1, dtype=self._xp.int32)
        self._backend.kernels.dedup_insert(
            count, start, entries.keys, entries.table.shape[0], entries.table, error
        )
        _raise_on(error, "dedup_insert: the state table is full")

    def _work(self, name: str, size: int, dtype: Any, fill: int | None = None) -> Any:
        """A scratch array of ``size`` items (its capacity is kept), filled if asked."""
        buffer = self._scratch.get(name)
        if buffer is None or buffer.shape[0] < size:
            buffer = self._xp.empty(max(size, 1), dtype=dtype)
            self._scratch[name] = buffer
        view = buffer[:size]
        if fill is not None:
            view.fill(fill)
        return view

    def _new_table(self, entries: int) -> Any:
        return self._xp.full(_table_capacity(entries), -1, dtype=self._xp.int64)

    def _empty_entries(self) -> _Entries:
        xp = self._xp
        return _Entries(
            keys=xp.zeros(MIN_TABLE_CAPACITY, dtype=xp.uint64),
            max_ts=xp.zeros(MIN_TABLE_CAPACITY, dtype=xp.int64),
            offsets=xp.zeros(MIN_TABLE_CAPACITY + 1, dtype=xp.int64),
            arena=xp.zeros(MIN_TABLE_CAPACITY, dtype=xp.uint8),
            size=0,
            table=self._new_table(0),
        )

    def _int64_column(self, values: Any, n: int, name: str) -> Any:
        array = self._xp.ascontiguousarray(self._xp.asarray(values), dtype=self._xp.int64)
        if array.ndim != 1 or array.shape[0] != n:
            raise ValueError(
                f"Dedup.apply: {name} must hold one int64 per id ({n}), got {array.shape}"
            )
        return array


def _table_capacity(entries: int) -> int:
    """The power of two that keeps ``entries`` at a load factor of at most one half."""
    return max(MIN_TABLE_CAPACITY, 1 << max(2 * entries - 1, 1).bit_length())


def _with_capacity(xp: Any, array: Any, needed: int) -> Any:
    """``array`` itself when it holds ``needed`` items, else a copy with room to double."""
    if array.shape[0] >= needed:
        return array
    grown = xp.zeros(max(needed, 2 * array.shape[0]), dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown


def _raise_on(error: Any, message: str) -> None:
    if int(error[0]):
        raise KernelError(
            f"{message}; this is a bug: the host keeps the load factor at or below 0.5"
        )


def _check_snapshot(table: pa.Table) -> tuple[pa.Array, np.ndarray, int]:
    """The ids, max_ts and expiry watermark of a snapshot table, or a CheckpointError."""
    for name in ("event_id", "max_ts"):
        if name not in table.column_names:
            raise CheckpointError(
                f"dedup snapshot lacks the column {name!r}: the checkpoint is corrupt"
            )
    ids = table.column("event_id")
    max_ts = table.column("max_ts")
    if not (pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
        raise CheckpointError(f"dedup snapshot: event_id must be a string column, got {ids.type}")
    if not pa.types.is_int64(max_ts.type):
        raise CheckpointError(f"dedup snapshot: max_ts must be int64, got {max_ts.type}")
    if ids.null_count or max_ts.null_count:
        raise CheckpointError("dedup snapshot holds nulls: the checkpoint is corrupt")
    metadata = table.schema.metadata or {}
    try:
        expire_wm = int(metadata.get(EXPIRE_WATERMARK_KEY, str(I64_MIN).encode()))
    except ValueError as exc:
        raise CheckpointError(
            f"dedup snapshot: bad {EXPIRE_WATERMARK_KEY.decode()} metadata"
        ) from exc
    # A writable copy: the kernels update max_ts in place.
    host_max_ts = np.array(max_ts.to_numpy(), dtype=np.int64, copy=True)
    return ids.combine_chunks(), host_max_ts, expire_wm
