// Rotary position embedding in Hugging Face's rotate-half layout, for the queries and keys of a layer
// in one launch.
//
// For each head vector x of dim D (half = D/2), position p and frequencies inv_freq[i] (i < half):
//   y[i]        = x[i] cos(p f_i) - x[i + half] sin(p f_i)
//   y[i + half] = x[i + half] cos(p f_i) + x[i] sin(p f_i)
// The backward is the inverse rotation (the transpose): dx = R(-angle) dy. The angle is computed in
// f32 as p * f_i, as transformers does, and its sine and cosine to about an ulp (sincos_of_angle).
//
// Shapes: xq, yq [N, heads_q * D] and xk, yk [N, heads_k * D] in T (heads_k may be 0, xk and yk then
// unused); positions [N] i32; inv_freq [half] f32.
//
// One thread takes one row and a run of W frequencies (W = 8 bf16 or 4 f32: one 16-byte vector of
// each half), computes their sines and cosines once, and rotates that run in every query and key
// head of the row: the sines and cosines, the costly part, are paid once per row and frequency, not
// per head, and each access is 16 bytes. Where half is not a multiple of W (the last run is
// shorter) or a buffer is not 16-byte aligned, the accesses are element by element.
#include "common.cuh"

// sin and cos of an f32 angle (transformers' p * f_i, which reaches thousands of radians, more
// past 100k positions) to about an ulp, without sincosf: its slow path for angles past 105,615 needs
// a stack array in every copy inlined, which the W copies here would keep. The angle is reduced by
// pi/2 in double precision (exact enough for any position: k below 2^30 loses under 1e-7 radians),
// and the remainder, within pi/4, goes through Taylor polynomials in f32 whose truncation error at
// pi/4 is under 2e-9. (Host-callable, so tests/host/rope_check.cu can measure it against double
// precision.)
__host__ __device__ __forceinline__ void sincos_of_angle(float angle, float* s, float* c) {
    const double a = angle;
    const double k = rint(a * 0.63661977236758134);  // 2 / pi
    const float r = (float)fma(-k, 1.5707963267948966, a), r2 = r * r;
    float sr = fmaf(r2, 1.0f / 362880.0f, -1.0f / 5040.0f);
    sr = fmaf(sr, r2, 1.0f / 120.0f);
    sr = fmaf(sr, r2, -1.0f / 6.0f);
    sr = fmaf(sr * r2, r, r);
    float cr = fmaf(r2, -1.0f / 3628800.0f, 1.0f / 40320.0f);
    cr = fmaf(cr, r2, -1.0f / 720.0f);
    cr = fmaf(cr, r2, 1.0f / 24.0f);
    cr = fmaf(cr, r2, -0.5f);
    cr = fmaf(cr, r2, 1.0f);
    // angle = k pi/2 + r: rotate (sin r, cos r) by quarter turns.
    switch ((long long)k & 3) {
        case 0: *s = sr, *c = cr; break;
        case 1: *s = cr, *c = -sr; break;
        case 2: *s = -sr, *c = -cr; break;
        default: *s = -cr, *c = sr; break;
    }
}

// Rotates frequencies i0 .. i0 + count of one head (x and y point at frequency i0): with `vec`
// (count == W, 16-byte aligned), one 16-byte access for each half; otherwise element by element.
template <typename T, int W>
__device__ __forceinline__ void rotate_run(T* __restrict__ y, const T* __restrict__ x, int half, int count, bool vec,
                                           const float* s, const float* c) {
    float a[W], b[W];
    if (vec) {
        load16(x, a);
        load16(x + half, b);
    } else {
#pragma unroll
        for (int j = 0; j < W; ++j) {
            a[j] = j < count ? to_f32(x[j]) : 0.0f;
            b[j] = j < count ? to_f32(x[j + half]) : 0.0f;
        }
    }
    float lo[W], hi[W];
#pragma unroll
    for (int j = 0; j < W; ++j) {
        lo[j] = a[j] * c[j] - b[j] * s[j];
        hi[j] = b[j] * c[j] + a[j] * s[j];
    }
    if (vec) {
        store16(y, lo);
        store16(y + half, hi);
    } else {
#pragma unroll
        for (int j = 0; j < W; ++j)
            if (j < count) y[j] = from_f32<T>(lo[j]), y[j + half] = from_f32<T>(hi[j]);
    }
}

template <typename T>
__device__ void rope(T* __restrict__ yq, T* __restrict__ yk, const T* __restrict__ xq, const T* __restrict__ xk,
                     const int* __restrict__ positions, const float* __restrict__ inv_freq, size_t n, int heads_q,
                     int heads_k, int head_dim, float direction) {
    constexpr int W = Vec16<T>::N;
    const int half = head_dim / 2, runs = (half + W - 1) / W;
    // Row strides are multiples of head_dim, so aligned bases and half % W == 0 align every run.
    const bool vec = half % W == 0 && aligned16(yq, xq, yk, xk);
    const size_t items = n * runs, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t item = blockIdx.x * (size_t)blockDim.x + threadIdx.x; item < items; item += stride) {
        const size_t row = item / runs;
        const int i0 = (int)(item % runs) * W, count = min(W, half - i0);
        const float p = (float)positions[row];
        float s[W], c[W];
#pragma unroll
        for (int j = 0; j < W; ++j) {
            // Past the last frequency (a short run) the value is unused; clamp the read.
            sincos_of_angle(p * inv_freq[i0 + min(j, count - 1)], &s[j], &c[j]);
            s[j] *= direction;
        }
        const size_t q0 = row * heads_q * head_dim + i0, k0 = row * heads_k * head_dim + i0;
        for (int h = 0; h < heads_q; ++h)
            rotate_run<T, W>(yq + q0 + h * head_dim, xq + q0 + h * head_dim, half, count, vec, s, c);
        for (int h = 0; h < heads_k; ++h)
            rotate_run<T, W>(yk + k0 + h * head_dim, xk + k0 + h * head_dim, half, count, vec, s, c);
    }
}

#define ROPE_INSTANTIATE(SUFFIX, T)                                                                                 \
    extern "C" __global__ void rope_fwd_##SUFFIX(T* yq, T* yk, const T* xq, const T* xk, const int* positions,     \
                                                 const float* inv_freq, size_t n, int heads_q, int heads_k,        \
                                                 int head_dim) {                                                   \
        rope<T>(yq, yk, xq, xk, positions, inv_freq, n, heads_q, heads_k, head_dim, 1.0f);                         \
    }                                                                                                               \
    extern "C" __global__ void rope_bwd_##SUFFIX(T* dxq, T* dxk, const T* dyq, const T* dyk, const int* positions, \
                                                 const float* inv_freq, size_t n, int heads_q, int heads_k,        \
                                                 int head_dim) {                                                   \
        rope<T>(dxq, dxk, dyq, dyk, positions, inv_freq, n, heads_q, heads_k, head_dim, -1.0f);                    \
    }

ROPE_INSTANTIATE(f32, float)
ROPE_INSTANTIATE(bf16, bf16)
