// sessions.cu - gap-based sessionization (SPEC §2.5) as a sequential walk per user.
//
// The host groups one batch's on-time rows by user with a stable sort (so each group is in
// arrival order), gathers user/ts/event_type/revenue and the event-id hashes (hash_strings)
// into that sorted order (the walks then read memory sequentially) and finds, per group, the user's open session carried from
// earlier batches (`carry`, an index into the state arrays, or -1).  One thread walks one
// group: a row starts a new session when there is no open session or when its ts is more
// than `gap_ms` after the running max ts of the user's open session; otherwise it joins.
//
// Two launches: sess_count sizes the output (sessions touched per group), the host turns
// the counts into offsets with a prefix sum, and sess_walk writes the session id of every
// sorted row plus one aggregate record per session touched in this batch (carried state
// included).  Each thread writes only its own group's rows and segment slots: no atomics.
#include "portable.cuh"

#define SESS_AGG_WIDTH 6  // events, page_views, product_views, add_to_carts, purchases, revenue
#define SESS_PAGE_VIEW 0
#define SESS_PRODUCT_VIEW 1
#define SESS_ADD_TO_CART 3
#define SESS_PURCHASE 6

// True when an event at `ts` cannot join a session whose max ts is `end`.
DEVICE bool sess_breaks(i64 ts, i64 end, i64 gap_ms) { return ts - gap_ms > end; }

// out_nseg[g] = number of sessions group g touches in this batch (a carried session that
// the group continues counts once, like a new one).  ts is in sorted order.
KERNEL void sess_count(i64 n, const i64* __restrict__ group_start, const i64* __restrict__ ts,
                       const i64* __restrict__ carry, const i64* __restrict__ st_end, i64 gap_ms,
                       i64* __restrict__ out_nseg) {
    PARALLEL_FOR(g, n) {
        i64 c = carry[g];
        bool open = c >= 0;
        i64 end = open ? st_end[c] : 0;
        i64 count = 0;
        for (i64 p = group_start[g]; p < group_start[g + 1]; ++p) {
            i64 t = ts[p];
            if (!open || sess_breaks(t, end, gap_ms)) {
                ++count;
                open = true;
                end = t;
            } else {
                if (p == group_start[g]) ++count;  // first row continues the carried session
                if (t > end) end = t;
            }
        }
        out_nseg[g] = count;
    }
}

// Start the aggregate of a brand-new session at batch row r.
DEVICE void sess_begin(i64 r, i64 t, u64* sid, i64* start, i64* end, i64* agg, i64* min_row,
                       i64* max_row, i64 user, u64 id_hash) {
    *sid = gp_session_id(user, t, id_hash);
    *start = t;
    *end = t;
    *min_row = r;
    *max_row = r;
    for (i32 k = 0; k < SESS_AGG_WIDTH; ++k) agg[k] = 0;
}

// Add row r to the running aggregate.  Landing ties go to the earlier arrival (strict <),
// exit ties to the later arrival (>=): rows are walked in arrival order.
DEVICE void sess_add(i64 r, i64 t, i8 type, i64 revenue, i64* start, i64* end, i64* agg,
                     i64* min_row, i64* max_row) {
    if (t < *start) {
        *start = t;
        *min_row = r;
    }
    if (t >= *end) {
        *end = t;
        *max_row = r;
    }
    agg[0] += 1;
    agg[1] += type == SESS_PAGE_VIEW;
    agg[2] += type == SESS_PRODUCT_VIEW;
    agg[3] += type == SESS_ADD_TO_CART;
    agg[4] += type == SESS_PURCHASE;
    agg[5] = (i64)((u64)agg[5] + (u64)revenue);  // wraps instead of undefined overflow
}

// Write the running aggregate to segment slot s.
DEVICE void sess_emit(i64 s, i64 g, i64 from_carry, u64 sid, i64 start, i64 end, const i64* agg,
                      i64 min_row, i64 max_row, u64* seg_sid, i64* seg_carry, i64* seg_group,
                      i64* seg_start, i64* seg_end, i64* seg_agg, i64* seg_min_row,
                      i64* seg_max_row) {
    seg_sid[s] = sid;
    seg_carry[s] = from_carry;
    seg_group[s] = g;
    seg_start[s] = start;
    seg_end[s] = end;
    for (i32 k = 0; k < SESS_AGG_WIDTH; ++k) seg_agg[s * SESS_AGG_WIDTH + k] = agg[k];
    seg_min_row[s] = min_row;
    seg_max_row[s] = max_row;
}

// Per sorted row p: out_sid[p].  Per segment s in [seg_offset[g], seg_offset[g + 1]): the
// session's id, the carried state index it continues (or -1), its group, min/max ts, counts
// and revenue so far, and the batch rows holding the min/max ts (-1: still the carried
// event's).  user/ts/event_type/revenue_micros/id_hash are in sorted order; `order` maps a
// sorted position to its batch row, which is what the min/max rows report.
KERNEL void sess_walk(i64 n, const i64* __restrict__ group_start, const i64* __restrict__ order,
                      const i64* __restrict__ user, const i64* __restrict__ ts,
                      const i8* __restrict__ event_type, const i64* __restrict__ revenue_micros,
                      const u64* __restrict__ id_hash, const i64* __restrict__ carry,
                      const u64* __restrict__ st_sid, const i64* __restrict__ st_start,
                      const i64* __restrict__ st_end, const i64* __restrict__ st_agg, i64 gap_ms,
                      const i64* __restrict__ seg_offset, u64* __restrict__ out_sid,
                      u64* __restrict__ seg_sid, i64* __restrict__ seg_carry,
                      i64* __restrict__ seg_group, i64* __restrict__ seg_start,
                      i64* __restrict__ seg_end, i64* __restrict__ seg_agg,
                      i64* __restrict__ seg_min_row, i64* __restrict__ seg_max_row) {
    PARALLEL_FOR(g, n) {
        i64 c = carry[g];
        bool open = c >= 0;
        i64 from_carry = c;
        u64 sid = 0;
        i64 start = 0, end = 0, min_row = -1, max_row = -1;
        i64 agg[SESS_AGG_WIDTH];
        if (open) {
            sid = st_sid[c];
            start = st_start[c];
            end = st_end[c];
            for (i32 k = 0; k < SESS_AGG_WIDTH; ++k) agg[k] = st_agg[c * SESS_AGG_WIDTH + k];
        }
        i64 s = seg_offset[g];
        bool pending = false;  // the running session has rows of this batch not yet emitted
        for (i64 p = group_start[g]; p < group_start[g + 1]; ++p) {
            i64 r = order[p];
            i64 t = ts[p];
            if (!open || sess_breaks(t, end, gap_ms)) {
                if (pending) {
                    sess_emit(s, g, from_carry, sid, start, end, agg, min_row, max_row, seg_sid,
                              seg_carry, seg_group, seg_start, seg_end, seg_agg, seg_min_row,
                              seg_max_row);
                    ++s;
                }
                sess_begin(r, t, &sid, &start, &end, agg, &min_row, &max_row, user[p],
                           id_hash[p]);
                open = true;
                from_carry = -1;
            }
            sess_add(r, t, event_type[p], revenue_micros[p], &start, &end, agg, &min_row,
                     &max_row);
            pending = true;
            out_sid[p] = sid;
        }
        if (pending) {
            sess_emit(s, g, from_carry, sid, start, end, agg, min_row, max_row, seg_sid, seg_carry,
                      seg_group, seg_start, seg_end, seg_agg, seg_min_row, seg_max_row);
        }
    }
}
