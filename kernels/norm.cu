// RMSNorm, forward and backward.
//
//   y[r, c]  = x[r, c] * rstd[r] * w[c],      rstd[r] = 1 / sqrt(mean_c(x[r, c]^2) + eps)
//
// Backward, with g = dy * w and dot[r] = sum_c g[r, c] * x[r, c]:
//   dx[r, c] = rstd[r] * g[r, c] - x[r, c] * rstd[r]^3 * dot[r] / cols     (overwritten: an activation)
//   dw[c]   += sum_r dy[r, c] * x[r, c] * rstd[r]                           (accumulated: a parameter)
//
// Shapes: x, y, dy, dx [rows, cols] in T (f32 or bf16); w [cols] in T; rstd [rows] f32; dw [cols] f32.
// The forward saves rstd (4 bytes a row) so the backward never recomputes the row's statistics.
// dw is reduced deterministically: each backward block sums its rows into shared memory and writes one
// partial row; `rms_norm_dweight_reduce` then adds the partials in a fixed order. No atomics, so two
// runs give bitwise-equal gradients.
#include "common.cuh"

template <typename T>
__device__ void rms_norm_fwd(T* __restrict__ y,             // [rows, cols]
                             float* __restrict__ rstd,      // [rows]
                             const T* __restrict__ x,       // [rows, cols]
                             const T* __restrict__ weight,  // [cols]
                             int cols, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T* xr = x + row * cols;
    T* yr = y + row * cols;
    // 1. Sum of squares over the row.
    float sumsq = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = to_f32(xr[c]);
        sumsq += v * v;
    }
    sumsq = block_sum(sumsq, scratch);
    const float r = rsqrtf(sumsq / (float)cols + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    // 2. Scale; the second read of the row is served from L1/L2.
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        yr[c] = from_f32<T>(to_f32(xr[c]) * r * to_f32(weight[c]));
    }
}

template <typename T>
__device__ void rms_norm_bwd(T* __restrict__ dx,                // [rows, cols]
                             float* __restrict__ dw_partial,    // [gridDim.x, cols]
                             const T* __restrict__ dy,          // [rows, cols]
                             const T* __restrict__ x,           // [rows, cols]
                             const T* __restrict__ weight,      // [cols]
                             const float* __restrict__ rstd,    // [rows]
                             int rows, int cols) {
    extern __shared__ float dw_acc[];  // [cols]
    __shared__ float scratch[32];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dw_acc[c] = 0.0f;
    const float inv_cols = 1.0f / (float)cols;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + (size_t)row * cols;
        const T* dyr = dy + (size_t)row * cols;
        T* dxr = dx + (size_t)row * cols;
        const float r = rstd[row];
        // 1. dot = sum_c dy * w * x.
        float dot = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            dot += to_f32(dyr[c]) * to_f32(weight[c]) * to_f32(xr[c]);
        }
        dot = block_sum(dot, scratch);
        const float coef = r * r * r * dot * inv_cols;
        // 2. dx and this block's share of dw; thread t owns columns t, t + blockDim.x, ...
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float xv = to_f32(xr[c]);
            const float dyv = to_f32(dyr[c]);
            dxr[c] = from_f32<T>(r * dyv * to_f32(weight[c]) - xv * coef);
            dw_acc[c] += dyv * xv * r;
        }
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        dw_partial[(size_t)blockIdx.x * cols + c] = dw_acc[c];
    }
}

extern "C" __global__ void rms_norm_dweight_reduce(float* __restrict__ dw,               // [cols], +=
                                                   const float* __restrict__ partial,   // [parts, cols]
                                                   int parts, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float sum = 0.0f;
    for (int p = 0; p < parts; ++p) sum += partial[(size_t)p * cols + c];
    dw[c] += sum;
}

#define RMS_NORM_INSTANTIATE(SUFFIX, T)                                                                   \
    extern "C" __global__ void rms_norm_fwd_##SUFFIX(T* y, float* rstd, const T* x, const T* weight,     \
                                                     int cols, float eps) {                               \
        rms_norm_fwd<T>(y, rstd, x, weight, cols, eps);                                                   \
    }                                                                                                     \
    extern "C" __global__ void rms_norm_bwd_##SUFFIX(T* dx, float* dw_partial, const T* dy, const T* x,  \
                                                     const T* weight, const float* rstd, int rows,       \
                                                     int cols) {                                          \
        rms_norm_bwd<T>(dx, dw_partial, dy, x, weight, rstd, rows, cols);                                 \
    }

RMS_NORM_INSTANTIATE(f32, float)
RMS_NORM_INSTANTIATE(bf16, bf16)
