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
#include "common.cuh"

struct KlState {
    float mp, sp;  // policy: running max and sum e^(x - mp)
    float mq, sq;  // reference
    float u;       // sum e^(x - mp) (x - y)
};

__device__ __forceinline__ KlState kl_init() { return {-INFINITY, 0.0f, -INFINITY, 0.0f, 0.0f}; }

__device__ __forceinline__ KlState kl_push(KlState a, float x, float y) {
    if (x > a.mp) {
        const float r = a.mp == -INFINITY ? 0.0f : __expf(a.mp - x);
        a.sp = a.sp * r + 1.0f;
        a.u = a.u * r + (x - y);
        a.mp = x;
    } else {
        const float e = __expf(x - a.mp);
        a.sp += e;
        a.u += e * (x - y);
    }
    OnlineSoftmax q = online_softmax_push({a.mq, a.sq}, y);
    a.mq = q.m;
    a.sq = q.s;
    return a;
}

__device__ __forceinline__ KlState kl_merge(KlState a, KlState b) {
    KlState r;
    if (b.mp == -INFINITY) {
        r = a;
    } else if (a.mp == -INFINITY) {
        r = b;
    } else {
        const float m = fmaxf(a.mp, b.mp);
        const float ra = __expf(a.mp - m), rb = __expf(b.mp - m);
        r.mp = m;
        r.sp = a.sp * ra + b.sp * rb;
        r.u = a.u * ra + b.u * rb;
    }
    OnlineSoftmax q = online_softmax_merge({a.mq, a.sq}, {b.mq, b.sq});
    r.mq = q.m;
    r.sq = q.s;
    return r;
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

template <typename T>
__device__ void kl_full_fwd(float* __restrict__ kl,           // [N]
                            float* __restrict__ lse_p,        // [N]
                            float* __restrict__ lse_q,        // [N]
                            const T* __restrict__ policy,     // [N, V]
                            const T* __restrict__ reference,  // [N, V]
                            int V) {
    __shared__ float scratch[5 * 32];
    const size_t row = blockIdx.x;
    const T* x = policy + row * V;
    const T* y = reference + row * V;
    KlState st = kl_init();
    if (V % Vec16<T>::N == 0) {
        constexpr int N = Vec16<T>::N;
        for (int i = threadIdx.x * N; i < V; i += blockDim.x * N) {
            float xv[N], yv[N];
            load16(x + i, xv);
            load16(y + i, yv);
#pragma unroll
            for (int j = 0; j < N; ++j) st = kl_push(st, xv[j], yv[j]);
        }
    } else {
        for (int i = threadIdx.x; i < V; i += blockDim.x) st = kl_push(st, to_f32(x[i]), to_f32(y[i]));
    }
    st = warp_kl(st);
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
    if (lane == 0) {
        const float lp = st.mp + logf(st.sp), lq = st.mq + logf(st.sq);
        lse_p[row] = lp;
        lse_q[row] = lq;
        kl[row] = st.u / st.sp - (lp - lq);
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
    const T* x = policy + row * V;
    const T* y = reference + row * V;
    T* dx = dpolicy + row * V;
    const float lp = lse_p[row], lq = lse_q[row], k = kl[row], g = upstream[row];
    auto grad = [&](float xv, float yv) {
        const float logp = xv - lp;
        return g * __expf(logp) * (logp - (yv - lq) - k);
    };
    if (V % Vec16<T>::N == 0) {
        constexpr int N = Vec16<T>::N;
        for (int i = threadIdx.x * N; i < V; i += blockDim.x * N) {
            float xv[N], yv[N];
            load16(x + i, xv);
            load16(y + i, yv);
#pragma unroll
            for (int j = 0; j < N; ++j) xv[j] = grad(xv[j], yv[j]);
            store16(dx + i, xv);
        }
    } else {
        for (int i = threadIdx.x; i < V; i += blockDim.x) dx[i] = from_f32<T>(grad(to_f32(x[i]), to_f32(y[i])));
    }
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
