// hash.cu - 64-bit hashes of Arrow string columns and session ids.
#include "portable.cuh"

// out[i] = gp_hash_bytes(chars[offsets[i] .. offsets[i+1])) & mask
// (mask is all ones in production; tests narrow it to force collisions).
KERNEL void hash_strings(i64 n, const i64* __restrict__ offsets, const u8* __restrict__ chars,
                         u64 mask, u64* __restrict__ out) {
    PARALLEL_FOR(i, n) {
        i64 start = offsets[i];
        out[i] = gp_hash_bytes(chars + start, offsets[i + 1] - start) & mask;
    }
}
