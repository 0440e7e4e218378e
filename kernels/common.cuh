// Shared device helpers: bf16/f32 load-store, warp and block reductions, fast exponentials, the
// elementwise kernels' grid-stride walk.
//
// Every kernel family includes this header. Kernels are `extern "C"` so the host looks them up by
// plain name; templates are instantiated per dtype with a `_f32` / `_bf16` suffix.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>
#include <string.h>

typedef __nv_bfloat16 bf16;

// A kernel's dynamic shared memory as `name`, a T array. (tests/host/emulation.h, which runs the
// kernels on the CPU, gives each block its own.)
#ifdef RLHF_EMULATION
#define DYNAMIC_SMEM(T, name) T* const name = reinterpret_cast<T*>(::emu::dynamic_smem())
#else
#define DYNAMIC_SMEM(T, name) extern __shared__ __align__(16) T name[]
#endif

// Helpers marked __host__ as well also compile for the CPU: scripts/kernel-host-check runs the
// kernels' per-thread arithmetic there against double-precision loops.
__host__ __device__ __forceinline__ float to_f32(float x) { return x; }
__host__ __device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __host__ __device__ __forceinline__ T from_f32(float x);
template <> __host__ __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __host__ __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// x * y rounded, never contracted into an FMA with what follows (see logprob.cu).
__host__ __device__ __forceinline__ float mul_rn(float x, float y) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(x, y);
#else
    return x * y;
#endif
}

// e^x on the special-function unit with results under 2^-126 flushed to zero: two instructions.
// __expf keeps subnormal results, at the cost of a compare and two predicated multiplies around
// every call; a probability under 1e-38 is zero to every consumer here.
__host__ __device__ __forceinline__ float exp_ftz(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
    return y;
#else
    return expf(x);
#endif
}

// 2^x the same way (scores kept in log2 units need no multiply).
__host__ __device__ __forceinline__ float exp2_ftz(float x) {
#ifdef __CUDA_ARCH__
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
#else
    return exp2f(x);
#endif
}

// e^d is exactly 0 in f32 below this, so clamping d here changes no finite result; it keeps a masked
// (-inf) entry's e * d at 0 * finite = 0 instead of 0 * -inf = NaN.
constexpr float kExpUnderflow = -1.0e4f;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds one float per warp.
// The leading barrier lets callers reuse `scratch` for consecutive reductions.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(total);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(total);
}

// Under the emulator (tests/host/emulation.h), a vector access at an address the GPU would trap on
// fails the test instead of reading as host code would.
#ifdef RLHF_EMULATION
#define REQUIRE_ALIGNED(p, bytes, what) emu::require_global_aligned(p, bytes, what)
#else
#define REQUIRE_ALIGNED(p, bytes, what) ((void)0)
#endif

// 16-byte vector access: 8 bf16 or 4 f32 per load. The pointer must be 16-byte aligned, which holds
// for every row of a [rows, cols] buffer from cuMemAlloc when cols is a multiple of the vector width.
template <typename T> struct Vec16 {
    static constexpr int N = 16 / sizeof(T);
};

template <typename T>
__host__ __device__ __forceinline__ void load16(const T* p, float* out) {
#ifdef __CUDA_ARCH__
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* v = reinterpret_cast<const T*>(&raw);
#else
    T v[Vec16<T>::N];  // the host compiler may assume a float is never read through a uint4
    REQUIRE_ALIGNED(p, 16, "load16");
    memcpy(v, p, 16);
#endif
#pragma unroll
    for (int i = 0; i < Vec16<T>::N; ++i) out[i] = to_f32(v[i]);
}

// load16 in two halves: the raw 16 bytes, then their values. A kernel issues the first well before
// it needs the values (the next tile's loads in flight under this tile's arithmetic) and holds 4
// registers a vector meanwhile instead of one per value.
template <typename T>
__host__ __device__ __forceinline__ uint4 fetch16(const T* p) {
#ifdef __CUDA_ARCH__
    return __ldg(reinterpret_cast<const uint4*>(p));
#else
    uint4 raw;
    REQUIRE_ALIGNED(p, 16, "fetch16");
    memcpy(&raw, p, 16);
    return raw;
#endif
}

template <typename T>
__host__ __device__ __forceinline__ void unpack16(const uint4& raw, float* out) {
#ifdef __CUDA_ARCH__
    const T* v = reinterpret_cast<const T*>(&raw);
#else
    T v[Vec16<T>::N];
    memcpy(v, &raw, 16);
#endif
#pragma unroll
    for (int i = 0; i < Vec16<T>::N; ++i) out[i] = to_f32(v[i]);
}

// As load16, through the coherent path: for buffers the same kernel also writes (an in-place add),
// which the read-only cache must not serve.
template <typename T>
__device__ __forceinline__ void load16_coherent(const T* p, float* out) {
    REQUIRE_ALIGNED(p, 16, "load16_coherent");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < Vec16<T>::N; ++i) out[i] = to_f32(v[i]);
}

template <typename T>
__host__ __device__ __forceinline__ void store16(T* p, const float* in) {
#ifdef __CUDA_ARCH__
    uint4 raw;
    T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < Vec16<T>::N; ++i) v[i] = from_f32<T>(in[i]);
    *reinterpret_cast<uint4*>(p) = raw;
#else
    T v[Vec16<T>::N];
    for (int i = 0; i < Vec16<T>::N; ++i) v[i] = from_f32<T>(in[i]);
    REQUIRE_ALIGNED(p, 16, "store16");
    memcpy(p, v, 16);
#endif
}

// True when every pointer is 16-byte aligned, so a kernel may take its vector path. Buffers from the
// allocator always are; the check keeps a kernel correct for any other caller.
__device__ __forceinline__ bool aligned16(const void* a, const void* b = nullptr, const void* c = nullptr,
                                          const void* d = nullptr, const void* e = nullptr) {
    const uintptr_t bits = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b) |
                           reinterpret_cast<uintptr_t>(c) | reinterpret_cast<uintptr_t>(d) |
                           reinterpret_cast<uintptr_t>(e);
    return (bits & 15) == 0;
}

// A grid-stride walk over n elements: with `vec`, vec_body(i) for every i = 0, N, 2N, ... with i + N <= n
// (16-byte accesses when N elements fill 16 bytes), then one_body(i) for the n % N left; without it,
// one_body(i) for every i. The elementwise kernels share it.
template <int N, typename VecBody, typename OneBody>
__device__ __forceinline__ void grid_stride_vec(size_t n, bool vec, VecBody vec_body, OneBody one_body) {
    const size_t stride = (size_t)gridDim.x * blockDim.x, first = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    size_t done = 0;
    if (vec) {
        for (size_t i = first * N; i + N <= n; i += stride * N) vec_body(i);
        done = n / N * N;
    }
    for (size_t i = done + first; i < n; i += stride) one_body(i);
}

// N values converted to T and written with one store of N * sizeof(T) bytes, which must be aligned to
// that size (8 bytes for four bf16).
template <typename T, int N> struct alignas(N * sizeof(T)) PackN {
    T v[N];
};

template <typename T, int N>
__host__ __device__ __forceinline__ void store_n(T* p, const float* in) {
    PackN<T, N> pack;
#pragma unroll
    for (int i = 0; i < N; ++i) pack.v[i] = from_f32<T>(in[i]);
#ifdef __CUDA_ARCH__
    *reinterpret_cast<PackN<T, N>*>(p) = pack;
#else
    REQUIRE_ALIGNED(p, sizeof(pack), "store_n");
    memcpy(p, &pack, sizeof(pack));
#endif
}

// Numerically stable log-sigmoid and friends, safe for |x| in the thousands.
__device__ __forceinline__ float softplus(float x) { return x > 0.0f ? x + log1pf(expf(-x)) : log1pf(expf(x)); }
__device__ __forceinline__ float log_sigmoid(float x) { return -softplus(-x); }
__device__ __forceinline__ float sigmoid(float x) {
    return x >= 0.0f ? 1.0f / (1.0f + expf(-x)) : expf(x) / (1.0f + expf(x));
}
