// A deliberately racy kernel and its correct twin: proves the race detector sees races.
#include "portable.cuh"

KERNEL void racy_count(i64 n, i64* counter) {
    PARALLEL_FOR(i, n) { counter[0] = counter[0] + 1; }
}

KERNEL void atomic_count(i64 n, i64* counter) {
    PARALLEL_FOR(i, n) { atomic_add_i64(counter, 1); }
}
