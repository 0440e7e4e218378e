// Fused AdamW on f32 master weights, with global-norm gradient clipping.
//
// 1. grad_sumsq: per-block partial sums of g^2 over one gradient buffer (fixed grid, so the sum is
//    deterministic); the host adds the partials of every parameter, takes the norm and the clip
//    coefficient min(1, max_norm / (norm + 1e-6)).
// 2. adamw_step, per element (decoupled weight decay, as torch.optim.AdamW):
//      g = grad * clip;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//      w = w * (1 - lr * wd) - lr * (m / bc1) / (sqrt(v / bc2) + eps)
//    and, when `copy` is given, writes w rounded to bf16 for the forward pass.
//
// Shapes: w, grad, m, v [n] f32; copy [n] bf16 or null; partial [gridDim.x] f32.
#include "common.cuh"

extern "C" __global__ void grad_sumsq(float* __restrict__ partial, const float* __restrict__ grad, size_t n) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = grad[i];
        s += g * g;
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

extern "C" __global__ void adamw_step(float* __restrict__ w, float* __restrict__ m, float* __restrict__ v,
                                      bf16* __restrict__ copy, const float* __restrict__ grad, size_t n, float lr,
                                      float beta1, float beta2, float eps, float weight_decay, float bias_c1,
                                      float bias_c2, float clip) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = grad[i] * clip;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float wi = w[i] * (1.0f - lr * weight_decay) - lr * (mi / bias_c1) / (sqrtf(vi / bias_c2) + eps);
        w[i] = wi;
        if (copy) copy[i] = __float2bfloat16_rn(wi);
    }
}
