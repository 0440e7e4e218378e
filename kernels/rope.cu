// Rotary position embedding in Hugging Face's rotate-half layout.
//
// For each head vector x of dim D (half = D/2), position p and frequencies inv_freq[i] (i < half):
//   y[i]        = x[i] cos(p f_i) - x[i + half] sin(p f_i)
//   y[i + half] = x[i + half] cos(p f_i) + x[i] sin(p f_i)
// The backward is the inverse rotation (the transpose): dx = R(-angle) dy. The angle is computed in
// f32 as p * f_i, as transformers does, with accurate sincosf (angles reach thousands of radians).
//
// Shapes: x, y [N, heads * D] in T; positions [N] i32; inv_freq [half] f32.
#include "common.cuh"

template <typename T>
__device__ void rope(T* __restrict__ y, const T* __restrict__ x, const int* __restrict__ positions,
                     const float* __restrict__ inv_freq, int heads, int head_dim, float direction) {
    const size_t row = blockIdx.x;
    const int half = head_dim / 2;
    const float p = (float)positions[row];
    const T* xr = x + row * heads * head_dim;
    T* yr = y + row * heads * head_dim;
    // A thread's frequency index repeats across heads when the block is a multiple of half wide
    // (128 threads, half = 32 or 64): one sincosf, the costly part, per thread instead of per head.
    int have = -1;
    float s = 0.0f, c = 1.0f;
    for (int k = threadIdx.x; k < heads * half; k += blockDim.x) {
        const int h = k / half, i = k % half;
        if (i != have) {
            sincosf(p * inv_freq[i], &s, &c);
            s *= direction;
            have = i;
        }
        const float a = to_f32(xr[h * head_dim + i]), b = to_f32(xr[h * head_dim + i + half]);
        yr[h * head_dim + i] = from_f32<T>(a * c - b * s);
        yr[h * head_dim + i + half] = from_f32<T>(b * c + a * s);
    }
}

#define ROPE_INSTANTIATE(SUFFIX, T)                                                                       \
    extern "C" __global__ void rope_fwd_##SUFFIX(T* y, const T* x, const int* positions,                 \
                                                 const float* inv_freq, int heads, int head_dim) {       \
        rope<T>(y, x, positions, inv_freq, heads, head_dim, 1.0f);                                        \
    }                                                                                                     \
    extern "C" __global__ void rope_bwd_##SUFFIX(T* dx, const T* dy, const int* positions,               \
                                                 const float* inv_freq, int heads, int head_dim) {       \
        rope<T>(dx, dy, positions, inv_freq, heads, head_dim, -1.0f);                                     \
    }

ROPE_INSTANTIATE(f32, float)
ROPE_INSTANTIATE(bf16, bf16)
