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

__device__ __forceinline__ void adamw_at(float& w, float& m, float& v, float grad, float lr, float beta1,
                                         float beta2, float eps, float weight_decay, float bias_c1, float bias_c2,
                                         float clip) {
    const float g = grad * clip;
    m = beta1 * m + (1.0f - beta1) * g;
    v = beta2 * v + (1.0f - beta2) * g * g;
    w = w * (1.0f - lr * weight_decay) - lr * (m / bias_c1) / (sqrtf(v / bias_c2) + eps);
}

// Four elements a thread per step (16-byte accesses to w, m, v and grad, 8 bytes to the copy) when
// every buffer is aligned, then the last n % 4 one by one.
extern "C" __global__ void adamw_step(float* __restrict__ w, float* __restrict__ m, float* __restrict__ v,
                                      bf16* __restrict__ copy, const float* __restrict__ grad, size_t n, float lr,
                                      float beta1, float beta2, float eps, float weight_decay, float bias_c1,
                                      float bias_c2, float clip) {
    auto step = [&](float& wi, float& mi, float& vi, float g) {
        adamw_at(wi, mi, vi, g, lr, beta1, beta2, eps, weight_decay, bias_c1, bias_c2, clip);
    };
    grid_stride_vec<4>(
        n, aligned16(w, m, v, grad) && (reinterpret_cast<uintptr_t>(copy) & 7) == 0,
        [&](size_t i) {
            REQUIRE_ALIGNED(w + i, 16, "adamw_step w");
            REQUIRE_ALIGNED(m + i, 16, "adamw_step m");
            REQUIRE_ALIGNED(v + i, 16, "adamw_step v");
            REQUIRE_ALIGNED(grad + i, 16, "adamw_step grad");
            float4 wv = *reinterpret_cast<const float4*>(w + i), mv = *reinterpret_cast<const float4*>(m + i);
            float4 vv = *reinterpret_cast<const float4*>(v + i);
            const float4 gv = __ldg(reinterpret_cast<const float4*>(grad + i));
            step(wv.x, mv.x, vv.x, gv.x);
            step(wv.y, mv.y, vv.y, gv.y);
            step(wv.z, mv.z, vv.z, gv.z);
            step(wv.w, mv.w, vv.w, gv.w);
            *reinterpret_cast<float4*>(w + i) = wv;
            *reinterpret_cast<float4*>(m + i) = mv;
            *reinterpret_cast<float4*>(v + i) = vv;
            if (copy) {
                const float out[4] = {wv.x, wv.y, wv.z, wv.w};
                store_n<bf16, 4>(copy + i, out);
            }
        },
        [&](size_t i) {
            float wi = w[i], mi = m[i], vi = v[i];
            step(wi, mi, vi, grad[i]);
            m[i] = mi;
            v[i] = vi;
            w[i] = wi;
            if (copy) copy[i] = __float2bfloat16_rn(wi);
        });
}
