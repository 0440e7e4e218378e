// SwiGLU, the Llama MLP's non-linearity, fused: h = silu(gate) * up. The three GEMMs around it are
// cuBLAS; this kernel saves writing silu(gate) and re-reading it.
//
//   forward:  h = g * sigmoid(g) * u
//   backward: du = dh * silu(g),  dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))   (overwritten)
//
// Shapes: gate, up, h, dh, dgate, dup [N, I] in T.
#include "common.cuh"

template <typename T>
__device__ void swiglu_fwd(T* __restrict__ h, const T* __restrict__ gate, const T* __restrict__ up, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]);
        h[i] = from_f32<T>(g / (1.0f + expf(-g)) * to_f32(up[i]));
    }
}

template <typename T>
__device__ void swiglu_bwd(T* __restrict__ dgate, T* __restrict__ dup, const T* __restrict__ dh,
                           const T* __restrict__ gate, const T* __restrict__ up, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]), u = to_f32(up[i]), d = to_f32(dh[i]);
        const float s = 1.0f / (1.0f + expf(-g));
        dup[i] = from_f32<T>(d * g * s);
        dgate[i] = from_f32<T>(d * u * s * (1.0f + g * (1.0f - s)));
    }
}

#define SWIGLU_INSTANTIATE(SUFFIX, T)                                                                          \
    extern "C" __global__ void swiglu_fwd_##SUFFIX(T* h, const T* gate, const T* up, size_t n) {              \
        swiglu_fwd<T>(h, gate, up, n);                                                                         \
    }                                                                                                          \
    extern "C" __global__ void swiglu_bwd_##SUFFIX(T* dgate, T* dup, const T* dh, const T* gate, const T* up,  \
                                                   size_t n) {                                                 \
        swiglu_bwd<T>(dgate, dup, dh, gate, up, n);                                                            \
    }

SWIGLU_INSTANTIATE(f32, float)
SWIGLU_INSTANTIATE(bf16, bf16)
