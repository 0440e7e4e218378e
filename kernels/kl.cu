// KL divergence between the policy and the reference, full-distribution and sampled.
//
// Full, per row of policy logits x and reference logits y (both [N, V]), p = softmax(x), q = softmax(y):
//   KL = sum_v p_v (log p_v - log q_v) = u / s_p - (lse_p - lse_q),   u = sum_v e^(x_v - m_p) (x_v - y_v)
// One pass over both rows: online (max, sum) for each and u rescaled with p's max. Nothing of size V
// is stored. Backward of sum_rows g * KL with respect to x (the reference gets no gradient):
//   dx_v = g * p_v * (log p_v - log q_v - KL)
//
// Sampled estimators per token (Schulman, "Approximating KL divergence"), logr = ref_lp - policy_lp:
//   k1 = -logr,  k2 = logr^2 / 2,  k3 = exp(logr) - 1 - logr
// with gradients with respect to policy_lp: 1, -logr, 1 - exp(logr).
#include <float.h>

#include "common.cuh"

struct KlState {
    float mp, sp;  // policy: running max and sum e^(x - mp)
    float mq, sq;  // reference
    float u;       // sum e^(x - mp) (x - y)
};

__host__ __device__ __forceinline__ KlState kl_init() { return {-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f}; }

// Folds N entries of both rows into the state; each max moves at most once per call (see
// entropy_push in logprob.cu). A masked policy entry (x = -inf) has p = 0 and adds nothing; clamping
// x - y keeps its e * (x - y) at 0 * finite even where the reference is masked too. A reference
// masked where the policy is not gives KL = +inf, its true value. NaN in either row reaches the output.
template <int N>
__host__ __device__ __forceinline__ KlState kl_push(KlState a, const float* x, const float* y) {
    float top_x = x[0], top_y = y[0];
#pragma unroll
    for (int j = 1; j < N; ++j) {
        top_x = fmaxf(top_x, x[j]);
        top_y = fmaxf(top_y, y[j]);
    }
    if (!(top_x <= a.mp)) {  // a new maximum, or NaN
        if (a.mp != -INFINITY) {
            const float r = exp_ftz(a.mp - top_x);
            a.sp *= r;
            a.u *= r;
        }
        a.mp = top_x;
    }
    if (!(top_y <= a.mq)) {
        if (a.mq != -INFINITY) a.sq *= exp_ftz(a.mq - top_y);
        a.mq = top_y;
    }
    if (a.mp != -INFINITY) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const float e = exp_ftz(x[j] - a.mp);
            a.sp += e;
            a.u = fmaf(e, fmaxf(x[j] - y[j], -FLT_MAX), a.u);
        }
    }
    if (a.mq != -INFINITY) {
#pragma unroll
        for (int j = 0; j < N; ++j) a.sq += exp_ftz(y[j] - a.mq);
    }
    return a;
}

__host__ __device__ __forceinline__ KlState kl_merge(KlState a, KlState b) {
    KlState r;
    if (b.mp == -INFINITY) {
        r = a;
    } else if (a.mp == -INFINITY) {
        r = b;
    } else {
        const float m = fmaxf(a.mp, b.mp);
        const float ra = exp_ftz(a.mp - m), rb = exp_ftz(b.mp - m);
        r.mp = m;
        r.sp = a.sp * ra + b.sp * rb;
        r.u = a.u * ra + b.u * rb;
    }
    if (b.mq == -INFINITY) {
        r.mq = a.mq;
        r.sq = a.sq;
    } else if (a.mq == -INFINITY) {
        r.mq = b.mq;
        r.sq = b.sq;
    } else {
        r.mq = fmaxf(a.mq, b.mq);
        r.sq = a.sq * exp_ftz(a.mq - r.mq) + b.sq * exp_ftz(b.mq - r.mq);
    }
    return r;
}

// Writes lse_p, lse_q and KL = u / s_p - (lse_p - lse_q).
__host__ __device__ __forceinline__ void kl_finish(KlState st, float* lse_p, float* lse_q, float* kl) {
    *lse_p = st.mp + logf(st.sp);
    *lse_q = st.mq + logf(st.sq);
    *kl = st.u / st.sp - (*lse_p - *lse_q);
}

__device__ __forceinline__ KlState warp_kl(KlState v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        KlState w{__shfl_xor_sync(0xffffffffu, v.mp, o), __shfl_xor_sync(0xffffffffu, v.sp, o),
                  __shfl_xor_sync(0xffffffffu, v.mq, o), __shfl_xor_sync(0xffffffffu, v.sq, o),
                  __shfl_xor_sync(0xffffffffu, v.u, o)};
        v = kl_merge(v, w);
    }
    return v;
}

// Rows that are not 16-byte aligned are read with this many strided scalar loads per step.
constexpr int kKlScalarUnroll = 4;

// Thread `tid`'s share (of `nthreads`) of one pair of rows.
template <typename T>
__host__ __device__ __forceinline__ KlState kl_row_state(const T* __restrict__ x, const T* __restrict__ y, int V,
                                                         int tid, int nthreads) {
    KlState st = kl_init();
    if (V % Vec16<T>::N == 0) {
        constexpr int N = Vec16<T>::N;
        for (int i = tid * N; i < V; i += nthreads * N) {
            float xv[N], yv[N];
            load16(x + i, xv);
            load16(y + i, yv);
            st = kl_push<N>(st, xv, yv);
        }
    } else {
        constexpr int U = kKlScalarUnroll;
        int i = tid;
        for (; i + (U - 1) * nthreads < V; i += U * nthreads) {
            float xv[U], yv[U];
#pragma unroll
            for (int j = 0; j < U; ++j) {
                xv[j] = to_f32(x[i + j * nthreads]);
                yv[j] = to_f32(y[i + j * nthreads]);
            }
            st = kl_push<U>(st, xv, yv);
        }
        for (; i < V; i += nthreads) {
            const float xv[1] = {to_f32(x[i])}, yv[1] = {to_f32(y[i])};
            st = kl_push<1>(st, xv, yv);
        }
    }
    return st;
}

template <typename T>
__device__ void kl_full_fwd(float* __restrict__ kl,           // [N]
                            float* __restrict__ lse_p,        // [N]
                            float* __restrict__ lse_q,        // [N]
                            const T* __restrict__ policy,     // [N, V]
                            const T* __restrict__ reference,  // [N, V]
                            int V) {
    __shared__ float scratch[5 * 32];
    const size_t row = blockIdx.x;
    KlState st = warp_kl(kl_row_state(policy + row * V, reference + row * V, V, threadIdx.x, blockDim.x));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) {
        scratch[5 * warp] = st.mp;
        scratch[5 * warp + 1] = st.sp;
        scratch[5 * warp + 2] = st.mq;
        scratch[5 * warp + 3] = st.sq;
        scratch[5 * warp + 4] = st.u;
    }
    __syncthreads();
    if (warp != 0) return;
    st = lane < warps ? KlState{scratch[5 * lane], scratch[5 * lane + 1], scratch[5 * lane + 2], scratch[5 * lane + 3],
                                scratch[5 * lane + 4]}
                      : kl_init();
    st = warp_kl(st);
    if (lane == 0) kl_finish(st, &lse_p[row], &lse_q[row], &kl[row]);
}

// dx_v = g * p_v * (log p_v - log q_v - KL) = (g * p_v) * (log p_v - y_v + c), c = lse_q - KL.
// p = 0 (a masked entry) gives exactly 0, whatever the reference holds there.
__host__ __device__ __forceinline__ float kl_grad(float x, float y, float lp, float c, float g) {
    const float logp = x - lp;
    const float p = exp_ftz(logp);
    return p == 0.0f ? 0.0f : g * p * (logp - y + c);
}

template <typename T>
__host__ __device__ __forceinline__ void kl_row_grad(T* __restrict__ dx, const T* __restrict__ x,
                                                     const T* __restrict__ y, int V, float lp, float c, float g,
                                                     int tid, int nthreads) {
    if (V % Vec16<T>::N == 0) {
        constexpr int N = Vec16<T>::N;
        for (int i = tid * N; i < V; i += nthreads * N) {
            float xv[N], yv[N];
            load16(x + i, xv);
            load16(y + i, yv);
#pragma unroll
            for (int j = 0; j < N; ++j) xv[j] = kl_grad(xv[j], yv[j], lp, c, g);
            store16(dx + i, xv);
        }
    } else {
#pragma unroll kKlScalarUnroll
        for (int i = tid; i < V; i += nthreads) dx[i] = from_f32<T>(kl_grad(to_f32(x[i]), to_f32(y[i]), lp, c, g));
    }
}

template <typename T>
__device__ void kl_full_bwd(T* __restrict__ dpolicy,            // [N, V]
                            const T* __restrict__ policy,       // [N, V]
                            const T* __restrict__ reference,    // [N, V]
                            const float* __restrict__ lse_p,    // [N]
                            const float* __restrict__ lse_q,    // [N]
                            const float* __restrict__ kl,       // [N]
                            const float* __restrict__ upstream, // [N]
                            int V) {
    const size_t row = blockIdx.x;
    kl_row_grad(dpolicy + row * V, policy + row * V, reference + row * V, V, lse_p[row], lse_q[row] - kl[row],
                upstream[row], threadIdx.x, blockDim.x);
}

// kind: 1, 2 or 3 for k1, k2, k3.
extern "C" __global__ void kl_sampled_fwd(float* __restrict__ k,                // [N]
                                          const float* __restrict__ policy_lp,  // [N]
                                          const float* __restrict__ ref_lp,     // [N]
                                          int kind, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float logr = ref_lp[i] - policy_lp[i];
    k[i] = kind == 1 ? -logr : (kind == 2 ? 0.5f * logr * logr : expm1f(logr) - logr);
}

extern "C" __global__ void kl_sampled_bwd(float* __restrict__ dpolicy_lp,       // [N]
                                          const float* __restrict__ policy_lp,  // [N]
                                          const float* __restrict__ ref_lp,     // [N]
                                          const float* __restrict__ upstream,   // [N]
                                          int kind, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float logr = ref_lp[i] - policy_lp[i];
    dpolicy_lp[i] = upstream[i] * (kind == 1 ? 1.0f : (kind == 2 ? -logr : -expm1f(logr)));
}

#define KL_INSTANTIATE(SUFFIX, T)                                                                          \
    extern "C" __global__ void kl_full_fwd_##SUFFIX(float* kl, float* lse_p, float* lse_q, const T* policy, \
                                                    const T* reference, int V) {                           \
        kl_full_fwd<T>(kl, lse_p, lse_q, policy, reference, V);                                            \
    }                                                                                                      \
    extern "C" __global__ void kl_full_bwd_##SUFFIX(T* dpolicy, const T* policy, const T* reference,         \
                                                    const float* lse_p, const float* lse_q,                \
                                                    const float* kl, const float* upstream, int V) {       \
        kl_full_bwd<T>(dpolicy, policy, reference, lse_p, lse_q, kl, upstream, V);                         \
    }

KL_INSTANTIATE(f32, float)
KL_INSTANTIATE(bf16, bf16)
