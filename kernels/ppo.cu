// PPO (InstructGPT form, TRL's conventions): KL-penalised rewards, GAE, masked whitening, the clipped
// policy and value losses, and their gradients.
//
// Rows are responses [B, T]; mask = 1 on response tokens, a prefix of the row.
// 1. ppo_gae (one block per row, a reverse scan over its tokens in shared-memory chunks):
//      r[t] = -kl_coef * kl[t] (+ score on the last mask token), 0 past the end, with the per-token KL
//      estimate kl = k1 = old_lp - ref_lp (kl_kind 1) or k3 = exp(ref - old) - 1 - (ref - old) (kl_kind 3)
//      delta = r[t] + gamma * V[t+1] - V[t];  A[t] = delta + gamma * lam * A[t+1];  V = 0 past the end
//      returns = A + V; and the row's (count, mean, M2) of A over the mask for the whitening.
// 2. ppo_whiten (one block per row): merges every row's (count, mean, M2) with Chan's formula (no
//      atomics, the same order in every block), then A_w = (A - mean) * rsqrt(var_unbiased + 1e-8), 0
//      off the mask.
// 3. ppo_loss_rows (one block per row): ratio = exp(new_lp - old_lp);
//      pg = max(-A_w * ratio, -A_w * clip(ratio, 1 +- eps)),  vf = max((V' - R)^2, (clipV - R)^2)
//      with the row's sums of pg, vf, clipped count and (new_lp - old_lp)^2, and the gradients
//      d/d new_lp = mask/M * (-A_w * ratio) where the unclipped term is the max, else 0;
//      d/d V'     = vf_coef * mask/M * (V' - R) where the unclipped term is the max, else 0.
// 4. ppo_loss_total (one block): pg_loss = sum pg / M, vf_loss = sum vf / (2M), loss = pg + vf_coef*vf,
//      clip fraction, approx KL = mean (new - old)^2 / 2.
#include "common.cuh"

// Chan et al.'s pairwise merge of (count, mean, M2).
__device__ __forceinline__ void merge_stats(float& n, float& mean, float& m2, float nb, float meanb, float m2b) {
    if (nb == 0.0f) return;
    const float total = n + nb;
    const float d = meanb - mean;
    mean += d * nb / total;
    m2 += m2b + d * d * n * nb / total;
    n = total;
}

// GAE runs one block per row over chunks of GAE_CHUNK tokens from the end: the block loads a chunk and
// forms its rewards in parallel, one thread runs the reverse recurrence (and the chunk's Welford
// statistics) from shared memory, and the block writes the chunk's advantages and returns. A thread
// per row walking global memory, as before, paid a memory latency per token.
constexpr int GAE_THREADS = 256;  // must equal the launcher's (src/ops/ppo.rs)
constexpr int GAE_CHUNK = 1024;

extern "C" __global__ void __launch_bounds__(GAE_THREADS)
    ppo_gae(float* __restrict__ rewards,        // [B, T]
            float* __restrict__ advantages,     // [B, T]
            float* __restrict__ returns,        // [B, T]
            float* __restrict__ stats,          // [B, 3] count, mean, M2 of A
            const float* __restrict__ old_lp,   // [B, T]
            const float* __restrict__ ref_lp,   // [B, T]
            const float* __restrict__ values,   // [B, T]
            const float* __restrict__ scores,   // [B]
            const float* __restrict__ mask,     // [B, T]
            int B, int T, float kl_coef, float gamma, float lam, int kl_kind) {
    __shared__ float rs[GAE_CHUNK], vs[GAE_CHUNK], as[GAE_CHUNK], ms[GAE_CHUNK];
    __shared__ int last_warp[GAE_THREADS / 32];
    const int row = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t o = (size_t)row * T;
    // The last response token: the largest t with mask > 0 (-1 for an empty row).
    int last = -1;
    for (int t = threadIdx.x; t < T; t += blockDim.x)
        if (mask[o + t] > 0.0f) last = t;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, off));
    if (lane == 0) last_warp[warp] = last;
    __syncthreads();
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) last = max(last, last_warp[w]);

    float next_value = 0.0f, next_adv = 0.0f;  // thread 0's carry across chunks
    float n = 0.0f, mean = 0.0f, m2 = 0.0f;    // thread 0's statistics of the row
    for (int end = T; end > 0; end -= GAE_CHUNK) {
        const int c0 = max(0, end - GAE_CHUNK), len = end - c0;
        __syncthreads();  // the previous chunk's shared arrays are consumed
        for (int j = threadIdx.x; j < len; j += blockDim.x) {
            const size_t i = o + c0 + j;
            const bool on = mask[i] > 0.0f;
            float r = 0.0f;
            if (on) {
                const float logr = ref_lp[i] - old_lp[i];
                r = -kl_coef * (kl_kind == 3 ? expm1f(logr) - logr : -logr);
                if (c0 + j == last) r += scores[row];
            }
            rewards[i] = r;
            rs[j] = r;
            vs[j] = on ? values[i] : 0.0f;
            ms[j] = on ? 1.0f : 0.0f;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            //   delta = r[t] + gamma * V[t+1] - V[t];  A[t] = delta + gamma * lam * A[t+1];  0 off the mask
            for (int j = len - 1; j >= 0; --j) {
                if (ms[j] == 0.0f) {
                    as[j] = 0.0f;
                    next_value = 0.0f;
                    next_adv = 0.0f;
                    continue;
                }
                const float v = vs[j];
                const float a = rs[j] + gamma * next_value - v + gamma * lam * next_adv;
                as[j] = a;
                next_value = v;
                next_adv = a;
            }
            // Welford over the chunk's masked advantages, merged into the row's.
            float cn = 0.0f, cmean = 0.0f, cm2 = 0.0f;
            for (int j = 0; j < len; ++j) {
                if (ms[j] == 0.0f) continue;
                const float a = as[j];
                cn += 1.0f;
                const float d = a - cmean;
                cmean += d / cn;
                cm2 += d * (a - cmean);
            }
            merge_stats(n, mean, m2, cn, cmean, cm2);
        }
        __syncthreads();
        for (int j = threadIdx.x; j < len; j += blockDim.x) {
            const size_t i = o + c0 + j;
            advantages[i] = as[j];
            returns[i] = ms[j] != 0.0f ? as[j] + vs[j] : 0.0f;
        }
    }
    if (threadIdx.x == 0) {
        stats[row * 3 + 0] = n;
        stats[row * 3 + 1] = mean;
        stats[row * 3 + 2] = m2;
    }
}

extern "C" __global__ void ppo_whiten(float* __restrict__ whitened,          // [B, T]
                                      float* __restrict__ moments,           // [2] mean, unbiased var
                                      const float* __restrict__ advantages,  // [B, T]
                                      const float* __restrict__ stats,       // [B, 3]
                                      const float* __restrict__ mask,        // [B, T]
                                      int B, int T, float eps) {
    __shared__ float mv[2];
    if (threadIdx.x == 0) {
        float n = 0.0f, mean = 0.0f, m2 = 0.0f;
        for (int r = 0; r < B; ++r) merge_stats(n, mean, m2, stats[r * 3], stats[r * 3 + 1], stats[r * 3 + 2]);
        mv[0] = mean;
        mv[1] = n > 1.0f ? m2 / (n - 1.0f) : 0.0f;
        if (blockIdx.x == 0) {
            moments[0] = mv[0];
            moments[1] = mv[1];
        }
    }
    __syncthreads();
    const float mean = mv[0], inv_std = rsqrtf(mv[1] + eps);
    const size_t o = (size_t)blockIdx.x * T;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        whitened[o + t] = mask[o + t] > 0.0f ? (advantages[o + t] - mean) * inv_std : 0.0f;
    }
}

extern "C" __global__ void ppo_loss_rows(float* __restrict__ grad_lp,          // [B, T]
                                         float* __restrict__ grad_v,           // [B, T]
                                         float* __restrict__ row_sums,         // [B, 5] pg, vf, clipped, kl2, count
                                         const float* __restrict__ new_lp,     // [B, T]
                                         const float* __restrict__ new_v,      // [B, T]
                                         const float* __restrict__ old_lp,     // [B, T]
                                         const float* __restrict__ old_v,      // [B, T]
                                         const float* __restrict__ adv,        // [B, T] whitened
                                         const float* __restrict__ returns,    // [B, T]
                                         const float* __restrict__ mask,       // [B, T]
                                         const float* __restrict__ total_count,// [1] sum of mask
                                         int T, float cliprange, float cliprange_value, float vf_coef) {
    __shared__ float scratch[32];
    const size_t o = (size_t)blockIdx.x * T;
    const float inv_m = 1.0f / total_count[0];
    float pg_sum = 0.0f, vf_sum = 0.0f, clipped = 0.0f, kl2 = 0.0f, count = 0.0f;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const size_t i = o + t;
        const float m = mask[i];
        if (m <= 0.0f) {
            grad_lp[i] = 0.0f;
            grad_v[i] = 0.0f;
            continue;
        }
        const float diff = new_lp[i] - old_lp[i];
        const float ratio = expf(diff);
        const float a = adv[i];
        const float pg1 = -a * ratio;
        const float pg2 = -a * fminf(fmaxf(ratio, 1.0f - cliprange), 1.0f + cliprange);
        const float v = new_v[i], ov = old_v[i], R = returns[i];
        const float vclip = ov + fminf(fmaxf(v - ov, -cliprange_value), cliprange_value);
        const float vf1 = (v - R) * (v - R), vf2 = (vclip - R) * (vclip - R);
        pg_sum += m * fmaxf(pg1, pg2);
        vf_sum += m * fmaxf(vf1, vf2);
        clipped += m * (pg2 > pg1 ? 1.0f : 0.0f);
        kl2 += m * diff * diff;
        count += m;
        grad_lp[i] = pg1 >= pg2 ? m * inv_m * pg1 : 0.0f;
        grad_v[i] = vf1 >= vf2 ? vf_coef * m * inv_m * (v - R) : 0.0f;
    }
    pg_sum = block_sum(pg_sum, scratch);
    vf_sum = block_sum(vf_sum, scratch);
    clipped = block_sum(clipped, scratch);
    kl2 = block_sum(kl2, scratch);
    count = block_sum(count, scratch);
    if (threadIdx.x == 0) {
        float* s = row_sums + (size_t)blockIdx.x * 5;
        s[0] = pg_sum;
        s[1] = vf_sum;
        s[2] = clipped;
        s[3] = kl2;
        s[4] = count;
    }
}

// One block: out = [loss, pg_loss, vf_loss, clip_fraction, approx_kl].
extern "C" __global__ void ppo_loss_total(float* __restrict__ out, const float* __restrict__ row_sums, int B,
                                          float vf_coef) {
    __shared__ float scratch[32];
    float s[5] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int r = threadIdx.x; r < B; r += blockDim.x)
        for (int k = 0; k < 5; ++k) s[k] += row_sums[(size_t)r * 5 + k];
    for (int k = 0; k < 5; ++k) s[k] = block_sum(s[k], scratch);
    if (threadIdx.x == 0) {
        const float m = s[4];
        const float pg = s[0] / m, vf = 0.5f * s[1] / m;
        out[0] = pg + vf_coef * vf;
        out[1] = pg;
        out[2] = vf;
        out[3] = s[2] / m;
        out[4] = 0.5f * s[3] / m;
    }
}

// The total mask count for ppo_loss_rows, one block.
extern "C" __global__ void ppo_mask_count(float* __restrict__ count, const float* __restrict__ mask, int n) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += mask[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) count[0] = s;
}
