// Fused log-softmax-gather: per-token log p(target), logsumexp and entropy, and the backward.
//
// Forward, per row of z = scale * logits (scale = 1 / temperature):
//   lse = log sum_v exp(z_v),  logp = z[target] - lse,  H = -sum_v p_v log p_v = lse - sum_v p_v z_v
// One read of the row: an online softmax keeps (m, s, t) = (running max, sum e^(z-m), sum e^(z-m)(z-m)),
// so lse = m + log s and H = log s - t / s (relative to m, so logits near +-1e4 lose no precision).
// The softmax is never stored.
//
// Backward of L = sum_rows g_lp * logp + g_ent * H with respect to logits (overwritten):
//   dlogits_v = scale * ( g_lp * (onehot_v - p_v) - g_ent * p_v * (log p_v + H) ),  p_v = exp(z_v - lse)
// One read of the row and one write, from the saved lse and H.
//
// A negative target is ignored: logp = 0 and g_lp does not reach the logits. A target >= V writes NaN
// into logp, so a bad id is visible rather than silently wrong (the host checks on the CPU path).
//
// The `_chunk` kernels serve the LM-head-fused form (src/ops/logprob.rs): cuBLAS computes logits one
// vocabulary tile at a time into a scratch buffer, and these fold each tile into per-row running state,
// so the [N, V] logits never exist in memory.
#include "common.cuh"

struct EntropyState {
    float m;  // running max
    float s;  // sum e^(z - m)
    float t;  // sum e^(z - m) * (z - m)
};

__device__ __forceinline__ EntropyState entropy_init() { return {-INFINITY, 0.0f, 0.0f}; }

__device__ __forceinline__ EntropyState entropy_push(EntropyState a, float z) {
    if (z == -INFINITY) return a;  // a masked-out vocabulary entry has p = 0
    if (z > a.m) {
        const float r = a.m == -INFINITY ? 0.0f : __expf(a.m - z);
        const float shift = a.m == -INFINITY ? 0.0f : (a.m - z);
        a.t = r * (a.t + shift * a.s);
        a.s = a.s * r + 1.0f;
        a.m = z;
    } else {
        const float e = __expf(z - a.m);
        a.s += e;
        a.t += e * (z - a.m);
    }
    return a;
}

__device__ __forceinline__ EntropyState entropy_merge(EntropyState a, EntropyState b) {
    if (b.m == -INFINITY) return a;
    if (a.m == -INFINITY) return b;
    const float m = fmaxf(a.m, b.m);
    const float ra = __expf(a.m - m), rb = __expf(b.m - m);
    return {m, a.s * ra + b.s * rb, ra * (a.t + (a.m - m) * a.s) + rb * (b.t + (b.m - m) * b.s)};
}

__device__ __forceinline__ EntropyState warp_entropy(EntropyState v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        EntropyState o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset),
                       __shfl_xor_sync(0xffffffffu, v.t, offset)};
        v = entropy_merge(v, o);
    }
    return v;
}

// `scratch` holds three floats per warp.
__device__ __forceinline__ EntropyState block_entropy(EntropyState v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_entropy(v);
    __syncthreads();
    if (lane == 0) {
        scratch[3 * warp] = v.m;
        scratch[3 * warp + 1] = v.s;
        scratch[3 * warp + 2] = v.t;
    }
    __syncthreads();
    EntropyState r = lane < warps ? EntropyState{scratch[3 * lane], scratch[3 * lane + 1], scratch[3 * lane + 2]}
                                  : entropy_init();
    return warp_entropy(r);
}

// Folds row `row` of z = scale * x into a per-thread state, with 16-byte loads when `vec`.
// z is always formed as a rounded product (__fmul_rn), never contracted into an FMA with what
// follows: the backward's log p = z - lse must see the very z the forward's lse was built from, or
// at logits in the thousands the top token's log p becomes the product's rounding error (~1e-4)
// instead of 0.
template <typename T>
__device__ __forceinline__ EntropyState row_state(const T* __restrict__ x, int V, float scale, bool vec) {
    EntropyState st = entropy_init();
    if (vec) {
        constexpr int N = Vec16<T>::N;
        for (int i = threadIdx.x * N; i < V; i += blockDim.x * N) {
            float v[N];
            load16(x + i, v);
#pragma unroll
            for (int j = 0; j < N; ++j) st = entropy_push(st, __fmul_rn(v[j], scale));
        }
    } else {
        for (int i = threadIdx.x; i < V; i += blockDim.x) st = entropy_push(st, __fmul_rn(to_f32(x[i]), scale));
    }
    return st;
}

template <typename T>
__device__ void logprob_fwd(float* __restrict__ logp,        // [N]
                            float* __restrict__ lse,         // [N]
                            float* __restrict__ entropy,     // [N]
                            const T* __restrict__ logits,    // [N, V]
                            const int* __restrict__ target,  // [N]
                            int V, float scale) {
    __shared__ float scratch[3 * 32];
    const size_t row = blockIdx.x;
    const T* x = logits + row * V;
    const bool vec = (V % Vec16<T>::N) == 0;
    EntropyState st = block_entropy(row_state(x, V, scale, vec), scratch);
    if (threadIdx.x == 0) {
        const float log_s = logf(st.s);
        const float l = st.m + log_s;
        const int tgt = target[row];
        lse[row] = l;
        entropy[row] = log_s - st.t / st.s;
        logp[row] = tgt < 0 ? 0.0f : (tgt >= V ? NAN : __fmul_rn(to_f32(x[tgt]), scale) - l);
    }
}

// d loss / d z for one logit: g_lp * (onehot - p) - g_ent * p * (log p + H).
__device__ __forceinline__ float logit_grad(float z, bool onehot, float lse, float entropy, float g_lp, float g_ent) {
    const float logp = z - lse;
    const float p = __expf(logp);
    return g_lp * ((onehot ? 1.0f : 0.0f) - p) - g_ent * p * (logp + entropy);
}

template <typename T>
__device__ void logprob_bwd(T* __restrict__ dlogits,              // [N, V]
                            const T* __restrict__ logits,         // [N, V]
                            const int* __restrict__ target,       // [N]
                            const float* __restrict__ lse,        // [N]
                            const float* __restrict__ entropy,    // [N]
                            const float* __restrict__ grad_logp,  // [N]
                            const float* __restrict__ grad_ent,   // [N]
                            int V, float scale) {
    const size_t row = blockIdx.x;
    const T* x = logits + row * V;
    T* dx = dlogits + row * V;
    const int tgt = target[row];
    const float l = lse[row], h = entropy[row];
    const float g_lp = tgt < 0 ? 0.0f : grad_logp[row];
    const float g_ent = grad_ent[row];
    auto grad = [&](float xv, int v) { return scale * logit_grad(__fmul_rn(xv, scale), v == tgt, l, h, g_lp, g_ent); };
    if (V % Vec16<T>::N == 0) {
        constexpr int N = Vec16<T>::N;
        for (int i = threadIdx.x * N; i < V; i += blockDim.x * N) {
            float v[N];
            load16(x + i, v);
#pragma unroll
            for (int j = 0; j < N; ++j) v[j] = grad(v[j], i + j);
            store16(dx + i, v);
        }
    } else {
        for (int i = threadIdx.x; i < V; i += blockDim.x) dx[i] = from_f32<T>(grad(to_f32(x[i]), i));
    }
}

// One vocabulary tile [v0, v0 + Vc) of z (already scaled, f32 from cuBLAS) folded into the running
// per-row state; the last tile writes logp, lse and entropy.
extern "C" __global__ void logprob_chunk_fwd(float* __restrict__ state,        // [N, 3] (m, s, t)
                                             float* __restrict__ target_z,     // [N]
                                             float* __restrict__ logp,         // [N]
                                             float* __restrict__ lse,          // [N]
                                             float* __restrict__ entropy,      // [N]
                                             const float* __restrict__ z,      // [N, Vc]
                                             const int* __restrict__ target,   // [N]
                                             int Vc, int v0, int V, int first, int last) {
    __shared__ float scratch[3 * 32];
    const size_t row = blockIdx.x;
    const float* zr = z + row * Vc;
    EntropyState st = block_entropy(row_state(zr, Vc, 1.0f, Vc % 4 == 0), scratch);
    if (threadIdx.x != 0) return;
    const int tgt = target[row];
    if (!first) st = entropy_merge(EntropyState{state[3 * row], state[3 * row + 1], state[3 * row + 2]}, st);
    float tz = first ? 0.0f : target_z[row];
    if (tgt >= v0 && tgt < v0 + Vc) tz = zr[tgt - v0];
    if (last) {
        const float log_s = logf(st.s);
        const float l = st.m + log_s;
        lse[row] = l;
        entropy[row] = log_s - st.t / st.s;
        logp[row] = tgt < 0 ? 0.0f : (tgt >= V ? NAN : tz - l);
    } else {
        state[3 * row] = st.m;
        state[3 * row + 1] = st.s;
        state[3 * row + 2] = st.t;
        target_z[row] = tz;
    }
}

// Turns one tile of z (f32) into the tile's dlogits (T, unscaled by 1/temperature: the GEMMs that
// consume it apply the scale).
template <typename T>
__device__ void logprob_chunk_bwd(T* __restrict__ dz,                  // [N, Vc]
                                  const float* __restrict__ z,         // [N, Vc]
                                  const int* __restrict__ target,      // [N]
                                  const float* __restrict__ lse,       // [N]
                                  const float* __restrict__ entropy,   // [N]
                                  const float* __restrict__ grad_logp, // [N]
                                  const float* __restrict__ grad_ent,  // [N]
                                  int Vc, int v0) {
    const size_t row = blockIdx.x;
    const float* zr = z + row * Vc;
    T* d = dz + row * Vc;
    const int tgt = target[row];
    const float l = lse[row], h = entropy[row];
    const float g_lp = tgt < 0 ? 0.0f : grad_logp[row];
    const float g_ent = grad_ent[row];
    for (int i = threadIdx.x; i < Vc; i += blockDim.x) d[i] = from_f32<T>(logit_grad(zr[i], v0 + i == tgt, l, h, g_lp, g_ent));
}

#define LOGPROB_INSTANTIATE(SUFFIX, T)                                                                      \
    extern "C" __global__ void logprob_fwd_##SUFFIX(float* logp, float* lse, float* entropy, const T* logits, \
                                                    const int* target, int V, float scale) {               \
        logprob_fwd<T>(logp, lse, entropy, logits, target, V, scale);                                       \
    }                                                                                                       \
    extern "C" __global__ void logprob_bwd_##SUFFIX(T* dlogits, const T* logits, const int* target,          \
                                                    const float* lse, const float* entropy,                 \
                                                    const float* grad_logp, const float* grad_ent, int V,   \
                                                    float scale) {                                          \
        logprob_bwd<T>(dlogits, logits, target, lse, entropy, grad_logp, grad_ent, V, scale);               \
    }                                                                                                       \
    extern "C" __global__ void logprob_chunk_bwd_##SUFFIX(T* dz, const float* z, const int* target,          \
                                                          const float* lse, const float* entropy,           \
                                                          const float* grad_logp, const float* grad_ent,    \
                                                          int Vc, int v0) {                                 \
        logprob_chunk_bwd<T>(dz, z, target, lse, entropy, grad_logp, grad_ent, Vc, v0);                     \
    }

LOGPROB_INSTANTIATE(f32, float)
LOGPROB_INSTANTIATE(bf16, bf16)
