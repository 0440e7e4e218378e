// Fused log-softmax-gather: per-token log p(target), logsumexp and entropy, and the backward.
//
// Forward, per row of z = scale * logits (scale = 1 / temperature):
//   lse = log sum_v exp(z_v),  logp = z[target] - lse,  H = -sum_v p_v log p_v = lse - sum_v p_v z_v
// One read of the row: an online softmax keeps (m, s, t) = (running max, sum e^(z-m), sum e^(z-m)(z-m)),
// so lse = m + log s and H = log s - t / s (relative to m, so logits near +-1e4 lose no precision).
// The softmax is never stored.
//
// Backward of L = sum_rows g_lp * logp + g_ent * H with respect to logits (overwritten):
//   dlogits_v = scale * ( g_lp * (onehot_v - p_v) - g_ent * p_v * (log p_v + H) ),  p_v = exp(z_v - lse)
// One read of the row and one write, from the saved lse and H.
//
// A negative target is ignored: logp = 0 and g_lp does not reach the logits. A target >= V writes NaN
// into logp, so a bad id is visible rather than silently wrong (the host checks on the CPU path).
//
// The `_chunk` kernels serve the LM-head-fused form (src/ops/logprob.rs): cuBLAS computes logits one
// vocabulary tile at a time into a scratch buffer, and these fold each tile into per-row running state,
// so the [N, V] logits never exist in memory. The tile is in the operands' dtype: bf16 logits (f32
// accumulation, rounded once) as the LM head of an eager bf16 model produces them, half the bytes of
// an f32 tile for the kernels that read it.
#include "common.cuh"

struct EntropyState {
    float m;  // running max
    float s;  // sum e^(z - m)
    float t;  // sum e^(z - m) * (z - m)
};

__host__ __device__ __forceinline__ EntropyState entropy_init() { return {-INFINITY, 0.0f, 0.0f}; }

// Folds N values of z into the state. The max moves at most once per call, so a row pays one rescale
// per vector that raises it (a handful per row) instead of a compare and branch per entry; the rest
// is five instructions an entry. A NaN makes s NaN for good, so bad logits show as NaN outputs.
template <int N>
__host__ __device__ __forceinline__ EntropyState entropy_push(EntropyState a, const float* z) {
    float top = z[0];
#pragma unroll
    for (int j = 1; j < N; ++j) top = fmaxf(top, z[j]);
    if (!(top <= a.m)) {  // a new maximum, or NaN
        if (a.m == -INFINITY) {
            a.m = top;  // s = t = 0 so far
        } else {
            const float shift = a.m - top;
            const float r = exp_ftz(shift);
            a.t = r * (a.t + shift * a.s);
            a.s *= r;
            a.m = top;
        }
    }
    if (a.m == -INFINITY) return a;  // every entry so far is masked out (p = 0)
#pragma unroll
    for (int j = 0; j < N; ++j) {
        const float d = z[j] - a.m;
        const float e = exp_ftz(d);
        a.s += e;
        a.t = fmaf(e, fmaxf(d, kExpUnderflow), a.t);
    }
    return a;
}

__host__ __device__ __forceinline__ EntropyState entropy_merge(EntropyState a, EntropyState b) {
    if (b.m == -INFINITY) return a;
    if (a.m == -INFINITY) return b;
    const float m = fmaxf(a.m, b.m);
    const float ra = exp_ftz(a.m - m), rb = exp_ftz(b.m - m);
    return {m, a.s * ra + b.s * rb, ra * (a.t + (a.m - m) * a.s) + rb * (b.t + (b.m - m) * b.s)};
}

// lse = m + log s and H = log s - t / s.
__host__ __device__ __forceinline__ void entropy_finish(EntropyState st, float* lse, float* entropy) {
    const float log_s = logf(st.s);
    *lse = st.m + log_s;
    *entropy = log_s - st.t / st.s;
}

__device__ __forceinline__ EntropyState warp_entropy(EntropyState v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        EntropyState o{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset),
                       __shfl_xor_sync(0xffffffffu, v.t, offset)};
        v = entropy_merge(v, o);
    }
    return v;
}

// `scratch` holds three floats per warp.
__device__ __forceinline__ EntropyState block_entropy(EntropyState v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_entropy(v);
    __syncthreads();
    if (lane == 0) {
        scratch[3 * warp] = v.m;
        scratch[3 * warp + 1] = v.s;
        scratch[3 * warp + 2] = v.t;
    }
    __syncthreads();
    EntropyState r = lane < warps ? EntropyState{scratch[3 * lane], scratch[3 * lane + 1], scratch[3 * lane + 2]}
                                  : entropy_init();
    return warp_entropy(r);
}

// Rows that are not 16-byte aligned are read with this many strided scalar loads per step, so each
// thread still has several loads in flight.
constexpr int kScalarUnroll = 4;

template <typename T, bool SCALED>
__host__ __device__ __forceinline__ void load16_scaled(const T* p, float scale, float* z) {
    load16(p, z);
#pragma unroll
    for (int j = 0; j < Vec16<T>::N; ++j) z[j] = SCALED ? mul_rn(z[j], scale) : z[j];
}

template <typename T, bool SCALED>
__host__ __device__ __forceinline__ void unpack16_scaled(const uint4& raw, float scale, float* z) {
    unpack16<T>(raw, z);
#pragma unroll
    for (int j = 0; j < Vec16<T>::N; ++j) z[j] = SCALED ? mul_rn(z[j], scale) : z[j];
}

// Two vectors `stride` elements apart, both fetched before either is converted: a warp then has
// two 512-byte loads in flight instead of one (ptxas compiled the one-vector loop to one load an
// iteration, the next waiting on this one's arithmetic).
template <typename T, bool SCALED>
__host__ __device__ __forceinline__ void load16x2_scaled(const T* p, int stride, float scale, float* z) {
    constexpr int N = Vec16<T>::N;
    const uint4 a = fetch16(p), b = fetch16(p + stride);
    unpack16_scaled<T, SCALED>(a, scale, z);
    unpack16_scaled<T, SCALED>(b, scale, z + N);
}

// Folds thread `tid`'s share of row x (of `nthreads`) into a state: 16-byte vectors when every row is
// aligned, strided scalars otherwise. z = scale * x is formed as a rounded product (mul_rn), never
// contracted into an FMA with what follows: the backward's log p = z - lse must see the very z the
// forward's lse was built from, or at logits in the thousands the top token's log p becomes the
// product's rounding error (~1e-4) instead of 0. SCALED = false skips the multiply when scale is 1.
template <typename T, bool SCALED>
__host__ __device__ __forceinline__ EntropyState row_state(const T* __restrict__ x, int V, float scale, int tid,
                                                           int nthreads) {
    EntropyState st = entropy_init();
    if (V % Vec16<T>::N == 0) {
        constexpr int N = Vec16<T>::N;
        const int stride = nthreads * N;
        int i = tid * N;
        for (; i + stride < V; i += 2 * stride) {
            float z[2 * N];
            load16x2_scaled<T, SCALED>(x + i, stride, scale, z);
            st = entropy_push<2 * N>(st, z);
        }
        if (i < V) {
            float z[N];
            load16_scaled<T, SCALED>(x + i, scale, z);
            st = entropy_push<N>(st, z);
        }
    } else {
        constexpr int U = kScalarUnroll;
        int i = tid;
        for (; i + (U - 1) * nthreads < V; i += U * nthreads) {
            float z[U];
#pragma unroll
            for (int j = 0; j < U; ++j) {
                const float v = to_f32(x[i + j * nthreads]);
                z[j] = SCALED ? mul_rn(v, scale) : v;
            }
            st = entropy_push<U>(st, z);
        }
        for (; i < V; i += nthreads) {
            const float v = to_f32(x[i]);
            const float z[1] = {SCALED ? mul_rn(v, scale) : v};
            st = entropy_push<1>(st, z);
        }
    }
    return st;
}

template <typename T>
__device__ void logprob_fwd(float* __restrict__ logp,        // [N]
                            float* __restrict__ lse,         // [N]
                            float* __restrict__ entropy,     // [N]
                            const T* __restrict__ logits,    // [N, V]
                            const int* __restrict__ target,  // [N]
                            int V, float scale) {
    __shared__ float scratch[3 * 32];
    const size_t row = blockIdx.x;
    const T* x = logits + row * V;
    const EntropyState mine = scale == 1.0f ? row_state<T, false>(x, V, scale, threadIdx.x, blockDim.x)
                                            : row_state<T, true>(x, V, scale, threadIdx.x, blockDim.x);
    const EntropyState st = block_entropy(mine, scratch);
    if (threadIdx.x == 0) {
        float l, h;
        entropy_finish(st, &l, &h);
        const int tgt = target[row];
        lse[row] = l;
        entropy[row] = h;
        logp[row] = tgt < 0 ? 0.0f : (tgt >= V ? NAN : mul_rn(to_f32(x[tgt]), scale) - l);
    }
}

// d loss / d z of L = g_lp * logp + g_ent * H, folded into per-row constants:
//   dz_v = scale * (g_lp * (onehot_v - p_v) - g_ent * p_v * (log p_v + H))
//        = onehot_v * hit + p_v * (neg_a + neg_b * log p_v)
// with hit = scale * g_lp, neg_a = -scale * (g_lp + g_ent * H), neg_b = -scale * g_ent.
struct LogitGrad {
    float lse, neg_a, neg_b, hit;
};

__host__ __device__ __forceinline__ LogitGrad logit_grad_init(float lse, float entropy, float g_lp, float g_ent,
                                                              float scale) {
    return {lse, -scale * (g_lp + g_ent * entropy), -scale * g_ent, scale * g_lp};
}

// Without the one-hot term. Clamping log p keeps a masked entry's gradient at 0 * finite = 0.
__host__ __device__ __forceinline__ float logit_grad(const LogitGrad& g, float z) {
    const float logp = z - g.lse;
    return exp_ftz(logp) * fmaf(g.neg_b, fmaxf(logp, kExpUnderflow), g.neg_a);
}

// Entries [i, i + N) of one row, in place over their z values, without the one-hot term.
template <int N>
__host__ __device__ __forceinline__ void logit_grad_vec(const LogitGrad& g, float* z) {
#pragma unroll
    for (int j = 0; j < N; ++j) z[j] = logit_grad(g, z[j]);
}

// The thread that writes entry `idx` of a row in row_grad / tile_grad: it alone adds the target's
// one-hot term afterwards, so program order keeps its two writes of that entry apart.
__host__ __device__ __forceinline__ bool writes_entry(int idx, bool vec, int width, int tid, int nthreads) {
    return (vec ? idx / width : idx) % nthreads == tid;
}

// Thread `tid`'s share of one row's gradient: dx = d loss / d x for x = logits (z = scale * x).
template <typename T, bool SCALED>
__host__ __device__ __forceinline__ void row_grad(T* __restrict__ dx, const T* __restrict__ x, int V, float scale,
                                                  const LogitGrad& g, int tgt, int tid, int nthreads) {
    if (V % Vec16<T>::N == 0) {
        constexpr int N = Vec16<T>::N;
        const int stride = nthreads * N;
        int i = tid * N;
        for (; i + stride < V; i += 2 * stride) {
            // Both loads in flight, then one vector's values live at a time.
            const uint4 first = fetch16(x + i), second = fetch16(x + i + stride);
            float z[N];
            unpack16_scaled<T, SCALED>(first, scale, z);
            logit_grad_vec<N>(g, z);
            store16(dx + i, z);
            unpack16_scaled<T, SCALED>(second, scale, z);
            logit_grad_vec<N>(g, z);
            store16(dx + i + stride, z);
        }
        if (i < V) {
            float z[N];
            load16_scaled<T, SCALED>(x + i, scale, z);
            logit_grad_vec<N>(g, z);
            store16(dx + i, z);
        }
    } else {
#pragma unroll kScalarUnroll
        for (int i = tid; i < V; i += nthreads) {
            const float v = to_f32(x[i]);
            dx[i] = from_f32<T>(logit_grad(g, SCALED ? mul_rn(v, scale) : v));
        }
    }
    if (tgt >= 0 && tgt < V && writes_entry(tgt, V % Vec16<T>::N == 0, Vec16<T>::N, tid, nthreads)) {
        const float v = to_f32(x[tgt]);
        dx[tgt] = from_f32<T>(logit_grad(g, SCALED ? mul_rn(v, scale) : v) + g.hit);
    }
}

template <typename T>
__device__ void logprob_bwd(T* __restrict__ dlogits,              // [N, V]
                            const T* __restrict__ logits,         // [N, V]
                            const int* __restrict__ target,       // [N]
                            const float* __restrict__ lse,        // [N]
                            const float* __restrict__ entropy,    // [N]
                            const float* __restrict__ grad_logp,  // [N]
                            const float* __restrict__ grad_ent,   // [N]
                            int V, float scale) {
    const size_t row = blockIdx.x;
    const int tgt = target[row];
    const LogitGrad g = logit_grad_init(lse[row], entropy[row], tgt < 0 ? 0.0f : grad_logp[row], grad_ent[row], scale);
    if (scale == 1.0f) {
        row_grad<T, false>(dlogits + row * V, logits + row * V, V, scale, g, tgt, threadIdx.x, blockDim.x);
    } else {
        row_grad<T, true>(dlogits + row * V, logits + row * V, V, scale, g, tgt, threadIdx.x, blockDim.x);
    }
}

// The tile kernels give each row a warp, CHUNK_ROWS rows a block: a tile is only Vc = 16 Mi / N
// entries wide (512 at N = 32,768), so a 512-thread block per row left most of its threads idle and
// paid a block launch and two barriers per row.
constexpr int CHUNK_ROWS = 8;  // warps per block; must equal the launcher's (src/ops/logprob.rs)

// One vocabulary tile [v0, v0 + Vc) of z (already scaled by cuBLAS) folded into the running
// per-row state; the last tile writes logp, lse and entropy.
template <typename Z>
__device__ void logprob_chunk_fwd(float* __restrict__ state,        // [N, 3] (m, s, t)
                                  float* __restrict__ target_z,     // [N]
                                  float* __restrict__ logp,         // [N]
                                  float* __restrict__ lse,          // [N]
                                  float* __restrict__ entropy,      // [N]
                                  const Z* __restrict__ z,          // [N, Vc]
                                  const int* __restrict__ target,   // [N]
                                  int N, int Vc, int v0, int V, int first, int last) {
    const int lane = threadIdx.x & 31;
    const size_t row = (size_t)blockIdx.x * CHUNK_ROWS + (threadIdx.x >> 5);
    if (row >= (size_t)N) return;  // a whole warp: no barrier follows
    const Z* zr = z + row * Vc;
    EntropyState st = warp_entropy(row_state<Z, false>(zr, Vc, 1.0f, lane, 32));
    if (lane != 0) return;
    const int tgt = target[row];
    if (!first) st = entropy_merge(EntropyState{state[3 * row], state[3 * row + 1], state[3 * row + 2]}, st);
    float tz = first ? 0.0f : target_z[row];
    if (tgt >= v0 && tgt < v0 + Vc) tz = to_f32(zr[tgt - v0]);
    if (last) {
        float l, h;
        entropy_finish(st, &l, &h);
        lse[row] = l;
        entropy[row] = h;
        logp[row] = tgt < 0 ? 0.0f : (tgt >= V ? NAN : tz - l);
    } else {
        state[3 * row] = st.m;
        state[3 * row + 1] = st.s;
        state[3 * row + 2] = st.t;
        target_z[row] = tz;
    }
}

// Thread `tid`'s share of one tile row: dz from z, unscaled by 1/temperature (the GEMMs that consume
// it apply the scale). `tgt` is relative to the tile, -1 when outside it. `vec`: both rows allow
// W-wide accesses, W = one 16-byte vector of z (z 16-byte, dz W-element aligned).
template <typename T, typename Z>
__host__ __device__ __forceinline__ void tile_grad(T* __restrict__ d, const Z* __restrict__ zr, int Vc,
                                                   const LogitGrad& g, int tgt, bool vec, int tid, int nthreads) {
    constexpr int W = Vec16<Z>::N;
    if (vec) {
        const int stride = nthreads * W;
        int i = tid * W;
        for (; i + stride < Vc; i += 2 * stride) {
            // Both loads in flight, then one vector's values live at a time (registers as before).
            const uint4 first = fetch16(zr + i), second = fetch16(zr + i + stride);
            float z[W];
            unpack16<Z>(first, z);
            logit_grad_vec<W>(g, z);
            store_n<T, W>(d + i, z);
            unpack16<Z>(second, z);
            logit_grad_vec<W>(g, z);
            store_n<T, W>(d + i + stride, z);
        }
        if (i < Vc) {
            float z[W];
            load16(zr + i, z);
            logit_grad_vec<W>(g, z);
            store_n<T, W>(d + i, z);
        }
    } else {
#pragma unroll kScalarUnroll
        for (int i = tid; i < Vc; i += nthreads) d[i] = from_f32<T>(logit_grad(g, to_f32(zr[i])));
    }
    if (tgt >= 0 && writes_entry(tgt, vec, W, tid, nthreads))
        d[tgt] = from_f32<T>(logit_grad(g, to_f32(zr[tgt])) + g.hit);
}

// dz is column v0 - g0 of a group's [N, ld] gradient buffer (src/ops/logprob.rs), so the GEMMs that
// follow read a whole group densely.
template <typename T>
__device__ void logprob_chunk_bwd(T* __restrict__ dz,                  // [N, ld], Vc columns written
                                  const T* __restrict__ z,             // [N, Vc]
                                  const int* __restrict__ target,      // [N]
                                  const float* __restrict__ lse,       // [N]
                                  const float* __restrict__ entropy,   // [N]
                                  const float* __restrict__ grad_logp, // [N]
                                  const float* __restrict__ grad_ent,  // [N]
                                  int N, int Vc, int v0, int ld) {
    const size_t row = (size_t)blockIdx.x * CHUNK_ROWS + (threadIdx.x >> 5);
    if (row >= (size_t)N) return;
    const int tgt = target[row];
    const LogitGrad g = logit_grad_init(lse[row], entropy[row], tgt < 0 ? 0.0f : grad_logp[row], grad_ent[row], 1.0f);
    // A target outside this tile (or ignored) becomes -1, which no entry matches.
    const int local = tgt >= v0 && tgt < v0 + Vc ? tgt - v0 : -1;
    // dz's vector stores need ld and the column offset to be multiples of the width (tiles are
    // multiples of 256, so the offset is); the loads need Vc.
    constexpr int W = Vec16<T>::N;
    const bool vec = Vc % W == 0 && ld % W == 0;
    tile_grad<T, T>(dz + row * ld, z + row * Vc, Vc, g, local, vec, threadIdx.x & 31, 32);
}

#define LOGPROB_INSTANTIATE(SUFFIX, T)                                                                      \
    extern "C" __global__ void logprob_fwd_##SUFFIX(float* logp, float* lse, float* entropy, const T* logits, \
                                                    const int* target, int V, float scale) {               \
        logprob_fwd<T>(logp, lse, entropy, logits, target, V, scale);                                       \
    }                                                                                                       \
    extern "C" __global__ void logprob_bwd_##SUFFIX(T* dlogits, const T* logits, const int* target,          \
                                                    const float* lse, const float* entropy,                 \
                                                    const float* grad_logp, const float* grad_ent, int V,   \
                                                    float scale) {                                          \
        logprob_bwd<T>(dlogits, logits, target, lse, entropy, grad_logp, grad_ent, V, scale);               \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(CHUNK_ROWS * 32)                                           \
        logprob_chunk_bwd_##SUFFIX(T* dz, const T* z, const int* target, const float* lse,                    \
                                   const float* entropy, const float* grad_logp, const float* grad_ent, int N,\
                                   int Vc, int v0, int ld) {                                                 \
        logprob_chunk_bwd<T>(dz, z, target, lse, entropy, grad_logp, grad_ent, N, Vc, v0, ld);              \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(CHUNK_ROWS * 32)                                           \
        logprob_chunk_fwd_##SUFFIX(float* state, float* target_z, float* logp, float* lse, float* entropy,    \
                                   const T* z, const int* target, int N, int Vc, int v0, int V, int first,    \
                                   int last) {                                                               \
        logprob_chunk_fwd<T>(state, target_z, logp, lse, entropy, z, target, N, Vc, v0, V, first, last);     \
    }

LOGPROB_INSTANTIATE(f32, float)
LOGPROB_INSTANTIATE(bf16, bf16)
