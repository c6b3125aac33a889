// portable.cuh - one kernel source, two targets.
//
// Every kernel in kernels/*.cu is written once against this header.  Compiled by NVRTC
// (CuPy RawModule) it is CUDA: PARALLEL_FOR is a grid-stride loop and the atomics are
// CUDA atomics.  Compiled as C++ (g++/clang++ -fopenmp -x c++) it is a shared library:
// PARALLEL_FOR is an OpenMP loop and the atomics are GCC __atomic builtins.
//
// Rules for kernels written against it (so that both targets stay equivalent):
//   * per-element work only; threads communicate through global atomics;
//   * no shared memory, __syncthreads, warp intrinsics or cooperative groups;
//     a grid-wide barrier is a second kernel launch;
//   * no `return`/`break` out of a PARALLEL_FOR body (use `continue`);
//   * the first parameter of every KERNEL is `i64 n`, the number of loop iterations
//     (the launcher sizes the grid from it);
//   * no standard headers (NVRTC has none): use the typedefs below.

#ifndef GPU_PIPELINE_PORTABLE_CUH
#define GPU_PIPELINE_PORTABLE_CUH

typedef signed char i8;
typedef unsigned char u8;
typedef int i32;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;
typedef double f64;

#define GP_I64_MIN (-9223372036854775807LL - 1LL)
#define GP_I64_MAX 9223372036854775807LL

#if defined(__CUDACC__)

#define GP_TARGET_GPU 1
#define KERNEL extern "C" __global__
#define DEVICE static __device__ __forceinline__
#define PARALLEL_FOR(i, n)                                                   \
    for (i64 i = (i64)blockIdx.x * (i64)blockDim.x + (i64)threadIdx.x;       \
         i < (i64)(n); i += (i64)blockDim.x * (i64)gridDim.x)

DEVICE i32 atomic_load_i32(const i32* p) { return *((volatile const i32*)p); }
DEVICE i64 atomic_load_i64(const i64* p) { return *((volatile const i64*)p); }
DEVICE u64 atomic_load_u64(const u64* p) { return *((volatile const u64*)p); }
DEVICE void atomic_store_i32(i32* p, i32 v) { __threadfence(); atomicExch(p, v); }
DEVICE void atomic_store_i64(i64* p, i64 v) { atomicExch((u64*)p, (u64)v); }
DEVICE i32 atomic_cas_i32(i32* p, i32 expected, i32 desired) { return atomicCAS(p, expected, desired); }
DEVICE u64 atomic_cas_u64(u64* p, u64 expected, u64 desired) { return atomicCAS(p, expected, desired); }
DEVICE i64 atomic_cas_i64(i64* p, i64 expected, i64 desired) {
    return (i64)atomicCAS((u64*)p, (u64)expected, (u64)desired);
}
DEVICE i32 atomic_add_i32(i32* p, i32 v) { return atomicAdd(p, v); }
DEVICE i64 atomic_add_i64(i64* p, i64 v) { return (i64)atomicAdd((u64*)p, (u64)v); }
DEVICE i64 atomic_max_i64(i64* p, i64 v) { return atomicMax(p, v); }
DEVICE i64 atomic_min_i64(i64* p, i64 v) { return atomicMin(p, v); }
DEVICE i32 atomic_max_i32(i32* p, i32 v) { return atomicMax(p, v); }
DEVICE i32 atomic_min_i32(i32* p, i32 v) { return atomicMin(p, v); }
DEVICE i32 atomic_or_i32(i32* p, i32 v) { return atomicOr(p, v); }
DEVICE void memory_fence() { __threadfence(); }

#else  // C++ / OpenMP target

#define GP_TARGET_CPU 1
#define KERNEL extern "C"
#define DEVICE static inline
#define __restrict__ __restrict
#define GP_PRAGMA(x) _Pragma(#x)
#define PARALLEL_FOR(i, n) GP_PRAGMA(omp parallel for if ((n) >= 4096) schedule(static)) \
    for (i64 i = 0; i < (i64)(n); ++i)

DEVICE i32 atomic_load_i32(const i32* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
DEVICE i64 atomic_load_i64(const i64* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
DEVICE u64 atomic_load_u64(const u64* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
DEVICE void atomic_store_i32(i32* p, i32 v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
DEVICE void atomic_store_i64(i64* p, i64 v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
DEVICE i32 atomic_cas_i32(i32* p, i32 expected, i32 desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    return expected;
}
DEVICE u64 atomic_cas_u64(u64* p, u64 expected, u64 desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    return expected;
}
DEVICE i64 atomic_cas_i64(i64* p, i64 expected, i64 desired) {
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    return expected;
}
DEVICE i32 atomic_add_i32(i32* p, i32 v) { return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }
DEVICE i64 atomic_add_i64(i64* p, i64 v) { return __atomic_fetch_add(p, v, __ATOMIC_ACQ_REL); }
DEVICE i64 atomic_max_i64(i64* p, i64 v) {
    i64 old = __atomic_load_n(p, __ATOMIC_ACQUIRE);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {}
    return old;
}
DEVICE i64 atomic_min_i64(i64* p, i64 v) {
    i64 old = __atomic_load_n(p, __ATOMIC_ACQUIRE);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {}
    return old;
}
DEVICE i32 atomic_max_i32(i32* p, i32 v) {
    i32 old = __atomic_load_n(p, __ATOMIC_ACQUIRE);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {}
    return old;
}
DEVICE i32 atomic_min_i32(i32* p, i32 v) {
    i32 old = __atomic_load_n(p, __ATOMIC_ACQUIRE);
    while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {}
    return old;
}
DEVICE i32 atomic_or_i32(i32* p, i32 v) { return __atomic_fetch_or(p, v, __ATOMIC_ACQ_REL); }
DEVICE void memory_fence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

#endif

// ---------------------------------------------------------------------------
// Hashing shared by every kernel family (gpu_pipeline/hashing.py is the spec).
// ---------------------------------------------------------------------------

DEVICE u64 gp_mix64(u64 x) {
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

DEVICE u64 gp_hash_bytes(const u8* data, i64 len) {
    u64 h = 0xCBF29CE484222325ULL;
    for (i64 k = 0; k < len; ++k) {
        h = (h ^ (u64)data[k]) * 0x100000001B3ULL;
    }
    return gp_mix64(h);
}

DEVICE u64 gp_session_id(i64 user_id, i64 first_ts_ms, u64 first_id_hash) {
    u64 h = gp_mix64((u64)user_id ^ 0x9E3779B97F4A7C15ULL);
    h = gp_mix64(h ^ (u64)first_ts_ms);
    return gp_mix64(h ^ first_id_hash);
}

DEVICE bool gp_bytes_equal(const u8* a, i64 alen, const u8* b, i64 blen) {
    if (alen != blen) return false;
    for (i64 k = 0; k < alen; ++k) {
        if (a[k] != b[k]) return false;
    }
    return true;
}

// Floor division and modulo for event-time window alignment (ts may be any int64).
DEVICE i64 gp_floor_div(i64 a, i64 b) {
    i64 q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) q -= 1;
    return q;
}

#endif  // GPU_PIPELINE_PORTABLE_CUH
