// dedup.cu - the event-id hash set of the Dedup operator (SPEC §2.3).
//
// The persistent state is a set of *entries*, one per accepted event id: its 64-bit key
// (gp_hash_bytes of the id, masked), M = ts of its last accepted event, and the id's bytes
// in an arena (entry_offsets/arena, Arrow layout).  An open-addressing table of entry
// indices (-1 = empty, power-of-two capacity) finds an entry from a key; hash-equal keys
// are told apart by comparing the bytes, so a 64-bit collision never drops an event.
//
// One micro-batch is processed in three launches:
//   1. dedup_group_batch: every row finds-or-claims its id in a batch-local table of row
//      indices; the claiming row is the id's representative, and ids with several rows
//      are flagged (the host lists their rows in arrival order with a stable sort: they
//      are the few retries, so the sort is small);
//   2. dedup_resolve: one thread per id of the batch looks the id up in the persistent
//      table and walks the id's rows in arrival order, applying the TTL rule;
//   3. dedup_insert: new accepted ids (their bytes gathered by dedup_gather_bytes) enter
//      the persistent table.
// Every probe loop is bounded by the table capacity: a full table sets *error instead of
// spinning; the host keeps the load factor <= 0.5 so that this never happens.
#include "portable.cuh"

// Table slots hold (fingerprint << 32) | index, or -1 when empty: the 31-bit fingerprint
// (high bits of the mixed key; the slot comes from the low bits) lets a probe skip other
// ids without touching their rows, and one CAS publishes slot, fingerprint and index.
#define DEDUP_EMPTY (-1LL)
#define DEDUP_INDEX_MASK 0xFFFFFFFFLL
#define DEDUP_PREFETCH_DISTANCE 16

// On the CPU, software prefetch of a later row's slot overlaps the cache misses of the
// random probes (a hint only: results are the same with or without it).
#if defined(GP_TARGET_CPU)
#define DEDUP_PREFETCH(p) __builtin_prefetch((const void*)(p), 1, 1)
#else
#define DEDUP_PREFETCH(p) ((void)0)
#endif

DEVICE i64 dedup_slot_of(u64 mixed, i64 capacity) { return (i64)(mixed & (u64)(capacity - 1)); }

DEVICE i64 dedup_fingerprint(u64 mixed) { return (i64)((mixed >> 33) << 32); }

// Exactly `watermark < max_ts + ttl` for any int64 max_ts and ttl >= 0 (no overflow).
DEVICE bool dedup_before(i64 watermark, i64 max_ts, i64 ttl) {
    if (max_ts > 0 && ttl > GP_I64_MAX - max_ts) return true;
    return watermark < max_ts + ttl;
}

// An accepted id still matters: GP_I64_MIN (= -infinity) is below every limit.
DEVICE bool dedup_alive(i64 watermark, i64 max_ts, i64 ttl) {
    return watermark == GP_I64_MIN || dedup_before(watermark, max_ts, ttl);
}

// The entry holding the id (key, bytes), or -1.  Sets *error when no empty slot ends the
// probe sequence within `capacity` probes (a full table).
DEVICE i64 dedup_find(u64 key, const u8* bytes, i64 len, i64 capacity, const i64* table,
                      const i64* entry_offsets, const u8* arena, i32* error) {
    u64 mixed = gp_mix64(key);
    i64 slot = dedup_slot_of(mixed, capacity);
    i64 fingerprint = dedup_fingerprint(mixed);
    i64 found = -1;
    bool done = false;
    for (i64 probe = 0; probe < capacity; ++probe) {
        i64 value = table[slot];
        if (value == DEDUP_EMPTY) {
            done = true;
            break;
        }
        if ((value & ~DEDUP_INDEX_MASK) == fingerprint) {
            i64 entry = value & DEDUP_INDEX_MASK;
            i64 start = entry_offsets[entry];
            if (gp_bytes_equal(arena + start, entry_offsets[entry + 1] - start, bytes, len)) {
                found = entry;
                done = true;
                break;
            }
        }
        slot = (slot + 1) & (capacity - 1);
    }
    if (!done) atomic_store_i32(error, 1);
    return found;
}

// Group the rows of a batch by id.  slots (capacity entries, all -1 on entry) is a
// batch-local table of rows.  Out: rep[i] = the row that claimed row i's id (the id's
// representative, not always its first row); repeated[r] = 1 (zeroed by the caller) for
// each representative r whose id has several rows in the batch.
KERNEL void dedup_group_batch(i64 n, const u64* __restrict__ keys,
                              const i64* __restrict__ offsets, const u8* __restrict__ chars,
                              i64 capacity, i64* slots, i32* __restrict__ rep, i32* repeated,
                              i32* error) {
    PARALLEL_FOR(i, n) {
        if (i + DEDUP_PREFETCH_DISTANCE < n) {
            u64 ahead = gp_mix64(keys[i + DEDUP_PREFETCH_DISTANCE]);
            DEDUP_PREFETCH(slots + dedup_slot_of(ahead, capacity));
        }
        u64 mixed = gp_mix64(keys[i]);
        i64 fingerprint = dedup_fingerprint(mixed);
        i64 start = offsets[i];
        i64 len = offsets[i + 1] - start;
        i64 slot = dedup_slot_of(mixed, capacity);
        i64 owner = -1;
        for (i64 probe = 0; probe < capacity; ++probe) {
            i64 value = atomic_load_i64(slots + slot);
            if (value == DEDUP_EMPTY) {
                value = atomic_cas_i64(slots + slot, DEDUP_EMPTY, fingerprint | i);
                if (value == DEDUP_EMPTY) {
                    owner = i;
                    break;
                }
            }
            if ((value & ~DEDUP_INDEX_MASK) == fingerprint) {
                i64 other = value & DEDUP_INDEX_MASK;
                i64 other_start = offsets[other];
                if (gp_bytes_equal(chars + other_start, offsets[other + 1] - other_start,
                                   chars + start, len)) {
                    owner = other;
                    break;
                }
            }
            slot = (slot + 1) & (capacity - 1);
        }
        if (owner < 0) {
            atomic_store_i32(error, 1);
            owner = i;  // the host raises; keep every later write in bounds
        }
        rep[i] = (i32)owner;
        if (owner != i) atomic_store_i32(repeated + owner, 1);
    }
}

// Apply the TTL rule to every id of the batch, one thread per id (its representative r).
// A row is a duplicate iff its id has a live state M (ts of the id's last accepted event)
// and w < M + ttl; otherwise it is accepted and M becomes its ts (every earlier accepted
// event of the id then lies at or below the watermark minus ttl and can never matter
// again).  An id is live while expire_wm < M + ttl (expire_wm: the last expiry watermark).
// The rows of a repeated id are group_rows[group_start[r] ..] while their rep is r, in
// arrival order (group_start is read only for repeated ids; group_rows has m rows).
// Out: dup[i] (0/1 per row); entry_max updated in place for ids found in the table; for
// new ids with an accepted row, is_new[f] = 1 and new_max[f] = M at their first row f.
KERNEL void dedup_resolve(i64 n, const i32* __restrict__ rep, const i32* __restrict__ repeated,
                          const i64* __restrict__ group_start, i64 m,
                          const i64* __restrict__ group_rows, const u64* __restrict__ keys,
                          const i64* __restrict__ offsets, const u8* __restrict__ chars,
                          const i64* __restrict__ ts, const i64* __restrict__ w, i64 ttl,
                          i64 expire_wm, i64 capacity, const i64* __restrict__ table,
                          const i64* __restrict__ entry_offsets, const u8* __restrict__ arena,
                          i64* __restrict__ entry_max, u8* __restrict__ dup,
                          u8* __restrict__ is_new, i64* __restrict__ new_max, i32* error) {
    PARALLEL_FOR(r, n) {
        if (r + DEDUP_PREFETCH_DISTANCE < n) {
            u64 ahead = gp_mix64(keys[r + DEDUP_PREFETCH_DISTANCE]);
            DEDUP_PREFETCH(table + dedup_slot_of(ahead, capacity));
        }
        if (rep[r] != r) continue;
        i64 start = offsets[r];
        i64 entry = dedup_find(keys[r], chars + start, offsets[r + 1] - start, capacity, table,
                               entry_offsets, arena, error);
        bool has = entry >= 0;
        i64 max_ts = has ? entry_max[entry] : 0;
        bool changed = false;
        bool many = repeated[r] != 0;
        i64 k = many ? group_start[r] : 0;
        i64 first = many ? group_rows[k] : r;
        bool more = true;
        while (more) {
            i64 row = many ? group_rows[k] : r;
            bool live = has && dedup_alive(expire_wm, max_ts, ttl);
            bool duplicate = live && (w[row] == GP_I64_MIN || dedup_before(w[row], max_ts, ttl));
            dup[row] = duplicate ? 1 : 0;
            if (!duplicate) {
                max_ts = ts[row];
                has = true;
                changed = true;
            }
            k += 1;
            more = many && k < m && rep[group_rows[k]] == r;
        }
        if (changed && entry >= 0) {
            entry_max[entry] = max_ts;
        } else if (changed) {
            is_new[first] = 1;
            new_max[first] = max_ts;
        }
    }
}

// Copy string rows[i] of (src_offsets, src_chars) to dst_chars at dst_offsets[i]
// (dst_offsets computed by the host as a prefix sum of the lengths).
KERNEL void dedup_gather_bytes(i64 n, const i64* __restrict__ src_offsets,
                               const u8* __restrict__ src_chars, const i64* __restrict__ rows,
                               const i64* __restrict__ dst_offsets, u8* __restrict__ dst_chars) {
    PARALLEL_FOR(i, n) {
        i64 src = src_offsets[rows[i]];
        i64 len = src_offsets[rows[i] + 1] - src;
        i64 dst = dst_offsets[i];
        for (i64 k = 0; k < len; ++k) dst_chars[dst + k] = src_chars[src + k];
    }
}

// Insert entries first_entry .. first_entry + n - 1 (distinct ids, none already present)
// into the table.  Sets *error when a probe sequence finds no empty slot.
KERNEL void dedup_insert(i64 n, i64 first_entry, const u64* __restrict__ entry_keys,
                         i64 capacity, i64* table, i32* error) {
    PARALLEL_FOR(i, n) {
        if (i + DEDUP_PREFETCH_DISTANCE < n) {
            u64 ahead = gp_mix64(entry_keys[first_entry + i + DEDUP_PREFETCH_DISTANCE]);
            DEDUP_PREFETCH(table + dedup_slot_of(ahead, capacity));
        }
        i64 entry = first_entry + i;
        u64 mixed = gp_mix64(entry_keys[entry]);
        i64 value = dedup_fingerprint(mixed) | entry;
        i64 slot = dedup_slot_of(mixed, capacity);
        bool placed = false;
        for (i64 probe = 0; probe < capacity; ++probe) {
            if (atomic_load_i64(table + slot) == DEDUP_EMPTY &&
                atomic_cas_i64(table + slot, DEDUP_EMPTY, value) == DEDUP_EMPTY) {
                placed = true;
                break;
            }
            slot = (slot + 1) & (capacity - 1);
        }
        if (!placed) atomic_store_i32(error, 1);
    }
}
