// Token embedding: lookup forward, scatter-add backward; and the row store the KV cache appends with.
//
//   forward:  out[n, :] = table[ids[n], :]                  (overwritten)
//   backward: dtable[ids[n], :] += dout[n, :]               (accumulated, f32, atomics: tokens that
//             repeat add in an unspecified order, so the low bits of dtable may differ between runs)
//   store:    dst[rows[n], :] = src[n, :]                   (every new key or value row of a decode
//             step into its sequence's cache slot in one launch; rows must be distinct), and with a
//             second pair, dst2[rows[n], :] = src2[n, :] in the same launch (a layer's keys and
//             values: blockIdx.y picks the pair)
//   sum:      out[u, :] = sum of src[list[j], :] over j in [offsets[u], offsets[u+1])   (overwritten;
//             summed in f32 in list order, so repeatable bit for bit: the adjoint of a gather whose
//             ids send each src row to one out row, as a shared prompt's rows copied into every
//             sequence that attends to it get their gradients back)
//
// Shapes: table [V, d] in T; ids [N] i32; out, dout [N, d] in T; dtable [V, d] f32. An id outside
// [0, V) writes NaN (forward) or is skipped (backward); the host checks ids on the CPU path.
#include "common.cuh"

// Copies row `from` of src to row `to` of dst ([*, d] each), 16 bytes at a time when both rows are
// aligned; fills the row with NaN when `from` is negative (an id out of range).
template <typename T>
__device__ __forceinline__ void copy_row(T* __restrict__ dst, const T* __restrict__ src, long long to, long long from,
                                         int d) {
    T* out = dst + to * d;
    const T* in = src + (from < 0 ? 0 : from * d);
    constexpr int N = Vec16<T>::N;
    if (from >= 0 && d % N == 0 && aligned16(out, in)) {
        for (int c = threadIdx.x * N; c < d; c += blockDim.x * N) {
            REQUIRE_ALIGNED(out + c, 16, "copy_row out");
            REQUIRE_ALIGNED(in + c, 16, "copy_row in");
            *reinterpret_cast<uint4*>(out + c) = __ldg(reinterpret_cast<const uint4*>(in + c));
        }
        return;
    }
    for (int c = threadIdx.x; c < d; c += blockDim.x) out[c] = from >= 0 ? in[c] : from_f32<T>(NAN);
}

template <typename T>
__device__ void embed_fwd(T* __restrict__ out, const T* __restrict__ table, const int* __restrict__ ids, int V,
                          int d) {
    const size_t row = blockIdx.x;
    const int id = ids[row];
    copy_row(out, table, (long long)row, id >= 0 && id < V ? (long long)id : -1, d);
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
__device__ void rows_store(T* __restrict__ dst, const T* __restrict__ src, T* __restrict__ dst2,
                           const T* __restrict__ src2, const int* __restrict__ rows, int R, int d) {
    const size_t row = blockIdx.x;
    const int to = rows[row];
    if (to < 0 || to >= R) return;
    if (blockIdx.y == 0)
        copy_row(dst, src, (long long)to, (long long)row, d);
    else
        copy_row(dst2, src2, (long long)to, (long long)row, d);
}

template <typename T>
__device__ void rows_sum(T* __restrict__ out, const T* __restrict__ src, const int* __restrict__ offsets,
                         const int* __restrict__ list, int R, int d) {
    const size_t row = blockIdx.x;
    const int j0 = offsets[row], j1 = offsets[row + 1];
    T* dst = out + row * d;
    constexpr int N = Vec16<T>::N;
    if (d % N == 0 && aligned16(dst, src)) {
        for (int c = threadIdx.x * N; c < d; c += blockDim.x * N) {
            float acc[N] = {};
            for (int j = j0; j < j1; ++j) {
                const int r = list[j];
                float v[N];
                load16(src + (size_t)(r >= 0 && r < R ? r : 0) * d + c, v);
#pragma unroll
                for (int i = 0; i < N; ++i) acc[i] += r >= 0 && r < R ? v[i] : NAN;
            }
            store16(dst + c, acc);
        }
        return;
    }
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = j0; j < j1; ++j) {
            const int r = list[j];
            acc += r >= 0 && r < R ? to_f32(src[(size_t)r * d + c]) : NAN;
        }
        dst[c] = from_f32<T>(acc);
    }
}

#define EMBED_INSTANTIATE(SUFFIX, T)                                                                       \
    extern "C" __global__ void embed_fwd_##SUFFIX(T* out, const T* table, const int* ids, int V, int d) { \
        embed_fwd<T>(out, table, ids, V, d);                                                               \
    }                                                                                                      \
    extern "C" __global__ void embed_bwd_##SUFFIX(float* dtable, const T* dout, const int* ids, int V,     \
                                                  int d) {                                                 \
        embed_bwd<T>(dtable, dout, ids, V, d);                                                             \
    }                                                                                                      \
    extern "C" __global__ void rows_store_##SUFFIX(T* dst, const T* src, T* dst2, const T* src2,          \
                                                   const int* rows, int R, int d) {                        \
        rows_store<T>(dst, src, dst2, src2, rows, R, d);                                                   \
    }                                                                                                      \
    extern "C" __global__ void rows_sum_##SUFFIX(T* out, const T* src, const int* offsets, const int* list, \
                                                 int R, int d) {                                           \
        rows_sum<T>(out, src, offsets, list, R, d);                                                        \
    }

EMBED_INSTANTIATE(f32, float)
EMBED_INSTANTIATE(bf16, bf16)
