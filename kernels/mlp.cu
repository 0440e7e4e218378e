// SwiGLU, the Llama MLP's non-linearity, fused: h = silu(gate) * up. The three GEMMs around it are
// cuBLAS; this kernel saves writing silu(gate) and re-reading it.
//
//   forward:  h = g * sigmoid(g) * u
//   backward: du = dh * silu(g),  dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))   (overwritten)
//             and, when h is given, the forward's h again in the same pass: a backward that did not
//             keep h (the down projection's weight gradient needs it) reads gate and up once, not
//             twice
//
// Shapes: gate, up, h, dh, dgate, dup [N, I] in T.
#include "common.cuh"

// sigmoid(g) = 1 / (1 + e^-g) on the special-function unit: e^-g overflows to +inf for g < -88 and
// the quotient is then 0, the limit. About 2e-6 relative error, under the f32 tests' 1e-5.
__device__ __forceinline__ float sigmoid_fast(float g) { return __fdividef(1.0f, 1.0f + exp_ftz(-g)); }

// Element i of the forward and the backward.
__device__ __forceinline__ float swiglu_at(float g, float u) { return g * sigmoid_fast(g) * u; }

// Also returns the forward's value, as swiglu_at computes it.
__device__ __forceinline__ float swiglu_grad_at(float d, float g, float u, float* dg, float* du) {
    const float s = sigmoid_fast(g);
    *du = d * g * s;
    *dg = d * u * s * (1.0f + g * (1.0f - s));
    return g * s * u;
}

// Both kernels walk 16-byte vectors (grid_stride_vec), unaligned buffers element by element.
template <typename T>
__device__ void swiglu_fwd(T* __restrict__ h, const T* __restrict__ gate, const T* __restrict__ up, size_t n) {
    constexpr int N = Vec16<T>::N;
    grid_stride_vec<N>(
        n, aligned16(h, gate, up),
        [&](size_t i) {
            float g[N], u[N];
            load16(gate + i, g);
            load16(up + i, u);
#pragma unroll
            for (int j = 0; j < N; ++j) g[j] = swiglu_at(g[j], u[j]);
            store16(h + i, g);
        },
        [&](size_t i) { h[i] = from_f32<T>(swiglu_at(to_f32(gate[i]), to_f32(up[i]))); });
}

// h may be null: then only the gradients are written.
template <typename T>
__device__ void swiglu_bwd(T* __restrict__ dgate, T* __restrict__ dup, T* __restrict__ h, const T* __restrict__ dh,
                           const T* __restrict__ gate, const T* __restrict__ up, size_t n) {
    constexpr int N = Vec16<T>::N;
    grid_stride_vec<N>(
        n, aligned16(dgate, dup, dh, gate, up) && aligned16(h),
        [&](size_t i) {
            float d[N], g[N], u[N], dg[N], du[N], y[N];
            load16(dh + i, d);
            load16(gate + i, g);
            load16(up + i, u);
#pragma unroll
            for (int j = 0; j < N; ++j) y[j] = swiglu_grad_at(d[j], g[j], u[j], &dg[j], &du[j]);
            store16(dgate + i, dg);
            store16(dup + i, du);
            if (h) store16(h + i, y);
        },
        [&](size_t i) {
            float dg, du;
            const float y = swiglu_grad_at(to_f32(dh[i]), to_f32(gate[i]), to_f32(up[i]), &dg, &du);
            dgate[i] = from_f32<T>(dg);
            dup[i] = from_f32<T>(du);
            if (h) h[i] = from_f32<T>(y);
        });
}

#define SWIGLU_INSTANTIATE(SUFFIX, T)                                                                          \
    extern "C" __global__ void swiglu_fwd_##SUFFIX(T* h, const T* gate, const T* up, size_t n) {              \
        swiglu_fwd<T>(h, gate, up, n);                                                                         \
    }                                                                                                          \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(T* dgate, T* dup, T* h, const T* dh, const T* gate,        \
                                                   const T* up, size_t n) {                                    \
        swiglu_bwd<T>(dgate, dup, h, dh, gate, up, n);                                                         \
    }

SWIGLU_INSTANTIATE(f32, float)
SWIGLU_INSTANTIATE(bf16, bf16)
