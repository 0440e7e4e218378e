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
//
// The residual variants fold in the transformer's residual add, a pass over the rows each: the
// forward (add_rms_norm_fwd) takes x and a delta, writes h = x + delta (rounded to T, as an add
// kernel would) and normalises that h; the backward (rms_norm_bwd_add) adds a residual gradient to
// dx before its one rounding.
// dw is reduced deterministically: each backward block sums its rows (in registers on the vector path,
// in shared memory otherwise) and writes one partial row; `rms_norm_dweight_reduce` then adds the
// partials in a fixed order. No atomics, so two runs give bitwise-equal gradients.
#include "common.cuh"

// Rows that are 16-byte aligned and at most kNormMaxVecs vectors per thread take the vector path:
// thread t owns vectors t, t + blockDim.x, ... of every row, so one 16-byte load per vector brings the
// whole row into registers (no second read), and in the backward the weight and this block's dweight
// share stay in registers across rows. Other shapes take the scalar loops. The host sizes the block
// to the row (src/ops/norm.rs, block_threads).
constexpr int kNormMaxVecs = 2;

template <typename T>
__device__ __forceinline__ bool norm_vector_path(int cols) {
    constexpr int N = Vec16<T>::N;
    return cols % N == 0 && cols / N <= kNormMaxVecs * (int)blockDim.x;
}

// x + delta as T stores it.
template <typename T>
__device__ __forceinline__ float residual_sum(float x, float delta) {
    return to_f32(from_f32<T>(x + delta));
}

// RES: x is the sum x + delta, written to h first (h and delta are unused otherwise).
template <typename T, bool RES>
__device__ void rms_norm_fwd(T* __restrict__ y,             // [rows, cols]
                             float* __restrict__ rstd,      // [rows]
                             T* __restrict__ h,             // [rows, cols], RES only
                             const T* __restrict__ x,       // [rows, cols]
                             const T* __restrict__ delta,   // [rows, cols], RES only
                             const T* __restrict__ weight,  // [cols]
                             int cols, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T* xr = x + row * cols;
    T* yr = y + row * cols;
    if (norm_vector_path<T>(cols)) {
        constexpr int N = Vec16<T>::N;
        float v[kNormMaxVecs][N];
        float sumsq = 0.0f;
#pragma unroll
        for (int k = 0; k < kNormMaxVecs; ++k) {
            const int c = (threadIdx.x + k * blockDim.x) * N;
            if (c < cols) {
                load16(xr + c, v[k]);
                if constexpr (RES) {
                    float d[N];
                    load16(delta + row * cols + c, d);
#pragma unroll
                    for (int j = 0; j < N; ++j) v[k][j] = residual_sum<T>(v[k][j], d[j]);
                    store16(h + row * cols + c, v[k]);
                }
#pragma unroll
                for (int j = 0; j < N; ++j) sumsq += v[k][j] * v[k][j];
            }
        }
        sumsq = block_sum(sumsq, scratch);
        const float r = rsqrtf(sumsq / (float)cols + eps);
        if (threadIdx.x == 0) rstd[row] = r;
#pragma unroll
        for (int k = 0; k < kNormMaxVecs; ++k) {
            const int c = (threadIdx.x + k * blockDim.x) * N;
            if (c < cols) {
                float w[N];
                load16(weight + c, w);
#pragma unroll
                for (int j = 0; j < N; ++j) v[k][j] = v[k][j] * r * w[j];
                store16(yr + c, v[k]);
            }
        }
        return;
    }
    // 1. Sum of squares over the row (with RES, h written on the way).
    float sumsq = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = to_f32(xr[c]);
        if constexpr (RES) {
            v = residual_sum<T>(v, to_f32(delta[row * cols + c]));
            h[row * cols + c] = from_f32<T>(v);
        }
        sumsq += v * v;
    }
    sumsq = block_sum(sumsq, scratch);
    const float r = rsqrtf(sumsq / (float)cols + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    // 2. Scale; the second read of the row is served from L1/L2 (each thread rereads what it wrote).
    const T* src = RES ? h + row * cols : xr;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        yr[c] = from_f32<T>(to_f32(src[c]) * r * to_f32(weight[c]));
    }
}

template <typename T, bool RES>
__device__ void rms_norm_bwd_vec(T* __restrict__ dx, float* __restrict__ dw_partial, const T* __restrict__ dy,
                                 const T* __restrict__ x, const T* __restrict__ weight,
                                 const float* __restrict__ rstd, const T* __restrict__ dres, int rows, int cols,
                                 float* scratch) {
    constexpr int N = Vec16<T>::N;
    const float inv_cols = 1.0f / (float)cols;
    float w[kNormMaxVecs][N], dw[kNormMaxVecs][N];
#pragma unroll
    for (int k = 0; k < kNormMaxVecs; ++k) {
        const int c = (threadIdx.x + k * blockDim.x) * N;
#pragma unroll
        for (int j = 0; j < N; ++j) w[k][j] = dw[k][j] = 0.0f;
        if (c < cols) load16(weight + c, w[k]);
    }
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const T* xr = x + (size_t)row * cols;
        const T* dyr = dy + (size_t)row * cols;
        T* dxr = dx + (size_t)row * cols;
        const float r = rstd[row];
        float xv[kNormMaxVecs][N], gv[kNormMaxVecs][N];
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < kNormMaxVecs; ++k) {
            const int c = (threadIdx.x + k * blockDim.x) * N;
            if (c < cols) {
                load16(xr + c, xv[k]);
                load16(dyr + c, gv[k]);
#pragma unroll
                for (int j = 0; j < N; ++j) dot += gv[k][j] * w[k][j] * xv[k][j];
            }
        }
        dot = block_sum(dot, scratch);
        const float coef = r * r * r * dot * inv_cols;
#pragma unroll
        for (int k = 0; k < kNormMaxVecs; ++k) {
            const int c = (threadIdx.x + k * blockDim.x) * N;
            if (c < cols) {
                float out[N], add[N];
                if constexpr (RES) load16(dres + (size_t)row * cols + c, add);
#pragma unroll
                for (int j = 0; j < N; ++j) {
                    out[j] = r * gv[k][j] * w[k][j] - xv[k][j] * coef;
                    if constexpr (RES) out[j] += add[j];
                    dw[k][j] += gv[k][j] * xv[k][j] * r;
                }
                store16(dxr + c, out);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < kNormMaxVecs; ++k) {
        const int c = (threadIdx.x + k * blockDim.x) * N;
        if (c >= cols) continue;
#pragma unroll
        for (int j = 0; j < N; j += 4) store16(dw_partial + (size_t)blockIdx.x * cols + c + j, &dw[k][j]);
    }
}

// RES: dx also gets dres, the gradient reaching the same tensor through the residual path.
template <typename T, bool RES>
__device__ void rms_norm_bwd(T* __restrict__ dx,                // [rows, cols]
                             float* __restrict__ dw_partial,    // [gridDim.x, cols]
                             const T* __restrict__ dy,          // [rows, cols]
                             const T* __restrict__ x,           // [rows, cols]
                             const T* __restrict__ weight,      // [cols]
                             const float* __restrict__ rstd,    // [rows]
                             const T* __restrict__ dres,        // [rows, cols], RES only
                             int rows, int cols) {
    DYNAMIC_SMEM(float, dw_acc);  // [cols], scalar path only
    __shared__ float scratch[32];
    if (norm_vector_path<T>(cols)) {
        rms_norm_bwd_vec<T, RES>(dx, dw_partial, dy, x, weight, rstd, dres, rows, cols, scratch);
        return;
    }
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
            const float add = RES ? to_f32(dres[(size_t)row * cols + c]) : 0.0f;
            dxr[c] = from_f32<T>(r * dyv * to_f32(weight[c]) - xv * coef + add);
            dw_acc[c] += dyv * xv * r;
        }
    }
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        dw_partial[(size_t)blockIdx.x * cols + c] = dw_acc[c];
    }
}

// dw[c] += sum_p partial[p, c] in a fixed order: a block of 8 warps takes 32 columns; warp w sums
// parts w, w + 8, ... and warp 0 adds the 8 sums in warp order. Enough blocks and loads in flight
// for a 4,096-column, 1,024-part reduce, where one thread per column summing every part left
// most of the card idle.
constexpr int kReduceWarps = 8;

extern "C" __global__ void __launch_bounds__(kReduceWarps * 32)
    rms_norm_dweight_reduce(float* __restrict__ dw,              // [cols], +=
                            const float* __restrict__ partial,   // [parts, cols]
                            int parts, int cols) {
    __shared__ float sums[kReduceWarps][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c = blockIdx.x * 32 + lane;
    float sum = 0.0f;
    if (c < cols) {
#pragma unroll 8
        for (int p = warp; p < parts; p += kReduceWarps) sum += partial[(size_t)p * cols + c];
    }
    sums[warp][lane] = sum;
    __syncthreads();
    if (warp != 0 || c >= cols) return;
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kReduceWarps; ++w) total += sums[w][lane];
    dw[c] += total;
}

#define RMS_NORM_INSTANTIATE(SUFFIX, T)                                                                     \
    extern "C" __global__ void rms_norm_fwd_##SUFFIX(T* y, float* rstd, const T* x, const T* weight,       \
                                                     int cols, float eps) {                                 \
        rms_norm_fwd<T, false>(y, rstd, nullptr, x, nullptr, weight, cols, eps);                            \
    }                                                                                                       \
    extern "C" __global__ void add_rms_norm_fwd_##SUFFIX(T* y, float* rstd, T* h, const T* x,               \
                                                         const T* delta, const T* weight, int cols,         \
                                                         float eps) {                                       \
        rms_norm_fwd<T, true>(y, rstd, h, x, delta, weight, cols, eps);                                     \
    }                                                                                                       \
    extern "C" __global__ void rms_norm_bwd_##SUFFIX(T* dx, float* dw_partial, const T* dy, const T* x,    \
                                                     const T* weight, const float* rstd, int rows,         \
                                                     int cols) {                                            \
        rms_norm_bwd<T, false>(dx, dw_partial, dy, x, weight, rstd, nullptr, rows, cols);                   \
    }                                                                                                       \
    extern "C" __global__ void rms_norm_bwd_add_##SUFFIX(T* dx, float* dw_partial, const T* dy, const T* x, \
                                                         const T* weight, const float* rstd, const T* dres, \
                                                         int rows, int cols) {                              \
        rms_norm_bwd<T, true>(dx, dw_partial, dy, x, weight, rstd, dres, rows, cols);                       \
    }

RMS_NORM_INSTANTIATE(f32, float)
RMS_NORM_INSTANTIATE(bf16, bf16)
