// windows.cu - event-time window aggregation: a window hash table and an exact distinct-user set.
//
// Two open-addressing tables with the same layout (power-of-two capacity, linear probing):
//   * windows: key (window_start, key value) -> a row of WIN_NCOL int64 accumulators;
//   * users:   key (window slot, user_id), a set; the thread that inserts a pair counts it
//              in its window's WIN_USERS accumulator, so that column is always exactly the
//              number of pairs of that window in the set.
// A slot is claimed by CAS on its state word (EMPTY -> WRITING), its two key words are
// published, then the state becomes READY; a thread that meets a WRITING slot waits for
// READY before it compares the key, so equal keys never occupy two slots.
//
// A retired slot (WIN_RETIRED: its window expired) stays occupied and never matches, until
// the host rebuilds the table without it.
//
// Every probing kernel is idempotent (insert-if-absent) and works only on elements still
// PENDING, so the host can grow a table and launch again after an error without counting
// anything twice.  A kernel stops claiming once the table passes `max_size` entries
// (WIN_ERR_LOAD) or a probe sequence has visited every slot (WIN_ERR_FULL): it never spins
// on a full table.
#include "portable.cuh"

#define WIN_EMPTY 0
#define WIN_WRITING 1
#define WIN_READY 2
#define WIN_RETIRED 3

#define WIN_NONE (-1LL)
#define WIN_PENDING (-2LL)

#define WIN_ERR_LOAD 1
#define WIN_ERR_FULL 2

#define WIN_EVENTS 0
#define WIN_VIEWS 1
#define WIN_CARTS 2
#define WIN_PURCHASES 3
#define WIN_REVENUE 4
#define WIN_USERS 5
#define WIN_EARLY 6
#define WIN_LATE 7
#define WIN_DIRTY 8
#define WIN_NCOL 9

DEVICE u64 win_hash(i64 k0, i64 k1) {
    return gp_mix64(gp_mix64((u64)k0 ^ 0x9E3779B97F4A7C15ULL) ^ (u64)k1);
}

// Find or insert the key (k0, k1); return its slot, or WIN_PENDING when the table is full.
// `*inserted` becomes 1 when this call claimed the slot.
DEVICE i64 win_probe(i32* state, i64* keys, i64 cap, u64 hash, i64 k0, i64 k1, i64* size,
                     i64 max_size, i32* error, i32* inserted) {
    i64 mask = cap - 1;
    i64 idx = (i64)(hash & (u64)mask);
    for (i64 p = 0; p < cap; ++p) {
        i32 s = atomic_load_i32(&state[idx]);
        if (s == WIN_EMPTY) {
            s = atomic_cas_i32(&state[idx], WIN_EMPTY, WIN_WRITING);
            if (s == WIN_EMPTY) {
                keys[2 * idx] = k0;
                keys[2 * idx + 1] = k1;
                atomic_store_i32(&state[idx], WIN_READY);
                *inserted = 1;
                if (atomic_add_i64(size, 1) + 1 > max_size) atomic_or_i32(error, WIN_ERR_LOAD);
                return idx;
            }
        }
        if (s == WIN_WRITING) {
            while (s == WIN_WRITING) s = atomic_load_i32(&state[idx]);
            memory_fence();
        }
        if (s == WIN_READY && atomic_load_i64(&keys[2 * idx]) == k0 &&
            atomic_load_i64(&keys[2 * idx + 1]) == k1) {
            return idx;
        }
        idx = (idx + 1) & mask;
    }
    atomic_or_i32(error, WIN_ERR_FULL);
    return WIN_PENDING;
}

// For row i and each of its `wpe` windows j (start = floor(ts / slide) * slide - j * slide),
// slots[i * wpe + j] becomes the window's slot (inserted if new), or WIN_NONE when the row
// has no key.  Only PENDING entries are worked on; after an error the rest stay PENDING.
// (Called with slide = 1 and wpe = 1 it inserts explicit window starts: the host's rehash.)
KERNEL void win_find_windows(i64 n, const i64* __restrict__ ts, const i64* __restrict__ key,
                             const u8* __restrict__ has_key, i64 slide, i64 wpe, u64 hash_mask,
                             i64 cap, i32* state, i64* keys, i64* size, i64 max_size,
                             i64* __restrict__ slots, i32* error) {
    PARALLEL_FOR(i, n) {
        i64 last = gp_floor_div(ts[i], slide) * slide;
        for (i64 j = 0; j < wpe; ++j) {
            i64 e = i * wpe + j;
            if (slots[e] != WIN_PENDING) continue;
            if (!has_key[i]) {
                slots[e] = WIN_NONE;
                continue;
            }
            if (atomic_load_i32(error) != 0) break;
            i64 start = last - j * slide;
            i32 inserted = 0;
            slots[e] = win_probe(state, keys, cap, win_hash(start, key[i]) & hash_mask, start,
                                 key[i], size, max_size, error, &inserted);
        }
    }
}

// Adds row i to each of its windows' accumulators.  A row whose watermark w is below the
// window end arrived before the window was first written (EARLY); otherwise it is one more
// LATE arrival.  Every touched window becomes DIRTY (to be written again).
KERNEL void win_accumulate(i64 n, const i64* __restrict__ slots, const i64* __restrict__ w,
                           const i8* __restrict__ event_type,
                           const i64* __restrict__ revenue_micros, i64 wpe, i64 size_ms,
                           i32 code_view, i32 code_cart, i32 code_purchase,
                           const i64* __restrict__ keys, i64* acc) {
    PARALLEL_FOR(i, n) {
        i32 et = (i32)event_type[i];
        i64 revenue = revenue_micros[i];
        for (i64 j = 0; j < wpe; ++j) {
            i64 slot = slots[i * wpe + j];
            if (slot < 0) continue;
            i64* a = acc + slot * WIN_NCOL;
            atomic_add_i64(&a[WIN_EVENTS], 1);
            if (et == code_view) atomic_add_i64(&a[WIN_VIEWS], 1);
            if (et == code_cart) atomic_add_i64(&a[WIN_CARTS], 1);
            if (et == code_purchase) atomic_add_i64(&a[WIN_PURCHASES], 1);
            if (revenue != 0) atomic_add_i64(&a[WIN_REVENUE], revenue);
            if (w[i] < keys[2 * slot] + size_ms) {
                if (atomic_load_i64(&a[WIN_EARLY]) == 0) atomic_store_i64(&a[WIN_EARLY], 1);
            } else {
                atomic_add_i64(&a[WIN_LATE], 1);
            }
            if (atomic_load_i64(&a[WIN_DIRTY]) == 0) atomic_store_i64(&a[WIN_DIRTY], 1);
        }
    }
}

// Inserts the pair (window slot, user_id[i]) for every PENDING element of row i; a pair new
// to the set adds 1 to its window's WIN_USERS when `count` is set (0 when rebuilding).
KERNEL void win_insert_users(i64 n, const i64* __restrict__ slots,
                             const i64* __restrict__ user_id, i64 wpe, u64 hash_mask, i64 cap,
                             i32* state, i64* keys, i64* size, i64 max_size, i64* acc,
                             i32 count, u8* __restrict__ pending, i32* error) {
    PARALLEL_FOR(i, n) {
        i64 user = user_id[i];
        for (i64 j = 0; j < wpe; ++j) {
            i64 e = i * wpe + j;
            if (!pending[e]) continue;
            i64 slot = slots[e];
            if (slot < 0) {
                pending[e] = 0;
                continue;
            }
            if (atomic_load_i32(error) != 0) break;
            i32 inserted = 0;
            i64 found = win_probe(state, keys, cap, win_hash(slot, user) & hash_mask, slot, user,
                                  size, max_size, error, &inserted);
            if (found < 0) continue;
            pending[e] = 0;
            if (inserted && count) atomic_add_i64(&acc[slot * WIN_NCOL + WIN_USERS], 1);
        }
    }
}
