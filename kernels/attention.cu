// Causal self-attention with grouped-query heads over packed variable-length sequences.
//
// This is the simple, correct version the transformer runs on until the flash-style kernels land: it
// never stores the score matrix (keys are processed in chunks of ATTN_CHUNK with an online softmax),
// but it computes dot products with one thread per key and no tensor cores.
//
// Layout: q [Nq, H*D], k and v [*, KV*D] (packed rows, or a KV cache with room per sequence), out
// [Nq, H*D], lse [Nq, H] f32 (natural-log logsumexp of the scaled scores). Sequence b owns query rows
// cu_q[b] .. cu_q[b+1] and key rows k_start[b] .. k_start[b] + k_len[b]; query head h reads kv head
// h / (H / KV). Causal, aligned bottom-right: local query iq sees local keys j <= k_len - len_q + iq
// (so training, where len_q = k_len, is the usual triangle, and decoding one token sees the cache).
//
// Backward (recompute; D_i = rowsum(dO_i * O_i) first):
//   p_ij = exp(s_ij - lse_i),  ds_ij = p_ij (dO_i . v_j - D_i)
//   dq_i = scale sum_j ds_ij k_j      (one block per query row and head)
//   dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij dO_i   (one block per key row and kv head)
// Every output is written by exactly one block: no atomics, bitwise deterministic.
#include "common.cuh"

#define ATTN_CHUNK 1024

struct SeqMap {
    int b, iq, len_q, k0, n_keys;
};

// The sequence of query row `row` (binary search in cu_q) and its causal key range.
__device__ __forceinline__ SeqMap seq_of(const int* cu_q, const int* k_start, const int* k_len, int B, int row) {
    int lo = 0, hi = B - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (cu_q[mid] <= row) lo = mid;
        else hi = mid - 1;
    }
    SeqMap s;
    s.b = lo;
    s.iq = row - cu_q[lo];
    s.len_q = cu_q[lo + 1] - cu_q[lo];
    s.k0 = k_start[lo];
    s.n_keys = min(k_len[lo], k_len[lo] - s.len_q + s.iq + 1);
    return s;
}

template <typename T>
__device__ __forceinline__ float dot_row(const float* a_smem, const T* b, int D) {
    float s = 0.0f;
    for (int d = 0; d < D; ++d) s += a_smem[d] * to_f32(b[d]);
    return s;
}

template <typename T>
__device__ void attention_fwd(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ q,
                              const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ cu_q,
                              const int* __restrict__ k_start, const int* __restrict__ k_len, int B, int H, int KV,
                              int D, float scale) {
    __shared__ float s[ATTN_CHUNK];
    __shared__ float scratch[32];
    extern __shared__ float qs[];  // [D]
    const int row = blockIdx.x, h = blockIdx.y, g = h / (H / KV);
    const SeqMap m = seq_of(cu_q, k_start, k_len, B, row);
    const T* qr = q + ((size_t)row * H + h) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = to_f32(qr[d]);
    __syncthreads();
    float run_max = -INFINITY, run_sum = 0.0f, acc = 0.0f;
    for (int c0 = 0; c0 < m.n_keys; c0 += ATTN_CHUNK) {
        const int n = min(ATTN_CHUNK, m.n_keys - c0);
        float local_max = -INFINITY;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float sc = dot_row(qs, k + ((size_t)(m.k0 + c0 + j) * KV + g) * D, D) * scale;
            s[j] = sc;
            local_max = fmaxf(local_max, sc);
        }
        const float new_max = fmaxf(run_max, block_max(local_max, scratch));
        float local_sum = 0.0f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float p = expf(s[j] - new_max);
            s[j] = p;
            local_sum += p;
        }
        const float chunk_sum = block_sum(local_sum, scratch);  // its barriers also publish s[]
        const float rescale = expf(run_max - new_max);
        run_sum = run_sum * rescale + chunk_sum;
        if (threadIdx.x < D) {
            float a = acc * rescale;
            for (int j = 0; j < n; ++j) a += s[j] * to_f32(v[((size_t)(m.k0 + c0 + j) * KV + g) * D + threadIdx.x]);
            acc = a;
        }
        run_max = new_max;
        __syncthreads();
    }
    if (threadIdx.x < D) out[((size_t)row * H + h) * D + threadIdx.x] = from_f32<T>(m.n_keys > 0 ? acc / run_sum : 0.0f);
    if (threadIdx.x == 0) lse[(size_t)row * H + h] = m.n_keys > 0 ? run_max + logf(run_sum) : -INFINITY;
}

// D_i = sum_d dO[i, h, d] * O[i, h, d], one block per (row, head).
template <typename T>
__device__ void attention_bwd_dot(float* __restrict__ delta, const T* __restrict__ dout, const T* __restrict__ out,
                                  int H, int D) {
    __shared__ float scratch[32];
    const size_t base = ((size_t)blockIdx.x * H + blockIdx.y) * D;
    float s = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) s += to_f32(dout[base + d]) * to_f32(out[base + d]);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) delta[(size_t)blockIdx.x * H + blockIdx.y] = s;
}

template <typename T>
__device__ void attention_bwd_dq(T* __restrict__ dq, const T* __restrict__ q, const T* __restrict__ k,
                                 const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ lse,
                                 const float* __restrict__ delta, const int* __restrict__ cu_q,
                                 const int* __restrict__ k_start, const int* __restrict__ k_len, int B, int H, int KV,
                                 int D, float scale) {
    __shared__ float ds[ATTN_CHUNK];
    extern __shared__ float sh[];  // q [D], dO [D]
    float* qs = sh;
    float* dos = sh + D;
    const int row = blockIdx.x, h = blockIdx.y, g = h / (H / KV);
    const SeqMap m = seq_of(cu_q, k_start, k_len, B, row);
    const size_t qi = ((size_t)row * H + h) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        qs[d] = to_f32(q[qi + d]);
        dos[d] = to_f32(dout[qi + d]);
    }
    __syncthreads();
    const float l = lse[(size_t)row * H + h], di = delta[(size_t)row * H + h];
    float acc = 0.0f;
    for (int c0 = 0; c0 < m.n_keys; c0 += ATTN_CHUNK) {
        const int n = min(ATTN_CHUNK, m.n_keys - c0);
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const size_t kj = ((size_t)(m.k0 + c0 + j) * KV + g) * D;
            const float p = expf(dot_row(qs, k + kj, D) * scale - l);
            ds[j] = p * (dot_row(dos, v + kj, D) - di);
        }
        __syncthreads();
        if (threadIdx.x < D)
            for (int j = 0; j < n; ++j) acc += ds[j] * to_f32(k[((size_t)(m.k0 + c0 + j) * KV + g) * D + threadIdx.x]);
        __syncthreads();
    }
    if (threadIdx.x < D) dq[qi + threadIdx.x] = from_f32<T>(acc * scale);
}

// One block per packed key row j (training layout: key rows are query rows) and kv head.
template <typename T>
__device__ void attention_bwd_dkv(T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ q,
                                  const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                  const int* __restrict__ cu_q, int B, int H, int KV, int D, float scale) {
    __shared__ float ps[ATTN_CHUNK];
    __shared__ float ds[ATTN_CHUNK];
    extern __shared__ float sh[];  // k [D], v [D]
    float* ks = sh;
    float* vs = sh + D;
    const int j = blockIdx.x, g = blockIdx.y, group = H / KV;
    int lo = 0, hi = B - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (cu_q[mid] <= j) lo = mid;
        else hi = mid - 1;
    }
    const int start = cu_q[lo], len = cu_q[lo + 1] - start, jk = j - start;
    const size_t kj = ((size_t)j * KV + g) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        ks[d] = to_f32(k[kj + d]);
        vs[d] = to_f32(v[kj + d]);
    }
    __syncthreads();
    // Queries that see key jk: local iq in [jk, len), for each head of the group.
    const int nq = len - jk, slots = nq * group;
    float acc_k = 0.0f, acc_v = 0.0f;
    for (int c0 = 0; c0 < slots; c0 += ATTN_CHUNK) {
        const int n = min(ATTN_CHUNK, slots - c0);
        for (int t = threadIdx.x; t < n; t += blockDim.x) {
            const int slot = c0 + t, h = g * group + slot % group, i = start + jk + slot / group;
            const size_t qi = ((size_t)i * H + h) * D;
            float s = 0.0f, dp = 0.0f;
            for (int d = 0; d < D; ++d) {
                s += to_f32(q[qi + d]) * ks[d];
                dp += to_f32(dout[qi + d]) * vs[d];
            }
            const float p = expf(s * scale - lse[(size_t)i * H + h]);
            ps[t] = p;
            ds[t] = p * (dp - delta[(size_t)i * H + h]);
        }
        __syncthreads();
        if (threadIdx.x < D) {
            for (int t = 0; t < n; ++t) {
                const int slot = c0 + t, h = g * group + slot % group, i = start + jk + slot / group;
                const size_t qi = ((size_t)i * H + h) * D + threadIdx.x;
                acc_v += ps[t] * to_f32(dout[qi]);
                acc_k += ds[t] * to_f32(q[qi]);
            }
        }
        __syncthreads();
    }
    if (threadIdx.x < D) {
        dk[kj + threadIdx.x] = from_f32<T>(acc_k * scale);
        dv[kj + threadIdx.x] = from_f32<T>(acc_v);
    }
}

#define ATTENTION_INSTANTIATE(SUFFIX, T)                                                                          \
    extern "C" __global__ void attention_fwd_##SUFFIX(T* out, float* lse, const T* q, const T* k, const T* v,     \
                                                      const int* cu_q, const int* k_start, const int* k_len,     \
                                                      int B, int H, int KV, int D, float scale) {                \
        attention_fwd<T>(out, lse, q, k, v, cu_q, k_start, k_len, B, H, KV, D, scale);                            \
    }                                                                                                             \
    extern "C" __global__ void attention_bwd_dot_##SUFFIX(float* delta, const T* dout, const T* out, int H,       \
                                                          int D) {                                                \
        attention_bwd_dot<T>(delta, dout, out, H, D);                                                             \
    }                                                                                                             \
    extern "C" __global__ void attention_bwd_dq_##SUFFIX(T* dq, const T* q, const T* k, const T* v, const T* dout, \
                                                         const float* lse, const float* delta, const int* cu_q,   \
                                                         const int* k_start, const int* k_len, int B, int H,      \
                                                         int KV, int D, float scale) {                            \
        attention_bwd_dq<T>(dq, q, k, v, dout, lse, delta, cu_q, k_start, k_len, B, H, KV, D, scale);             \
    }                                                                                                             \
    extern "C" __global__ void attention_bwd_dkv_##SUFFIX(T* dk, T* dv, const T* q, const T* k, const T* v,       \
                                                          const T* dout, const float* lse, const float* delta,    \
                                                          const int* cu_q, int B, int H, int KV, int D,           \
                                                          float scale) {                                          \
        attention_bwd_dkv<T>(dk, dv, q, k, v, dout, lse, delta, cu_q, B, H, KV, D, scale);                        \
    }

ATTENTION_INSTANTIATE(f32, float)
ATTENTION_INSTANTIATE(bf16, bf16)
