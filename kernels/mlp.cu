// SwiGLU, the Llama MLP's non-linearity, fused: h = silu(gate) * up. The GEMMs around it are cuBLAS;
// gate and up come from one of them (the two projections' weights stacked), so they arrive side by
// side in each row of gate_up, and this kernel saves writing silu(gate) and re-reading it.
//
//   forward:  h = g * sigmoid(g) * u
//   backward: du = dh * silu(g),  dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))   (overwritten)
//             and, when h is given, the forward's h again in the same pass: a backward that did not
//             keep h (the down projection's weight gradient needs it) reads gate and up once, not
//             twice
//
// Shapes: gate_up, dgate_up [N, 2I] (gate in columns 0..I, up in I..2I); h, dh [N, I]; all in T.
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

// Element i of h [N, I] pairs gate[r][c] and up[r][c] (r = i / I, c = i % I), which sit at gate_up
// offsets i + r * I and that plus I. The division runs in 32 bits where the element count fits.
__device__ __forceinline__ size_t gate_at(size_t i, size_t inter, bool narrow) {
    const size_t row = narrow ? (uint32_t)i / (uint32_t)inter : i / inter;
    return i + row * inter;
}

// Both kernels walk 16-byte vectors (grid_stride_vec) when I is a multiple of a vector (so none
// straddles a row) and the buffers are aligned, element by element otherwise.
template <typename T>
__device__ void swiglu_fwd(T* __restrict__ h, const T* __restrict__ gate_up, size_t n, size_t inter) {
    constexpr int N = Vec16<T>::N;
    const bool narrow = n <= 0xffffffffu;
    grid_stride_vec<N>(
        n, inter % N == 0 && aligned16(h, gate_up),
        [&](size_t i) {
            const size_t gi = gate_at(i, inter, narrow);
            float g[N], u[N];
            load16(gate_up + gi, g);
            load16(gate_up + gi + inter, u);
#pragma unroll
            for (int j = 0; j < N; ++j) g[j] = swiglu_at(g[j], u[j]);
            store16(h + i, g);
        },
        [&](size_t i) {
            const size_t gi = gate_at(i, inter, narrow);
            h[i] = from_f32<T>(swiglu_at(to_f32(gate_up[gi]), to_f32(gate_up[gi + inter])));
        });
}

// h may be null: then only the gradients are written. dgate_up has gate_up's layout.
template <typename T>
__device__ void swiglu_bwd(T* __restrict__ dgate_up, T* __restrict__ h, const T* __restrict__ dh,
                           const T* __restrict__ gate_up, size_t n, size_t inter) {
    constexpr int N = Vec16<T>::N;
    const bool narrow = n <= 0xffffffffu;
    grid_stride_vec<N>(
        n, inter % N == 0 && aligned16(dgate_up, dh, gate_up) && aligned16(h),
        [&](size_t i) {
            const size_t gi = gate_at(i, inter, narrow);
            float d[N], g[N], u[N], dg[N], du[N], y[N];
            load16(dh + i, d);
            load16(gate_up + gi, g);
            load16(gate_up + gi + inter, u);
#pragma unroll
            for (int j = 0; j < N; ++j) y[j] = swiglu_grad_at(d[j], g[j], u[j], &dg[j], &du[j]);
            store16(dgate_up + gi, dg);
            store16(dgate_up + gi + inter, du);
            if (h) store16(h + i, y);
        },
        [&](size_t i) {
            const size_t gi = gate_at(i, inter, narrow);
            float dg, du;
            const float y = swiglu_grad_at(to_f32(dh[i]), to_f32(gate_up[gi]), to_f32(gate_up[gi + inter]), &dg, &du);
            dgate_up[gi] = from_f32<T>(dg);
            dgate_up[gi + inter] = from_f32<T>(du);
            if (h) h[i] = from_f32<T>(y);
        });
}

#define SWIGLU_INSTANTIATE(SUFFIX, T)                                                                          \
    extern "C" __global__ void swiglu_fwd_##SUFFIX(T* h, const T* gate_up, size_t n, size_t inter) {          \
        swiglu_fwd<T>(h, gate_up, n, inter);                                                                   \
    }                                                                                                          \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(T* dgate_up, T* h, const T* dh, const T* gate_up, size_t n, \
                                                   size_t inter) {                                             \
        swiglu_bwd<T>(dgate_up, h, dh, gate_up, n, inter);                                                     \
    }

SWIGLU_INSTANTIATE(f32, float)
SWIGLU_INSTANTIATE(bf16, bf16)
