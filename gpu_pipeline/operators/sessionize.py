"""Gap-based user sessions (SPEC §2.5), carried across micro-batches.

Per user, in arrival order, an on-time event starts a new session when the user has no open
session or when its ``ts`` is more than the gap G after the max ``ts`` of the user's earlier
on-time events; otherwise it joins the open session.  A session is written once, when the
watermark is strictly greater than its max ``ts`` + G + allowed lateness L (no on-time event
can reach it after that), or at end of input.

One batch is processed in three steps:

1. group the rows by user with a stable sort (each group stays in arrival order) and find
   each user's open session in the state (a ``searchsorted`` on the state's sorted users);
2. the ``sess_count`` / ``sess_walk`` kernels walk each group sequentially and produce the
   session id of every row plus one aggregate per session touched, carried state included;
3. the host merges those aggregates into the state: a user's latest session is its *open*
   session; sessions superseded by a newer one are final but wait for the watermark.

Pages are strings and stay on the host in a :class:`PageVocabulary`; the state holds int32
page codes, so that merging, closing and compacting the state move numbers only (on the
device).  The kernels report the rows holding the min and max ``ts``; the landing/exit codes
are gathered from the batch's codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gpu_pipeline import schema
from gpu_pipeline.backend.base import Backend, DeviceStrings
from gpu_pipeline.errors import CheckpointError, ConfigError
from gpu_pipeline.semantics import Semantics

AGG_COLUMNS: tuple[str, ...] = (
    "events",
    "page_views",
    "product_views",
    "add_to_carts",
    "purchases",
    "revenue_micros",
)
"""The int64 measures of a session, in the order of the kernels' aggregate rows."""

STATE_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("session_id", pa.uint64(), nullable=False),
        pa.field("session_start", pa.int64(), nullable=False),
        pa.field("session_end", pa.int64(), nullable=False),
        *(pa.field(name, pa.int64(), nullable=False) for name in AGG_COLUMNS),
        pa.field("landing_page", pa.string()),
        pa.field("exit_page", pa.string()),
        pa.field("open", pa.bool_(), nullable=False),
    ]
)
"""The snapshot of a :class:`Sessionizer`: every session not yet written.

``open`` marks each user's latest session (the one later events may join); revenue stays in
exact integer micro-units so that a restored run sums exactly like an uninterrupted one.
"""

_I64_MIN = int(np.iinfo(np.int64).min)
_I64_MAX = int(np.iinfo(np.int64).max)
_ALL_ONES = np.uint64(2**64 - 1)
_MIN_VOCABULARY = 4096
"""Below this many pages the vocabulary is never compacted."""


@dataclass(frozen=True)
class SessionConfig:
    """The session gap G and the allowed lateness L, in milliseconds."""

    gap_ms: int
    allowed_lateness_ms: int

    def __post_init__(self) -> None:
        for option, value in (
            ("session_gap_ms", self.gap_ms),
            ("allowed_lateness_ms", self.allowed_lateness_ms),
        ):
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    option, f"must be a non-negative integer of milliseconds, got {value!r}"
                )

    @classmethod
    def from_semantics(cls, semantics: Semantics) -> SessionConfig:
        """The session part of the pipeline's semantics."""
        return cls(semantics.session_gap_ms, semantics.allowed_lateness_ms)


@dataclass
class _Sessions:
    """Sessions as columns on the device; pages as codes of the operator's vocabulary."""

    user: Any
    sid: Any
    start: Any
    end: Any
    agg: Any  # (rows, len(AGG_COLUMNS)) int64
    landing: Any  # int32 page code, -1 for no page
    exit: Any

    @classmethod
    def empty(cls, xp: Any) -> _Sessions:
        return cls(
            xp.zeros(0, dtype=xp.int64),
            xp.zeros(0, dtype=xp.uint64),
            xp.zeros(0, dtype=xp.int64),
            xp.zeros(0, dtype=xp.int64),
            xp.zeros((0, len(AGG_COLUMNS)), dtype=xp.int64),
            xp.zeros(0, dtype=xp.int32),
            xp.zeros(0, dtype=xp.int32),
        )

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def take(self, index: Any) -> _Sessions:
        return _Sessions(
            self.user[index],
            self.sid[index],
            self.start[index],
            self.end[index],
            self.agg[index],
            self.landing[index],
            self.exit[index],
        )

    def concat(self, other: _Sessions, xp: Any) -> _Sessions:
        if not len(other):
            return self
        if not len(self):
            return other
        return _Sessions(
            *(
                xp.concatenate([mine, theirs])
                for mine, theirs in zip(self.columns(), other.columns(), strict=True)
            )
        )

    def columns(self) -> tuple[Any, ...]:
        return (self.user, self.sid, self.start, self.end, self.agg, self.landing, self.exit)


class PageVocabulary:
    """The distinct pages of the state, so that sessions carry int32 codes instead of strings.

    Codes index :attr:`values`; -1 is "no page".  :meth:`compact` drops the pages no session
    refers to any more, which keeps the vocabulary bounded by the state.
    """

    def __init__(self) -> None:
        self.values: pa.Array = pa.array([], type=pa.string())

    def __len__(self) -> int:
        return len(self.values)

    def encode(self, pages: pa.Array) -> np.ndarray:
        """The code of every page (adding unseen pages to the vocabulary)."""
        encoded = pc.dictionary_encode(pages)
        known = pc.index_in(encoded.dictionary, value_set=self.values)
        unseen = pc.is_null(known)
        new_pages = encoded.dictionary.filter(unseen)
        mapping = np.append(known.fill_null(-1).to_numpy().astype(np.int32), np.int32(-1))
        mapping[:-1][unseen.to_numpy(zero_copy_only=False)] = len(self.values) + np.arange(
            len(new_pages), dtype=np.int32
        )
        if len(new_pages):
            self.values = pa.concat_arrays([self.values, new_pages])
        # A null page has a null index: send it to the trailing -1 of the mapping.
        rows = encoded.indices.fill_null(-1).to_numpy()
        return mapping[rows]

    def decode(self, codes: np.ndarray) -> pa.Array:
        """The pages of ``codes`` (null for -1)."""
        index = pa.array(codes.astype(np.int64), mask=codes < 0)
        return self.values.take(index)

    def compact(self, live: np.ndarray) -> np.ndarray:
        """Keep only the ``live`` codes (sorted, unique); return the old-to-new code map."""
        remap = np.full(len(self.values) + 1, -1, dtype=np.int32)  # last entry maps -1
        remap[live] = np.arange(len(live), dtype=np.int32)
        self.values = self.values.take(pa.array(live.astype(np.int64)))
        return remap


@dataclass
class _Segments:
    """What the walk reports: one aggregate per session touched by the batch."""

    sessions: _Sessions
    carry: Any  # state index of the open session it continues, or -1
    group_offset: Any  # segments of group g: [group_offset[g], group_offset[g + 1])


@dataclass
class _SortedBatch:
    """One batch's columns grouped by user (stable sort): ``order[p]`` is the row at position p.

    Gathering the columns once into this order lets the walk read memory sequentially;
    chasing ``order`` inside the walk costs a cache miss per row and column.
    """

    order: Any
    user: Any
    ts: Any
    event_type: Any
    revenue_micros: Any
    id_hash: Any  # gp_hash_bytes of each event id


class Sessionizer:
    """The sessions operator of one partition: assigns session ids and writes closed sessions.

    Parameters
    ----------
    config
        The gap and the allowed lateness.
    backend
        The engine whose arrays and kernels run the walk.
    partition
        The partition number written into every ``sessions`` row.
    """

    def __init__(self, config: SessionConfig, backend: Backend, partition: int) -> None:
        self._config = config
        self._backend = backend
        self._xp = backend.xp
        self._partition = partition
        self._open = _Sessions.empty(self._xp)  # one per user, sorted by user id
        self._done = _Sessions.empty(self._xp)  # superseded, waiting for the watermark
        self._pages = PageVocabulary()

    def __len__(self) -> int:
        return len(self._open) + len(self._done)

    # ------------------------------------------------------------------ batches

    def apply(
        self,
        user_id: Any,
        ts: Any,
        ids: DeviceStrings,
        event_type: Any,
        revenue_micros: Any,
        pages: pa.Array | pa.ChunkedArray,
    ) -> Any:
        """Sessionize one batch of on-time events; return the session id of every row.

        All device arrays hold the batch's on-time rows in arrival order (``user_id``,
        ``ts`` and ``revenue_micros`` int64, ``event_type`` int8 codes); ``pages`` is the
        host Arrow string column of the same rows.
        """
        xp = self._xp
        n = int(user_id.shape[0])
        _check_lengths(n, ts, ids, event_type, revenue_micros, pages)
        if n == 0:
            return xp.zeros(0, dtype=xp.uint64)
        order = xp.ascontiguousarray(xp.argsort(user_id, kind="stable").astype(xp.int64))
        id_hash = xp.empty(n, dtype=xp.uint64)
        self._backend.kernels.hash_strings(n, ids.offsets, ids.chars, _ALL_ONES, id_hash)
        batch = _SortedBatch(
            order,
            user_id[order],
            ts[order],
            event_type[order],
            revenue_micros[order],
            id_hash[order],
        )
        heads = xp.flatnonzero(batch.user[1:] != batch.user[:-1]) + 1
        group_start = xp.concatenate(
            [xp.zeros(1, dtype=xp.int64), heads.astype(xp.int64), xp.full(1, n, dtype=xp.int64)]
        )
        carry = self._carry_index(batch.user[group_start[:-1]])
        sorted_sid = xp.empty(n, dtype=xp.uint64)
        page_codes = self._backend.asarray(self._pages.encode(_as_string_array(pages)))
        segments = self._walk(batch, group_start, carry, sorted_sid, page_codes)
        self._merge(segments, carry)
        out_sid = xp.empty(n, dtype=xp.uint64)
        out_sid[order] = sorted_sid
        return out_sid

    def _carry_index(self, group_users: Any) -> Any:
        """Per group, the row of the user's open session in ``self._open``, or -1."""
        xp = self._xp
        state_users = self._open.user
        if not len(self._open):
            return xp.full(group_users.shape[0], -1, dtype=xp.int64)
        pos = xp.searchsorted(state_users, group_users)
        clipped = xp.minimum(pos, state_users.shape[0] - 1)
        found = state_users[clipped] == group_users
        return xp.where(found, clipped, -1).astype(xp.int64)

    def _walk(
        self, batch: _SortedBatch, group_start: Any, carry: Any, sorted_sid: Any, pages: Any
    ) -> _Segments:
        """Run the two kernel launches; gather each segment's landing and exit page codes."""
        xp, kernels, gap = self._xp, self._backend.kernels, self._config.gap_ms
        groups = int(group_start.shape[0]) - 1
        nseg = xp.empty(groups, dtype=xp.int64)
        kernels.sess_count(groups, group_start, batch.ts, carry, self._open.end, gap, nseg)
        offset = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(nseg)])
        total = int(offset[-1])
        seg_sid = xp.empty(total, dtype=xp.uint64)
        seg_carry, seg_group, seg_start, seg_end, seg_min, seg_max = (
            xp.empty(total, dtype=xp.int64) for _ in range(6)
        )
        seg_agg = xp.empty((total, len(AGG_COLUMNS)), dtype=xp.int64)
        state = self._open
        kernels.sess_walk(
            groups, group_start, batch.order, batch.user, batch.ts, batch.event_type,
            batch.revenue_micros, batch.id_hash, carry, state.sid,
            state.start, state.end, xp.ascontiguousarray(state.agg), gap, offset, sorted_sid,
            seg_sid, seg_carry, seg_group, seg_start, seg_end, seg_agg, seg_min, seg_max,
        )  # fmt: skip
        landing = _page_codes(pages, state.landing, seg_min, seg_carry, xp)
        exit_ = _page_codes(pages, state.exit, seg_max, seg_carry, xp)
        users = batch.user[group_start[seg_group]]
        sessions = _Sessions(users, seg_sid, seg_start, seg_end, seg_agg, landing, exit_)
        return _Segments(sessions, seg_carry, offset)

    def _merge(self, segments: _Segments, carry: Any) -> None:
        """Fold the batch's sessions into the state.

        Each group's last segment becomes the user's open session (replacing the carried
        one, which it either continues or supersedes); earlier segments, and a carried open
        session that the batch superseded without joining it, move to the done set.  Rows
        are picked by index from (open state + segments) so that every column is gathered
        once.
        """
        xp = self._xp
        n_open, offset = len(self._open), segments.group_offset
        last = offset[1:] - 1
        first_continues = segments.carry[offset[:-1]] >= 0
        superseded = carry[xp.flatnonzero((carry >= 0) & ~first_continues)]
        is_last = xp.zeros(len(segments.sessions), dtype=bool)
        is_last[last] = True
        earlier = xp.flatnonzero(~is_last)
        kept_mask = xp.ones(n_open, dtype=bool)
        kept_mask[carry[carry >= 0]] = False
        kept = xp.flatnonzero(kept_mask)
        order = _merge_order(self._open.user[kept], segments.sessions.user[last], xp)
        open_index = xp.concatenate([kept, last + n_open])[order]
        done_index = xp.concatenate([superseded, earlier + n_open])
        both = self._open.concat(segments.sessions, xp)
        self._open = both.take(open_index)
        self._done = self._done.concat(both.take(done_index), xp)

    # ------------------------------------------------------------------ closing

    def close(self, watermark: int | None) -> pa.Table:
        """Remove and return (as ``schema.SESSIONS`` rows) every session the watermark closes.

        A session closes when ``watermark > session_end + G + L``; ``None`` is end of input
        and closes everything.  Rows are ordered by (user_id, session_start, session_id).
        """
        closed_open, self._open = self._split(self._open, watermark)
        closed_done, self._done = self._split(self._done, watermark)
        # Done sessions first: per user they predate the open one (see _output_order).
        rows = self._rows(closed_done.concat(closed_open, self._xp))
        self._compact_pages()
        return rows

    def _compact_pages(self) -> None:
        """Drop pages no session refers to once they outnumber the state's references."""
        references = 2 * len(self)
        if len(self._pages) <= max(_MIN_VOCABULARY, 2 * references):
            return
        xp, asarray = self._xp, self._backend.asarray
        codes = [s.landing for s in (self._open, self._done)] + [
            s.exit for s in (self._open, self._done)
        ]
        live = self._backend.to_host(xp.unique(xp.concatenate(codes)))
        remap = asarray(self._pages.compact(live[live >= 0]))
        for sessions in (self._open, self._done):
            sessions.landing = remap[sessions.landing]
            sessions.exit = remap[sessions.exit]

    def _split(self, sessions: _Sessions, watermark: int | None) -> tuple[_Sessions, _Sessions]:
        """(closing, staying) parts of ``sessions``, each in its original order."""
        xp = self._xp
        if watermark is None:
            return sessions, _Sessions.empty(xp)
        threshold = watermark - self._config.gap_ms - self._config.allowed_lateness_ms
        if threshold <= _I64_MIN:
            return _Sessions.empty(xp), sessions
        closing = sessions.end < min(threshold, _I64_MAX)
        closing_rows = xp.flatnonzero(closing)
        if not closing_rows.shape[0]:
            return _Sessions.empty(xp), sessions
        staying_rows = xp.flatnonzero(~closing)
        return sessions.take(closing_rows), sessions.take(staying_rows)

    def _rows(self, sessions: _Sessions) -> pa.Table:
        """``schema.SESSIONS`` rows in (user_id, session_start, session_id) order."""
        to_host = self._backend.to_host
        user, start, sid = to_host(sessions.user), to_host(sessions.start), to_host(sessions.sid)
        index = _output_order(user, start, sid)
        agg = to_host(sessions.agg)[index]
        columns = [
            pa.array(user[index]),
            pa.array(sid[index]),
            pa.array(start[index]).cast(schema.TS),
            pa.array(to_host(sessions.end)[index]).cast(schema.TS),
            *(pa.array(agg[:, k]) for k in range(5)),
            pa.array(agg[:, 5].astype(np.float64) / schema.REVENUE_SCALE),
            self._pages.decode(to_host(sessions.landing)[index]),
            self._pages.decode(to_host(sessions.exit)[index]),
            pa.array(np.full(len(index), self._partition, dtype=np.int32)),
        ]
        return pa.Table.from_arrays(columns, schema=schema.SESSIONS)

    # ------------------------------------------------------------------ state

    def snapshot(self) -> pa.Table:
        """Every session not yet written, as a ``STATE_SCHEMA`` table (open ones first)."""
        tables = []
        for sessions, is_open in ((self._open, True), (self._done, False)):
            to_host = self._backend.to_host
            agg = to_host(sessions.agg)
            columns = [
                pa.array(to_host(sessions.user), type=pa.int64()),
                pa.array(to_host(sessions.sid), type=pa.uint64()),
                pa.array(to_host(sessions.start), type=pa.int64()),
                pa.array(to_host(sessions.end), type=pa.int64()),
                *(pa.array(agg[:, k], type=pa.int64()) for k in range(len(AGG_COLUMNS))),
                self._pages.decode(to_host(sessions.landing)),
                self._pages.decode(to_host(sessions.exit)),
                pa.array(np.full(len(sessions), is_open), type=pa.bool_()),
            ]
            tables.append(pa.Table.from_arrays(columns, schema=STATE_SCHEMA))
        return pa.concat_tables(tables)

    def restore(self, table: pa.Table) -> None:
        """Replace the state with a snapshot taken by :meth:`snapshot`."""
        if not table.schema.equals(STATE_SCHEMA, check_metadata=False):
            raise CheckpointError(
                "the sessions state does not match the expected schema "
                f"({table.schema} instead of {STATE_SCHEMA}): the checkpoint belongs to "
                "another version; start from an empty checkpoint directory"
            )
        table = table.combine_chunks()
        self._pages = PageVocabulary()
        is_open = table["open"].to_numpy()
        opened = self._from_table(table.filter(pa.array(is_open)))
        host_users = self._backend.to_host(opened.user)
        if np.any(host_users[1:] <= host_users[:-1]):
            order = np.argsort(host_users, kind="stable")
            opened = opened.take(self._backend.asarray(order))
            if np.any(np.diff(host_users[order]) == 0):
                raise CheckpointError("the sessions state holds two open sessions of one user")
        self._open = opened
        self._done = self._from_table(table.filter(pa.array(~is_open)))

    def _from_table(self, table: pa.Table) -> _Sessions:
        asarray = self._backend.asarray

        def column(name: str, dtype: Any) -> Any:
            return asarray(table[name].to_numpy().astype(dtype, copy=False))

        agg = np.stack([table[name].to_numpy() for name in AGG_COLUMNS], axis=1)
        return _Sessions(
            column("user_id", np.int64),
            column("session_id", np.uint64),
            column("session_start", np.int64),
            column("session_end", np.int64),
            asarray(np.ascontiguousarray(agg.reshape(-1, len(AGG_COLUMNS)), dtype=np.int64)),
            asarray(self._pages.encode(_as_string_array(table["landing_page"]))),
            asarray(self._pages.encode(_as_string_array(table["exit_page"]))),
        )


# ---------------------------------------------------------------------- helpers


def _output_order(user: np.ndarray, start: np.ndarray, sid: np.ndarray) -> np.ndarray:
    """The permutation that sorts sessions by (user, start, session id).

    The state is almost in that order already: runs sorted by user, and per user the
    sessions in creation order, which is nearly always start order.  A stable sort by user
    (timsort, fast on runs) is therefore usually enough; a full three-key sort runs only
    when a later session of a user starts earlier than a previous one.
    """
    index = np.argsort(user, kind="stable")
    u, s, i = user[index], start[index], sid[index]
    same_user = u[1:] == u[:-1]
    out_of_order = same_user & ((s[1:] < s[:-1]) | ((s[1:] == s[:-1]) & (i[1:] < i[:-1])))
    if out_of_order.any():
        index = np.lexsort((sid, start, user))
    return index


def _merge_order(old_users: Any, new_users: Any, xp: Any) -> Any:
    """The order that merges two sorted, disjoint user arrays, as indices into their concat."""
    n_old, n_new = old_users.shape[0], new_users.shape[0]
    order = xp.empty(n_old + n_new, dtype=xp.int64)
    order[xp.arange(n_old) + xp.searchsorted(new_users, old_users)] = xp.arange(n_old)
    order[xp.arange(n_new) + xp.searchsorted(old_users, new_users)] = xp.arange(n_new) + n_old
    return order


def _page_codes(batch: Any, carried: Any, rows: Any, carry: Any, xp: Any) -> Any:
    """Per segment, the code of batch row ``rows[s]``, or the carried code when that is -1."""
    from_batch = rows >= 0
    fresh = batch[xp.where(from_batch, rows, 0)]
    if not carried.shape[0]:
        return fresh
    return xp.where(from_batch, fresh, carried[xp.where(from_batch, 0, carry)])


def _as_string_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One contiguous ``pa.string()`` array (nulls kept)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    return values


def _check_lengths(
    n: int, ts: Any, ids: DeviceStrings, event_type: Any, revenue: Any, pages: Any
) -> None:
    """Every input column must describe the same rows."""
    lengths = {
        "ts": int(ts.shape[0]),
        "ids": len(ids),
        "event_type": int(event_type.shape[0]),
        "revenue_micros": int(revenue.shape[0]),
        "pages": len(pages),
    }
    wrong = {name: length for name, length in lengths.items() if length != n}
    if wrong:
        raise ValueError(
            f"Sessionizer.apply: columns of different lengths: user_id has {n}, {wrong}"
        )
