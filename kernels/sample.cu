// Sampling one token per row of logits on the device, so that generation copies B tokens and their
// log-probs to the host instead of B rows of logits, and the host does no per-token work.
//
// Plain temperature sampling inverts the CDF in vocabulary order with a uniform u drawn on the host
// per row, the rule of the CPU reference (src/ops/sample.rs): weights w_v = exp((x_v - max) / T),
// pick the first v whose running sum of w exceeds u * sum(w). Greedy (T = 0) picks the argmax, the
// lowest index among equal maxima. The log-prob returned is under softmax(x / T) (T = 1 when greedy).
// Sampling has no backward: nothing differentiates through the choice of a token.
//
// One block per row. Each thread owns a contiguous chunk of the row and sums its weights in double;
// a block-wide exclusive scan of the chunk sums places each chunk in the CDF, and the first thread
// whose chunk ends past u * total walks it. Double sums keep the pick within rounding of the reference's (which
// sums in double in another order): a token can differ only where u * total falls within that
// rounding of a CDF step.
#include "common.cuh"

#include <limits.h>

// The block size the launcher uses (src/ops/sample.rs): a whole number of warps, at most 1024.
constexpr int SAMPLE_THREADS = 1024;
constexpr int SAMPLE_WARPS = SAMPLE_THREADS / 32;

__device__ __forceinline__ double warp_inclusive_scan(double v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const double o = __shfl_up_sync(0xffffffffu, v, offset);
        if (lane >= offset) v += o;
    }
    return v;
}

// The exclusive prefix sum of `v` over the block's threads, and the block's total in `total`.
__device__ __forceinline__ double block_exclusive_scan(double v, double* warp_sums, double& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const double inclusive = warp_inclusive_scan(v);
    if (lane == 31) warp_sums[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
        const double w = lane < SAMPLE_WARPS ? warp_sums[lane] : 0.0;
        const double scanned = warp_inclusive_scan(w);
        if (lane < SAMPLE_WARPS) warp_sums[lane] = scanned - w;  // exclusive, per warp
        if (lane == SAMPLE_WARPS - 1) warp_sums[SAMPLE_WARPS] = scanned;
    }
    __syncthreads();
    total = warp_sums[SAMPLE_WARPS];
    return warp_sums[warp] + inclusive - v;
}

// The (value, index) with the largest value, the lowest index among equals, over the block.
__device__ __forceinline__ int block_argmax(float v, int i, float* vals, int* idxs) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    auto better = [](float a, int ia, float b, int ib) { return b > a || (b == a && ib < ia); };
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, offset);
        const int oi = __shfl_xor_sync(0xffffffffu, i, offset);
        if (better(v, i, ov, oi)) v = ov, i = oi;
    }
    if (lane == 0) vals[warp] = v, idxs[warp] = i;
    __syncthreads();
    if (warp == 0) {
        v = lane < SAMPLE_WARPS ? vals[lane] : -INFINITY;
        i = lane < SAMPLE_WARPS ? idxs[lane] : INT_MAX;
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, v, offset);
            const int oi = __shfl_xor_sync(0xffffffffu, i, offset);
            if (better(v, i, ov, oi)) v = ov, i = oi;
        }
        if (lane == 0) idxs[0] = i;
    }
    __syncthreads();
    return idxs[0];
}

template <typename T>
__device__ void sample_plain(int* __restrict__ token,       // [B]
                             float* __restrict__ logp,      // [B]
                             const T* __restrict__ logits,  // [B, V]
                             const double* __restrict__ u,  // [B], in [0, 1)
                             int V, float inv_t, int greedy) {
    __shared__ float fscratch[SAMPLE_WARPS];
    __shared__ int iscratch[SAMPLE_WARPS];
    __shared__ double warp_sums[SAMPLE_WARPS + 1];
    __shared__ int picked, walker;
    const size_t row = blockIdx.x;
    const T* x = logits + row * V;
    const int chunk = (V + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const int c0 = min(static_cast<int>(threadIdx.x) * chunk, V), c1 = min(c0 + chunk, V);

    // The row's max, and each chunk's first largest entry (for greedy). A chunk starts from its first
    // entry, so a row of -inf still names a token; NaN never wins.
    float best = -INFINITY;
    int best_i = c0 < c1 ? c0 : INT_MAX;
    for (int i = c0; i < c1; ++i) {
        const float v = to_f32(x[i]);
        if (v > best) best = v, best_i = i;
    }
    const int arg = block_argmax(best, best_i, fscratch, iscratch);
    const float m = to_f32(x[arg]);

    double mine = 0.0;
    int last_positive = -1;
    for (int i = c0; i < c1; ++i) {
        const float w = expf((to_f32(x[i]) - m) * inv_t);
        mine += w;
        if (w > 0.0f) last_positive = i;
    }
    double total;
    const double start = block_exclusive_scan(mine, warp_sums, total);
    const double target = u[row] * total;
    if (threadIdx.x == 0) {
        picked = greedy ? arg : INT_MAX;
        walker = INT_MAX;
    }
    __syncthreads();
    if (!greedy) {
        // The walker is the first chunk that ends past the target. Rounding may put the target a
        // hair before that chunk's start or past its walked end; it then takes the chunk's first or
        // last token with weight, a step that touches the target within rounding.
        if (mine > 0.0 && target < start + mine) atomicMin(&walker, static_cast<int>(threadIdx.x));
        __syncthreads();
        if (walker == static_cast<int>(threadIdx.x)) {
            double run = start;
            int pick = last_positive;
            for (int i = c0; i < c1; ++i) {
                const float w = expf((to_f32(x[i]) - m) * inv_t);
                run += w;
                if (w > 0.0f && target < run) {
                    pick = i;
                    break;
                }
            }
            picked = pick;
        }
    }
    __syncthreads();
    if (picked == INT_MAX) {
        // u * total at or past the rounded total: the last token with weight, as the reference does.
        // Indices below 2^24 are exact in float.
        const int last = static_cast<int>(block_max(static_cast<float>(last_positive), fscratch));
        // No token with weight at all (a row of -inf or NaN): the argmax, as a defined answer.
        if (threadIdx.x == 0) picked = last >= 0 ? last : arg;
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        token[row] = picked;
        logp[row] = static_cast<float>(static_cast<double>((to_f32(x[picked]) - m) * inv_t) - log(total));
    }
}

#define SAMPLE_KERNELS(T, SUFFIX)                                                                       \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_plain_##SUFFIX(                \
        int* token, float* logp, const T* logits, const double* u, int V, float inv_t, int greedy) {    \
        sample_plain<T>(token, logp, logits, u, V, inv_t, greedy);                                      \
    }

SAMPLE_KERNELS(float, f32)
SAMPLE_KERNELS(bf16, bf16)
