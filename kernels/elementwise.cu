// Elementwise plumbing of the transformer: residual adds, dtype casts, bias add and its gradient.
//
//   add:        out = a + b                       (out may alias a: a += b)
//   cast:       f32 <-> bf16 (round to nearest even)
//   bias_add:   x[n, c] += bias[c]                (in place)
//   bias_grad:  dbias[c] += sum_n dy[n, c]        (accumulated, f32; one thread per column, rows in
//               order, so deterministic)
#include "common.cuh"

#define GRID_STRIDE(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// add and the casts walk 16-byte vectors (grid_stride_vec), unaligned buffers element by element.
template <typename T>
__device__ void add(T* out, const T* a, const T* b, size_t n) {
    constexpr int N = Vec16<T>::N;
    grid_stride_vec<N>(
        n, aligned16(out, a, b),
        [&](size_t i) {
            float x[N], y[N];
            load16_coherent(a + i, x);  // out may be a
            load16_coherent(b + i, y);
#pragma unroll
            for (int j = 0; j < N; ++j) x[j] += y[j];
            store16(out + i, x);
        },
        [&](size_t i) { out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i])); });
}

template <typename T>
__device__ void bias_add(T* x, const T* bias, size_t rows, int cols) {
    GRID_STRIDE(i, rows * cols) x[i] = from_f32<T>(to_f32(x[i]) + to_f32(bias[i % cols]));
}

template <typename T>
__device__ void bias_grad(float* __restrict__ dbias, const T* __restrict__ dy, int rows, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += to_f32(dy[(size_t)r * cols + c]);
    dbias[c] += s;
}

extern "C" __global__ void cast_f32_to_bf16(bf16* __restrict__ out, const float* __restrict__ x, size_t n) {
    grid_stride_vec<4>(
        n, aligned16(out, x),
        [&](size_t i) {
            float f[4];
            load16(x + i, f);
            store_n<bf16, 4>(out + i, f);
        },
        [&](size_t i) { out[i] = __float2bfloat16_rn(x[i]); });
}

extern "C" __global__ void cast_bf16_to_f32(float* __restrict__ out, const bf16* __restrict__ x, size_t n) {
    grid_stride_vec<8>(
        n, aligned16(out, x),
        [&](size_t i) {
            float f[8];
            load16(x + i, f);
            store16(out + i, f);
            store16(out + i + 4, f + 4);
        },
        [&](size_t i) { out[i] = __bfloat162float(x[i]); });
}

#define ELEMENTWISE_INSTANTIATE(SUFFIX, T)                                                                    \
    extern "C" __global__ void add_##SUFFIX(T* out, const T* a, const T* b, size_t n) { add<T>(out, a, b, n); } \
    extern "C" __global__ void bias_add_##SUFFIX(T* x, const T* bias, size_t rows, int cols) {               \
        bias_add<T>(x, bias, rows, cols);                                                                     \
    }                                                                                                         \
    extern "C" __global__ void bias_grad_##SUFFIX(float* dbias, const T* dy, int rows, int cols) {           \
        bias_grad<T>(dbias, dy, rows, cols);                                                                  \
    }

ELEMENTWISE_INSTANTIATE(f32, float)
ELEMENTWISE_INSTANTIATE(bf16, bf16)
