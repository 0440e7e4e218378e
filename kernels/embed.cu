// Token embedding: lookup forward, scatter-add backward; and the row store the KV cache appends with.
//
//   forward:  out[n, :] = table[ids[n], :]                  (overwritten)
//   backward: dtable[ids[n], :] += dout[n, :]               (accumulated, f32, atomics: tokens that
//             repeat add in an unspecified order, so the low bits of dtable may differ between runs)
//   store:    dst[rows[n], :] = src[n, :]                   (every new key or value row of a decode
//             step into its sequence's cache slot in one launch; rows must be distinct)
//
// Shapes: table [V, d] in T; ids [N] i32; out, dout [N, d] in T; dtable [V, d] f32. An id outside
// [0, V) writes NaN (forward) or is skipped (backward); the host checks ids on the CPU path.
#include "common.cuh"

template <typename T>
__device__ void embed_fwd(T* __restrict__ out, const T* __restrict__ table, const int* __restrict__ ids, int V,
                          int d) {
    const size_t row = blockIdx.x;
    const int id = ids[row];
    const bool ok = id >= 0 && id < V;
    for (int c = threadIdx.x; c < d; c += blockDim.x)
        out[row * d + c] = ok ? table[(size_t)id * d + c] : from_f32<T>(NAN);
}

template <typename T>
__device__ void embed_bwd(float* __restrict__ dtable, const T* __restrict__ dout, const int* __restrict__ ids, int V,
                          int d) {
    const size_t row = blockIdx.x;
    const int id = ids[row];
    if (id < 0 || id >= V) return;
    for (int c = threadIdx.x; c < d; c += blockDim.x) atomicAdd(&dtable[(size_t)id * d + c], to_f32(dout[row * d + c]));
}

template <typename T>
__device__ void rows_store(T* __restrict__ dst, const T* __restrict__ src, const int* __restrict__ rows, int R,
                           int d) {
    const size_t row = blockIdx.x;
    const int to = rows[row];
    if (to < 0 || to >= R) return;
    for (int c = threadIdx.x; c < d; c += blockDim.x) dst[(size_t)to * d + c] = src[row * d + c];
}

#define EMBED_INSTANTIATE(SUFFIX, T)                                                                       \
    extern "C" __global__ void embed_fwd_##SUFFIX(T* out, const T* table, const int* ids, int V, int d) { \
        embed_fwd<T>(out, table, ids, V, d);                                                               \
    }                                                                                                      \
    extern "C" __global__ void embed_bwd_##SUFFIX(float* dtable, const T* dout, const int* ids, int V,     \
                                                  int d) {                                                 \
        embed_bwd<T>(dtable, dout, ids, V, d);                                                             \
    }                                                                                                      \
    extern "C" __global__ void rows_store_##SUFFIX(T* dst, const T* src, const int* rows, int R, int d) { \
        rows_store<T>(dst, src, rows, R, d);                                                               \
    }

EMBED_INSTANTIATE(f32, float)
EMBED_INSTANTIATE(bf16, bf16)
