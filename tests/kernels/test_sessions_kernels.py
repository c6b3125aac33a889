"""sess_count / sess_walk against a plain Python walk of the sorted groups."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_pipeline.backend.base import Backend
from gpu_pipeline.hashing import hash_bytes, session_id

WIDTH = 6  # events, page_views, product_views, add_to_carts, purchases, revenue micros
GAP = 10


def python_walk(
    users: list[int],
    ts: list[int],
    types: list[int],
    revenue: list[int],
    ids: list[str],
    state: dict[int, dict[str, Any]],
) -> tuple[list[int], list[dict[str, Any]]]:
    """Session id per row and one record per touched session, groups in ascending user order."""
    sids = [0] * len(users)
    segments: list[dict[str, Any]] = []
    for user in sorted(set(users)):
        carried = state.get(user)
        cur = dict(carried, min_row=-1, max_row=-1) if carried else None
        touched = False  # whether `cur` holds rows of this batch
        for r in (r for r in range(len(users)) if users[r] == user):
            t = ts[r]
            if cur is None or t > cur["end"] + GAP:
                if cur is not None and touched:
                    segments.append(cur)
                cur = {
                    "sid": session_id(user, t, ids[r]), "carry": -1, "start": t, "end": t,
                    "agg": [0] * WIDTH, "min_row": r, "max_row": r, "user": user,
                }  # fmt: skip
            if t < cur["start"]:
                cur["start"], cur["min_row"] = t, r
            if t >= cur["end"]:
                cur["end"], cur["max_row"] = t, r
            code = types[r]
            agg = cur["agg"] = list(cur["agg"])
            for k, hit in enumerate((True, code == 0, code == 1, code == 3, code == 6)):
                agg[k] += int(hit)
            agg[5] += revenue[r]
            touched = True
            sids[r] = cur["sid"]
        assert cur is not None  # every group has a row
        segments.append(cur)
    return sids, segments


def run_kernels(
    backend: Backend,
    users: list[int],
    ts: list[int],
    types: list[int],
    revenue: list[int],
    ids: list[str],
    state: dict[int, dict[str, Any]],
) -> tuple[list[int], list[dict[str, Any]]]:
    """Group on the host like the operator does, then launch both kernels."""
    xp, asarray, host = backend.xp, backend.asarray, backend.to_host
    n = len(users)
    user = np.array(users, dtype=np.int64)
    order = np.argsort(user, kind="stable").astype(np.int64)
    sorted_users = user[order]
    heads = np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1 if n else np.zeros(0)
    group_start = np.concatenate([[0], heads, [n]]).astype(np.int64) if n else np.zeros(1, np.int64)
    groups = len(group_start) - 1
    state_users = sorted(state)
    carry = np.array(
        [
            state_users.index(u) if u in state else -1
            for u in (sorted_users[group_start[:-1]] if n else [])
        ],
        dtype=np.int64,
    )
    st_sid = np.array([state[u]["sid"] for u in state_users], dtype=np.uint64)
    st_start = np.array([state[u]["start"] for u in state_users], dtype=np.int64)
    st_end = np.array([state[u]["end"] for u in state_users], dtype=np.int64)
    st_agg = np.array([state[u]["agg"] for u in state_users], dtype=np.int64).reshape(-1, WIDTH)
    id_hash = np.array([hash_bytes(i.encode()) for i in ids], dtype=np.uint64)
    d_group_start, d_order, d_user = asarray(group_start), asarray(order), asarray(sorted_users)
    d_ts, d_carry = asarray(np.array(ts, dtype=np.int64)[order]), asarray(carry)
    nseg = xp.zeros(groups, dtype=xp.int64)
    backend.kernels.sess_count(groups, d_group_start, d_ts, d_carry, asarray(st_end), GAP, nseg)
    offset = np.concatenate([[0], np.cumsum(host(nseg))]).astype(np.int64)
    total = int(offset[-1])
    out_sid = xp.zeros(n, dtype=xp.uint64)
    seg_sid = xp.zeros(total, dtype=xp.uint64)
    seg = {name: xp.zeros(total, dtype=xp.int64) for name in
           ("carry", "group", "start", "end", "min_row", "max_row")}  # fmt: skip
    seg_agg = xp.zeros((total, WIDTH), dtype=xp.int64)
    backend.kernels.sess_walk(
        groups, d_group_start, d_order, d_user, d_ts,
        asarray(np.array(types, dtype=np.int8)[order]),
        asarray(np.array(revenue, dtype=np.int64)[order]),
        asarray(id_hash[order]), d_carry, asarray(st_sid), asarray(st_start),
        asarray(st_end), asarray(np.ascontiguousarray(st_agg)), GAP, asarray(offset), out_sid,
        seg_sid, seg["carry"], seg["group"], seg["start"], seg["end"], seg_agg,
        seg["min_row"], seg["max_row"],
    )  # fmt: skip
    host_seg = {name: host(arr).tolist() for name, arr in seg.items()}
    group_users = sorted_users[group_start[:-1]].tolist() if n else []
    segments = [
        {
            "sid": int(host(seg_sid)[s]),
            "carry": host_seg["carry"][s],
            "start": host_seg["start"][s],
            "end": host_seg["end"][s],
            "agg": host(seg_agg)[s].tolist(),
            "min_row": host_seg["min_row"][s],
            "max_row": host_seg["max_row"][s],
            "user": group_users[host_seg["group"][s]],
        }
        for s in range(total)
    ]
    sids = np.zeros(n, dtype=np.uint64)
    sids[order] = host(out_sid)  # the walk writes ids in sorted order
    return [int(v) for v in sids], segments


rows_strategy = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 60), st.integers(0, 7), st.integers(0, 10**6)),
    max_size=60,
)
state_strategy = st.dictionaries(
    st.integers(0, 6),
    st.tuples(
        st.integers(0, 30), st.integers(0, 30), st.lists(st.integers(0, 9), min_size=6, max_size=6)
    ),
    max_size=5,
)


def _state(raw: dict[int, tuple[int, int, list[int]]]) -> dict[int, dict[str, Any]]:
    """Carried open sessions, indexed like the operator's user-sorted state."""
    users = sorted(raw)
    return {
        u: {"sid": session_id(u, a, f"s{u}"), "carry": users.index(u), "start": min(a, b),
            "end": max(a, b), "agg": agg, "user": u}
        for u, (a, b, agg) in raw.items()
    }  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(rows_strategy, state_strategy)
def test_walk_matches_python(
    backend: Backend, rows: list[tuple[int, int, int, int]], raw_state: Any
) -> None:
    users = [r[0] for r in rows]
    ts = [r[1] for r in rows]
    types = [r[2] for r in rows]  # 7 is no known type: counted in events only
    revenue = [r[3] for r in rows]
    ids = [f"id{k}é" for k in range(len(rows))]
    state = _state(raw_state)
    assert run_kernels(backend, users, ts, types, revenue, ids, state) == python_walk(
        users, ts, types, revenue, ids, state
    )


def test_empty_input(backend: Backend) -> None:
    assert run_kernels(backend, [], [], [], [], [], {}) == ([], [])


def test_one_row_new_and_carried(backend: Backend) -> None:
    sids, segs = run_kernels(backend, [3], [7], [6], [5], ["x"], {})
    assert sids == [session_id(3, 7, "x")]
    assert segs[0]["agg"] == [1, 0, 0, 0, 1, 5] and segs[0]["carry"] == -1
    state = _state({3: (1, 2, [1, 1, 0, 0, 0, 0])})
    sids, segs = run_kernels(backend, [3], [2], [0], [0], ["x"], state)
    assert sids == [state[3]["sid"]]
    assert segs == [dict(state[3], agg=[2, 2, 0, 0, 0, 0], min_row=-1, max_row=0)]


def test_all_rows_one_user_many_sessions(backend: Backend) -> None:
    n = 5_000
    ts = [k * 7 if k % 4 else k * 7 + 100 for k in range(n)]  # gaps both below and above G
    ids = [str(k) for k in range(n)]
    args = ([9] * n, ts, [k % 7 for k in range(n)], [k for k in range(n)], ids)
    assert run_kernels(backend, *args, {}) == python_walk(*args, {})
