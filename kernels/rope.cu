// Rotary position embedding in Hugging Face's rotate-half layout, for the queries and keys of a layer
// in one launch. The forward also splits the QKV projection's output (q, k and v side by side in each
// row) into the three tensors attention reads, and the backward joins their gradients back into
// that layout for the projection's backward GEMMs; values are carried over unrotated.
//
// For each head vector x of dim D (half = D/2), position p and frequencies inv_freq[i] (i < half):
//   y[i]        = x[i] cos(p f_i) - x[i + half] sin(p f_i)
//   y[i + half] = x[i + half] cos(p f_i) + x[i] sin(p f_i)
// The backward is the inverse rotation (the transpose): dx = R(-angle) dy. The angle is computed in
// f32 as p * f_i, as transformers does, and its sine and cosine to about an ulp (sincos_of_angle).
//
// Shapes: q [N, heads_q * D], k [N, heads_k * D] and v [N, heads_v * D] in T, as three tensors or, on
// a packed side, one [N, (heads_q + heads_k + heads_v) * D] (heads_k and heads_v may be 0, their
// pointers then unused); positions [N] i32; inv_freq [half] f32.
//
// One thread takes one row and a run of W frequencies (W = 8 bf16 or 4 f32: one 16-byte vector of
// each half), computes their sines and cosines once, and rotates that run in every query and key
// head of the row (and copies it in every value head): the sines and cosines, the costly part, are
// paid once per row and frequency, not per head, and each access is 16 bytes. Where half is not a
// multiple of W (the last run is shorter) or a buffer is not 16-byte aligned, the accesses are
// element by element.
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

// Copies frequencies i0 .. i0 + count of one head, both halves, the way rotate_run reads and writes.
template <typename T, int W>
__device__ __forceinline__ void copy_run(T* __restrict__ y, const T* __restrict__ x, int half, int count, bool vec) {
    if (vec) {
        REQUIRE_ALIGNED(y, 16, "copy_run y");
        REQUIRE_ALIGNED(x, 16, "copy_run x");
        REQUIRE_ALIGNED(y + half, 16, "copy_run y + half");
        REQUIRE_ALIGNED(x + half, 16, "copy_run x + half");
        *reinterpret_cast<uint4*>(y) = *reinterpret_cast<const uint4*>(x);
        *reinterpret_cast<uint4*>(y + half) = *reinterpret_cast<const uint4*>(x + half);
    } else {
        for (int j = 0; j < count; ++j) y[j] = x[j], y[j + half] = x[j + half];
    }
}

// Row strides of q, k and v: the three side by side in one row ([N, (hq + hk + hv) * D], packed) or
// each a tensor of its own ([N, h * D]).
struct RowStrides {
    size_t q, k, v;
};

__device__ __forceinline__ RowStrides row_strides(bool packed, int hq, int hk, int hv, int head_dim) {
    const size_t all = (size_t)(hq + hk + hv) * head_dim;
    if (packed) return {all, all, all};
    return {(size_t)hq * head_dim, (size_t)hk * head_dim, (size_t)hv * head_dim};
}

template <typename T>
__device__ void rope_rows(T* __restrict__ yq, T* __restrict__ yk, T* __restrict__ yv, const T* __restrict__ xq,
                          const T* __restrict__ xk, const T* __restrict__ xv, RowStrides ldx, RowStrides ldy,
                          const int* __restrict__ positions, const float* __restrict__ inv_freq, size_t n,
                          int heads_q, int heads_k, int heads_v, int head_dim, float direction) {
    constexpr int W = Vec16<T>::N;
    const int half = head_dim / 2, runs = (half + W - 1) / W;
    // Row strides and head offsets are multiples of head_dim, so aligned bases and half % W == 0
    // align every run.
    const bool vec = half % W == 0 && aligned16(yq, xq, yk, xk) && aligned16(yv, xv);
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
        for (int h = 0; h < heads_q; ++h) {
            const int at = h * head_dim + i0;
            rotate_run<T, W>(yq + row * ldy.q + at, xq + row * ldx.q + at, half, count, vec, s, c);
        }
        for (int h = 0; h < heads_k; ++h) {
            const int at = h * head_dim + i0;
            rotate_run<T, W>(yk + row * ldy.k + at, xk + row * ldx.k + at, half, count, vec, s, c);
        }
        for (int h = 0; h < heads_v; ++h) {
            const int at = h * head_dim + i0;
            copy_run<T, W>(yv + row * ldy.v + at, xv + row * ldx.v + at, half, count, vec);
        }
    }
}

// Where a side is packed, its k and v start after q's heads in the same rows (their own pointers are
// unused); heads_k or heads_v may be 0 (no keys, or no values to carry over).
template <typename T>
__device__ void rope(T* yq, T* yk, T* yv, const T* xq, const T* xk, const T* xv, const int* positions,
                     const float* inv_freq, size_t n, int heads_q, int heads_k, int heads_v, int head_dim,
                     int packed_x, int packed_y, float direction) {
    if (packed_x) xk = xq + heads_q * head_dim, xv = xk + heads_k * head_dim;
    if (packed_y) yk = yq + heads_q * head_dim, yv = yk + heads_k * head_dim;
    rope_rows<T>(yq, yk, yv, xq, xk, xv, row_strides(packed_x, heads_q, heads_k, heads_v, head_dim),
                 row_strides(packed_y, heads_q, heads_k, heads_v, head_dim), positions, inv_freq, n, heads_q,
                 heads_k, heads_v, head_dim, direction);
}

#define ROPE_INSTANTIATE(SUFFIX, T)                                                                                \
    extern "C" __global__ void rope_fwd_##SUFFIX(T* yq, T* yk, T* yv, const T* xq, const T* xk, const T* xv,      \
                                                 const int* positions, const float* inv_freq, size_t n,           \
                                                 int heads_q, int heads_k, int heads_v, int head_dim,             \
                                                 int packed_x, int packed_y) {                                    \
        rope<T>(yq, yk, yv, xq, xk, xv, positions, inv_freq, n, heads_q, heads_k, heads_v, head_dim, packed_x,    \
                packed_y, 1.0f);                                                                                   \
    }                                                                                                              \
    extern "C" __global__ void rope_bwd_##SUFFIX(T* dxq, T* dxk, T* dxv, const T* dyq, const T* dyk,              \
                                                 const T* dyv, const int* positions, const float* inv_freq,       \
                                                 size_t n, int heads_q, int heads_k, int heads_v, int head_dim,   \
                                                 int packed_x, int packed_y) {                                    \
        rope<T>(dxq, dxk, dxv, dyq, dyk, dyv, positions, inv_freq, n, heads_q, heads_k, heads_v, head_dim,        \
                packed_x, packed_y, -1.0f);                                                                        \
    }

ROPE_INSTANTIATE(f32, float)
ROPE_INSTANTIATE(bf16, bf16)
