// Causal self-attention with grouped-query heads over packed variable-length sequences.
//
// Two sets of kernels. The simple ones (f32, any head_dim, and RLHF_ATTENTION=simple) never store the
// score matrix (keys are processed in chunks of ATTN_CHUNK with an online softmax) but compute dot
// products with one thread per key and no tensor cores. The flash ones (bf16, head_dim 64 and 128),
// at the end of this file, use the tensor cores.
//
// Layout: q [Nq, H*D], k and v [*, KV*D] (packed rows, or a KV cache with room per sequence), out
// [Nq, H*D], lse [Nq, H] f32 (natural-log logsumexp of the scaled scores). Sequence b owns query rows
// cu_q[b] .. cu_q[b+1] and key rows k_start[b] .. k_start[b] + k_len[b]; query head h reads kv head
// h / (H / KV). Causal, aligned bottom-right: local query iq sees local keys j <= k_len - len_q + iq
// (so training, where len_q = k_len, is the usual triangle, and decoding one token sees the cache).
//
// Backward (recompute; D_i = rowsum(dO_i * O_i) first):
//   p_ij = exp(s_ij - lse_i),  ds_ij = p_ij (dO_i . v_j - D_i)
//   dq_i = scale sum_j ds_ij k_j      (one block per query row and head)
//   dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij dO_i   (one block per key row and kv head)
// Every output is written by exactly one block: no atomics, bitwise deterministic.
#include "common.cuh"

#define ATTN_CHUNK 1024

struct SeqMap {
    int b, iq, len_q, k0, n_keys;
};

// The sequence of query row `row` (binary search in cu_q) and its causal key range.
__device__ __forceinline__ SeqMap seq_of(const int* cu_q, const int* k_start, const int* k_len, int B, int row) {
    int lo = 0, hi = B - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (cu_q[mid] <= row) lo = mid;
        else hi = mid - 1;
    }
    SeqMap s;
    s.b = lo;
    s.iq = row - cu_q[lo];
    s.len_q = cu_q[lo + 1] - cu_q[lo];
    s.k0 = k_start[lo];
    s.n_keys = min(k_len[lo], k_len[lo] - s.len_q + s.iq + 1);
    return s;
}

template <typename T>
__device__ __forceinline__ float dot_row(const float* a_smem, const T* b, int D) {
    float s = 0.0f;
    for (int d = 0; d < D; ++d) s += a_smem[d] * to_f32(b[d]);
    return s;
}

template <typename T>
__device__ void attention_fwd(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ q,
                              const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ cu_q,
                              const int* __restrict__ k_start, const int* __restrict__ k_len, int B, int H, int KV,
                              int D, float scale) {
    __shared__ float s[ATTN_CHUNK];
    __shared__ float scratch[32];
    DYNAMIC_SMEM(float, qs);  // [D]
    const int row = blockIdx.x, h = blockIdx.y, g = h / (H / KV);
    const SeqMap m = seq_of(cu_q, k_start, k_len, B, row);
    const T* qr = q + ((size_t)row * H + h) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = to_f32(qr[d]);
    __syncthreads();
    float run_max = -INFINITY, run_sum = 0.0f, acc = 0.0f;
    for (int c0 = 0; c0 < m.n_keys; c0 += ATTN_CHUNK) {
        const int n = min(ATTN_CHUNK, m.n_keys - c0);
        float local_max = -INFINITY;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float sc = dot_row(qs, k + ((size_t)(m.k0 + c0 + j) * KV + g) * D, D) * scale;
            s[j] = sc;
            local_max = fmaxf(local_max, sc);
        }
        const float new_max = fmaxf(run_max, block_max(local_max, scratch));
        float local_sum = 0.0f;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float p = expf(s[j] - new_max);
            s[j] = p;
            local_sum += p;
        }
        const float chunk_sum = block_sum(local_sum, scratch);  // its barriers also publish s[]
        const float rescale = expf(run_max - new_max);
        run_sum = run_sum * rescale + chunk_sum;
        if (threadIdx.x < D) {
            float a = acc * rescale;
            for (int j = 0; j < n; ++j) a += s[j] * to_f32(v[((size_t)(m.k0 + c0 + j) * KV + g) * D + threadIdx.x]);
            acc = a;
        }
        run_max = new_max;
        __syncthreads();
    }
    if (threadIdx.x < D) out[((size_t)row * H + h) * D + threadIdx.x] = from_f32<T>(m.n_keys > 0 ? acc / run_sum : 0.0f);
    if (threadIdx.x == 0) lse[(size_t)row * H + h] = m.n_keys > 0 ? run_max + logf(run_sum) : -INFINITY;
}

// D_i = sum_d dO[i, h, d] * O[i, h, d], one block per (row, head).
template <typename T>
__device__ void attention_bwd_dot(float* __restrict__ delta, const T* __restrict__ dout, const T* __restrict__ out,
                                  int H, int D) {
    __shared__ float scratch[32];
    const size_t base = ((size_t)blockIdx.x * H + blockIdx.y) * D;
    float s = 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) s += to_f32(dout[base + d]) * to_f32(out[base + d]);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) delta[(size_t)blockIdx.x * H + blockIdx.y] = s;
}

template <typename T>
__device__ void attention_bwd_dq(T* __restrict__ dq, const T* __restrict__ q, const T* __restrict__ k,
                                 const T* __restrict__ v, const T* __restrict__ dout, const float* __restrict__ lse,
                                 const float* __restrict__ delta, const int* __restrict__ cu_q,
                                 const int* __restrict__ k_start, const int* __restrict__ k_len, int B, int H, int KV,
                                 int D, float scale) {
    __shared__ float ds[ATTN_CHUNK];
    DYNAMIC_SMEM(float, sh);  // q [D], dO [D]
    float* qs = sh;
    float* dos = sh + D;
    const int row = blockIdx.x, h = blockIdx.y, g = h / (H / KV);
    const SeqMap m = seq_of(cu_q, k_start, k_len, B, row);
    const size_t qi = ((size_t)row * H + h) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        qs[d] = to_f32(q[qi + d]);
        dos[d] = to_f32(dout[qi + d]);
    }
    __syncthreads();
    const float l = lse[(size_t)row * H + h], di = delta[(size_t)row * H + h];
    float acc = 0.0f;
    for (int c0 = 0; c0 < m.n_keys; c0 += ATTN_CHUNK) {
        const int n = min(ATTN_CHUNK, m.n_keys - c0);
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const size_t kj = ((size_t)(m.k0 + c0 + j) * KV + g) * D;
            const float p = expf(dot_row(qs, k + kj, D) * scale - l);
            ds[j] = p * (dot_row(dos, v + kj, D) - di);
        }
        __syncthreads();
        if (threadIdx.x < D)
            for (int j = 0; j < n; ++j) acc += ds[j] * to_f32(k[((size_t)(m.k0 + c0 + j) * KV + g) * D + threadIdx.x]);
        __syncthreads();
    }
    if (threadIdx.x < D) dq[qi + threadIdx.x] = from_f32<T>(acc * scale);
}

// One block per packed key row j (training layout: key rows are query rows) and kv head.
template <typename T>
__device__ void attention_bwd_dkv(T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ q,
                                  const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                  const int* __restrict__ cu_q, int B, int H, int KV, int D, float scale) {
    __shared__ float ps[ATTN_CHUNK];
    __shared__ float ds[ATTN_CHUNK];
    DYNAMIC_SMEM(float, sh);  // k [D], v [D]
    float* ks = sh;
    float* vs = sh + D;
    const int j = blockIdx.x, g = blockIdx.y, group = H / KV;
    int lo = 0, hi = B - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (cu_q[mid] <= j) lo = mid;
        else hi = mid - 1;
    }
    const int start = cu_q[lo], len = cu_q[lo + 1] - start, jk = j - start;
    const size_t kj = ((size_t)j * KV + g) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        ks[d] = to_f32(k[kj + d]);
        vs[d] = to_f32(v[kj + d]);
    }
    __syncthreads();
    // Queries that see key jk: local iq in [jk, len), for each head of the group.
    const int nq = len - jk, slots = nq * group;
    float acc_k = 0.0f, acc_v = 0.0f;
    for (int c0 = 0; c0 < slots; c0 += ATTN_CHUNK) {
        const int n = min(ATTN_CHUNK, slots - c0);
        for (int t = threadIdx.x; t < n; t += blockDim.x) {
            const int slot = c0 + t, h = g * group + slot % group, i = start + jk + slot / group;
            const size_t qi = ((size_t)i * H + h) * D;
            float s = 0.0f, dp = 0.0f;
            for (int d = 0; d < D; ++d) {
                s += to_f32(q[qi + d]) * ks[d];
                dp += to_f32(dout[qi + d]) * vs[d];
            }
            const float p = expf(s * scale - lse[(size_t)i * H + h]);
            ps[t] = p;
            ds[t] = p * (dp - delta[(size_t)i * H + h]);
        }
        __syncthreads();
        if (threadIdx.x < D) {
            for (int t = 0; t < n; ++t) {
                const int slot = c0 + t, h = g * group + slot % group, i = start + jk + slot / group;
                const size_t qi = ((size_t)i * H + h) * D + threadIdx.x;
                acc_v += ps[t] * to_f32(dout[qi]);
                acc_k += ds[t] * to_f32(q[qi]);
            }
        }
        __syncthreads();
    }
    if (threadIdx.x < D) {
        dk[kj + threadIdx.x] = from_f32<T>(acc_k * scale);
        dv[kj + threadIdx.x] = from_f32<T>(acc_v);
    }
}

#define ATTENTION_INSTANTIATE(SUFFIX, T)                                                                          \
    extern "C" __global__ void attention_fwd_##SUFFIX(T* out, float* lse, const T* q, const T* k, const T* v,     \
                                                      const int* cu_q, const int* k_start, const int* k_len,     \
                                                      int B, int H, int KV, int D, float scale) {                \
        attention_fwd<T>(out, lse, q, k, v, cu_q, k_start, k_len, B, H, KV, D, scale);                            \
    }                                                                                                             \
    extern "C" __global__ void attention_bwd_dot_##SUFFIX(float* delta, const T* dout, const T* out, int H,       \
                                                          int D) {                                                \
        attention_bwd_dot<T>(delta, dout, out, H, D);                                                             \
    }                                                                                                             \
    extern "C" __global__ void attention_bwd_dq_##SUFFIX(T* dq, const T* q, const T* k, const T* v, const T* dout, \
                                                         const float* lse, const float* delta, const int* cu_q,   \
                                                         const int* k_start, const int* k_len, int B, int H,      \
                                                         int KV, int D, float scale) {                            \
        attention_bwd_dq<T>(dq, q, k, v, dout, lse, delta, cu_q, k_start, k_len, B, H, KV, D, scale);             \
    }                                                                                                             \
    extern "C" __global__ void attention_bwd_dkv_##SUFFIX(T* dk, T* dv, const T* q, const T* k, const T* v,       \
                                                          const T* dout, const float* lse, const float* delta,    \
                                                          const int* cu_q, int B, int H, int KV, int D,           \
                                                          float scale) {                                          \
        attention_bwd_dkv<T>(dk, dv, q, k, v, dout, lse, delta, cu_q, B, H, KV, D, scale);                        \
    }

ATTENTION_INSTANTIATE(f32, float)
ATTENTION_INSTANTIATE(bf16, bf16)

// ---------------------------------------------------------------------------------------------------
// Flash kernels: bf16, head_dim 64 or 128, tensor cores through mma.sync m16n8k16 (sm_80 and later).
//
// FlashAttention-2's schedule. Forward: a block owns 64 query rows of one head (16 per warp), streams
// 64-key tiles of K and V through shared memory with cp.async (the next K tile loads while this tile's
// softmax and P·V run), keeps S, P and O in registers, and converts the S accumulators straight into
// P's A operand (the m16n8 accumulator layout of two adjacent n-tiles is the m16k16 A layout).
// Backward, deterministic mode (no atomics, bitwise repeatable): a dK/dV kernel where a block owns
// 64 keys of one kv head and loops over every query head of its group and every query tile that sees
// them, and a dQ kernel where a block owns 64 query rows and loops over their keys; both recompute P
// from Q, K and the saved logsumexp. Fast mode (the default): the dK/dV kernel alone, adding dQ into
// an f32 buffer with atomics (FlashAttention-2's schedule). On Hopper both modes run wgmma twins
// (after the Hopper forward): flash_bwd_hopper, and flash_bwd_dkv_hopper with flash_bwd_dq_hopper.
// Work is cut into 64-row tiles listed by the host (`tiles`: sequence, first local row; 128-row
// ones for the Hopper kernels, whose blocks are two warpgroups) so that packed variable-length
// batches pay nothing for padding.
//
// Smem rows are padded by 16 bytes so that the 8 row addresses of an ldmatrix fall in distinct banks.

#define FLASH_TILE 64
#define FLASH_THREADS 128
#define FLASH_PAD 8
#define FLASH_BWD_QTILE 32
#define FLASH_LOG2E 1.4426950408889634f
#define FLASH_LN2 0.6931471805599453f

// wgmma exists on sm_90a alone, and in the CPU emulation (tests/host/emulation.h), where every
// inline-PTX operation below goes to a function of the emulator instead.
#if (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)) || defined(RLHF_EMULATION)
#define HOPPER_WGMMA 1
#endif

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t smem_addr) {
#ifdef RLHF_EMULATION
    emu::ldmatrix_x4(r, smem_addr, false);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr));
#endif
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16* p) { ldsm_x4(r, smem_u32(p)); }

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const bf16* p) {
#ifdef RLHF_EMULATION
    emu::ldmatrix_x4(r, smem_u32(p), true);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
#endif
}

// c += a · b for one m16n8k16 tile, bf16 operands, f32 accumulators.
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef RLHF_EMULATION
    emu::mma_16816(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// 16 bytes global -> shared, asynchronously; `valid` false writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t smem_addr, const bf16* gmem, bool valid) {
#ifdef RLHF_EMULATION
    emu::cp_async16(smem_addr, gmem, valid ? 16 : 0);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void cp_async16(bf16* smem, const bf16* gmem, bool valid) {
    cp_async16(smem_u32(smem), gmem, valid);
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef RLHF_EMULATION
    emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#ifdef RLHF_EMULATION
    emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Rows row0 .. row0 + ROWS of a [*, row_stride] bf16 matrix (columns 0 .. D of `g`) into smem rows of
// D + FLASH_PAD; rows at or past `n_valid` (counted from row0) are zero-filled. Each thread owns one
// 16-byte column of every ROW_STEP-th row, so its addresses advance by constant strides: about four
// instructions a copy instead of a division and a 64-bit multiply each.
template <int D, int ROWS>
__device__ __forceinline__ void flash_load_rows(bf16* smem, const bf16* g, size_t row_stride, int row0, int n_valid) {
    constexpr int CHUNKS = D / 8, ROW_STEP = FLASH_THREADS / CHUNKS;
    static_assert(FLASH_THREADS % CHUNKS == 0 && ROWS % ROW_STEP == 0, "rows must split evenly over the block");
    const int r0 = threadIdx.x / CHUNKS, c = (threadIdx.x % CHUNKS) * 8;
    const bf16* src = g + (size_t)(row0 + r0) * row_stride + c;
    bf16* dst = smem + r0 * (D + FLASH_PAD) + c;
    const size_t src_step = (size_t)ROW_STEP * row_stride;
#pragma unroll
    for (int j = 0; j < ROWS / ROW_STEP; ++j) {
        const bool ok = r0 + j * ROW_STEP < n_valid;
        cp_async16(dst + j * ROW_STEP * (D + FLASH_PAD), ok ? src + j * src_step : g, ok);
    }
}

// A operand (16 rows from `row0`, k columns kk*16 .. +16) from a padded smem tile.
template <int D>
__device__ __forceinline__ void flash_load_a(uint32_t (&a)[4], const bf16* tile, int row0, int kk) {
    const int lane = threadIdx.x & 31, mat = lane >> 3;
    ldsm_x4(a, tile + (row0 + (lane & 7) + (mat & 1) * 8) * (D + FLASH_PAD) + kk * 16 + (mat >> 1) * 8);
}

// B operands of two adjacent n-tiles (rows n0 .. n0 + 16 of a [n][k] smem tile, k columns kk*16 ..):
// for S = A · tileᵀ. b[0], b[1] belong to n-tile n0, b[2], b[3] to n0 + 8.
template <int D>
__device__ __forceinline__ void flash_load_bt(uint32_t (&b)[4], const bf16* tile, int n0, int kk) {
    const int lane = threadIdx.x & 31, mat = lane >> 3;
    ldsm_x4(b, tile + (n0 + (lane & 7) + (mat >> 1) * 8) * (D + FLASH_PAD) + kk * 16 + (mat & 1) * 8);
}

// B operands of two adjacent n-tiles (columns c0 .. c0 + 16) for A · tile, the tile stored [k][n]
// with k rows k0 .. k0 + 16.
template <int D>
__device__ __forceinline__ void flash_load_b(uint32_t (&b)[4], const bf16* tile, int k0, int c0) {
    const int lane = threadIdx.x & 31, mat = lane >> 3;
    ldsm_x4_trans(b, tile + (k0 + (lane & 7) + (mat & 1) * 8) * (D + FLASH_PAD) + c0 + (mat >> 1) * 8);
}

// A operand (rows m0 .. m0 + 16, k columns k0 .. k0 + 16) of A · B from a tile stored transposed,
// [k][m] with `stride` elements a row.
__device__ __forceinline__ void flash_load_a_trans(uint32_t (&a)[4], const bf16* tile, int stride, int m0, int k0) {
    const int lane = threadIdx.x & 31, mat = lane >> 3;
    ldsm_x4_trans(a, tile + (k0 + (lane & 7) + (mat >> 1) * 8) * stride + m0 + (mat & 1) * 8);
}

// f32 += into global memory from many blocks: the fast backward's dQ.
__device__ __forceinline__ void atomic_add2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(x, y));
#else
    REQUIRE_ALIGNED(p, 8, "atomic_add2");
    atomicAdd(p, x);
    atomicAdd(p + 1, y);
#endif
}

// The A operand of k-step kk from f32 accumulators of n-tiles 2kk and 2kk + 1, rounded to bf16.
template <int NT>
__device__ __forceinline__ void flash_acc_to_a(uint32_t (&a)[4], const float (&acc)[NT][4], int kk) {
    a[0] = pack_bf16x2(acc[2 * kk][0], acc[2 * kk][1]);
    a[1] = pack_bf16x2(acc[2 * kk][2], acc[2 * kk][3]);
    a[2] = pack_bf16x2(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[3] = pack_bf16x2(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// One key tile of the forward's online softmax for a warp's two rows per thread: the raw scores s
// become P in place, the running max m (scaled, log2 units) and the sum l are updated, and alpha is
// the factor the output must be scaled by (1 while a row's max holds). The max is taken over raw
// scores (scale > 0, checked by the host) so that each P entry costs one FFMA and one ex2. MASK
// applies the causal and end-of-sequence masks, needed only on tiles that reach the diagonal or
// the end.
template <bool MASK, int NT>
__device__ __forceinline__ void flash_softmax_scores_body(float (&s)[NT][4], float (&m)[2], float (&l)[2],
                                                          float (&alpha)[2], float scale_log2, int n0, int lane,
                                                          const int (&last_key)[2], int n_keys) {
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if (MASK) {
                const int key = n0 + nt * 8 + 2 * (lane & 3) + (e & 1);
                if (key > last_key[e >> 1] || key >= n_keys) s[nt][e] = -INFINITY;
            }
            mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
        }
    }
    float base[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        const float m_new = fmaxf(m[i], mx[i] * scale_log2);
        base[i] = m_new == -INFINITY ? 0.0f : m_new;
        alpha[i] = exp2_ftz(m[i] - base[i]);  // 0 while m is -inf, 1 when the max held
        l[i] *= alpha[i];
        m[i] = m_new;
    }
    float row_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float p = exp2_ftz(fmaf(s[nt][e], scale_log2, -base[e >> 1]));
            s[nt][e] = p;
            row_sum[e >> 1] += p;
        }
    }
    l[0] += row_sum[0];
    l[1] += row_sum[1];
}

// o *= alpha per row. Once the max settles (most tiles of a long row) alpha is 1 for the whole warp
// and the output needs no rescale.
template <int DT>
__device__ __forceinline__ void flash_rescale(float (&o)[DT][4], const float (&alpha)[2]) {
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            o[dt][0] *= alpha[0];
            o[dt][1] *= alpha[0];
            o[dt][2] *= alpha[1];
            o[dt][3] *= alpha[1];
        }
    }
}

// The softmax step for the tile of keys from n0: tiles wholly before the diagonal of the block's
// first row (whose last visible key is `first_last_key`), most of a long sequence, skip the mask.
template <int NT>
__device__ __forceinline__ void flash_softmax_scores(float (&s)[NT][4], float (&m)[2], float (&l)[2], float (&alpha)[2],
                                                     float scale_log2, int n0, int lane, const int (&last_key)[2],
                                                     int n_keys, int first_last_key) {
    if (n0 + NT * 8 <= min(n_keys, first_last_key + 1)) {
        flash_softmax_scores_body<false>(s, m, l, alpha, scale_log2, n0, lane, last_key, n_keys);
    } else {
        flash_softmax_scores_body<true>(s, m, l, alpha, scale_log2, n0, lane, last_key, n_keys);
    }
}

template <int NT, int DT>
__device__ __forceinline__ void flash_softmax_step(float (&s)[NT][4], float (&m)[2], float (&l)[2], float (&o)[DT][4],
                                                   float scale_log2, int n0, int lane, const int (&last_key)[2],
                                                   int n_keys, int first_last_key) {
    float alpha[2];
    flash_softmax_scores(s, m, l, alpha, scale_log2, n0, lane, last_key, n_keys, first_last_key);
    flash_rescale(o, alpha);
}

// Which query rows (ROWS from iq0) a forward or dQ block owns and the keys they see. Heavy tiles
// (late in a causal sequence) run first: the host lists tiles in sequence order. Null k_start and
// k_len mean a packed batch, whose keys are its query rows.
struct FlashFwdTile {
    int b, iq0, h, g, q_begin, len_q, offset, rows, n_keys;
    const bf16 *kg, *vg;  // the sequence's first key and value row, at its kv head
};

template <int D, int ROWS = FLASH_TILE>
__device__ __forceinline__ FlashFwdTile flash_fwd_tile(const bf16* k, const bf16* v, const int* cu_q,
                                                       const int* k_start, const int* k_len, const int* tiles, int H,
                                                       int KV) {
    FlashFwdTile t;
    const int tile = gridDim.x - 1 - blockIdx.x;
    t.b = tiles[2 * tile];
    t.iq0 = tiles[2 * tile + 1];
    t.h = blockIdx.y;
    t.g = t.h / (H / KV);
    t.q_begin = cu_q[t.b];
    t.len_q = cu_q[t.b + 1] - t.q_begin;
    const int n_k = k_len ? k_len[t.b] : t.len_q;
    t.offset = n_k - t.len_q;
    t.rows = min(ROWS, t.len_q - t.iq0);
    t.n_keys = max(0, min(n_k, t.offset + t.iq0 + t.rows));
    const size_t first = (size_t)(k_start ? k_start[t.b] : t.q_begin) * KV * D + (size_t)t.g * D;
    t.kg = k + first;
    t.vg = v + first;
    return t;
}

// The forward's last step for a warp's two rows per thread: O / l into `out`, the natural-log
// logsumexp into `lse` (rows at or past len_q are padding and write nothing).
template <int D>
__device__ __forceinline__ void flash_fwd_store(bf16* __restrict__ out, float* __restrict__ lse,
                                                const float (&o)[D / 8][4], const float (&m)[2], float (&l)[2],
                                                int row_a, int len_q, int q_begin, int H, int h, int lane) {
    const size_t q_stride = (size_t)H * D;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
        const int row = row_a + 8 * i;
        if (row >= len_q) continue;
        const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
        bf16* orow = out + (size_t)(q_begin + row) * q_stride + h * D + 2 * (lane & 3);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
            *reinterpret_cast<uint32_t*>(orow + dt * 8) = pack_bf16x2(o[dt][2 * i] * inv, o[dt][2 * i + 1] * inv);
        if ((lane & 3) == 0)
            lse[(size_t)(q_begin + row) * H + h] = l[i] > 0.0f ? (m[i] + log2f(l[i])) * FLASH_LN2 : -INFINITY;
    }
}

// Which keys (of one kv head; ROWS from j0) a dK/dV block owns, in a packed batch, and the
// sequence's first live query row: rows before it (a shared prompt repeated in a sequence that reads
// it, whose outputs are dropped) have a zero output gradient, so they add nothing to dK or dV, and
// their dQ is unused; `live_from` is null where every row is live.
struct FlashBwdTile {
    int j0, g, group, q_begin, len, nk, live;
};

template <int ROWS = FLASH_TILE>
__device__ __forceinline__ FlashBwdTile flash_bwd_tile(const int* cu_q, const int* tiles, const int* live_from,
                                                       int H, int KV) {
    FlashBwdTile t;
    const int b = tiles[2 * blockIdx.x];
    t.live = live_from ? live_from[b] : 0;
    t.j0 = tiles[2 * blockIdx.x + 1];
    t.g = blockIdx.y;
    t.group = H / KV;
    t.q_begin = cu_q[b];
    t.len = cu_q[b + 1] - t.q_begin;
    t.nk = min(ROWS, t.len - t.j0);
    return t;
}

// The dK/dV kernels' per-query-row inputs of a tile into shared memory: lse in log2 units (+inf past
// the sequence, so P is 0 there) and delta.
template <int QT>
__device__ __forceinline__ void flash_stage_rows(float* lse2s, float* dlts, const float* __restrict__ lse,
                                                 const float* __restrict__ delta, int q_begin, int i0, int len, int H,
                                                 int h) {
    if (threadIdx.x < QT) {
        const int row = i0 + threadIdx.x;
        const bool ok = row < len;
        lse2s[threadIdx.x] = ok ? lse[(size_t)(q_begin + row) * H + h] * FLASH_LOG2E : INFINITY;
        dlts[threadIdx.x] = ok ? delta[(size_t)(q_begin + row) * H + h] : 0.0f;
    }
}

// scale · acc for a warp's two rows per thread into rows of head h of a [*, H·D] bf16 matrix (rows at
// or past len are padding and write nothing): the dQ kernels' last step.
template <int D>
__device__ __forceinline__ void flash_rows_store(bf16* __restrict__ dst, const float (&acc)[D / 8][4], int row_a,
                                                 int len, int q_begin, int H, int h, int lane, float scale) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = row_a + 8 * i;
        if (row >= len) continue;
        bf16* drow = dst + ((size_t)(q_begin + row) * H + h) * D + 2 * (lane & 3);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
            *reinterpret_cast<uint32_t*>(drow + dt * 8) =
                pack_bf16x2(acc[dt][2 * i] * scale, acc[dt][2 * i + 1] * scale);
    }
}

// The dK/dV kernels' last step for a warp's two keys per thread: scale · dK and dV into rows of kv
// head g (keys at or past len are padding and write nothing).
template <int D>
__device__ __forceinline__ void flash_dkv_store(bf16* __restrict__ dk, bf16* __restrict__ dv,
                                                const float (&dka)[D / 8][4], const float (&dva)[D / 8][4], int key_a,
                                                int len, int q_begin, int KV, int g, int lane, float scale) {
    const size_t kv_stride = (size_t)KV * D;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int key = key_a + 8 * i;
        if (key >= len) continue;
        const size_t at = (size_t)(q_begin + key) * kv_stride + g * D + 2 * (lane & 3);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            *reinterpret_cast<uint32_t*>(dk + at + dt * 8) =
                pack_bf16x2(dka[dt][2 * i] * scale, dka[dt][2 * i + 1] * scale);
            *reinterpret_cast<uint32_t*>(dv + at + dt * 8) = pack_bf16x2(dva[dt][2 * i], dva[dt][2 * i + 1]);
        }
    }
}

template <int D>
__device__ void flash_fwd(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                          const bf16* __restrict__ k, const bf16* __restrict__ v, const int* __restrict__ cu_q,
                          const int* __restrict__ k_start, const int* __restrict__ k_len,
                          const int* __restrict__ tiles, int H, int KV, float scale) {
    constexpr int STRIDE = D + FLASH_PAD, NT = FLASH_TILE / 8, DT = D / 8;
    DYNAMIC_SMEM(unsigned char, flash_smem);
    bf16* ks = reinterpret_cast<bf16*>(flash_smem);
    bf16* vs = ks + FLASH_TILE * STRIDE;
    const FlashFwdTile ft = flash_fwd_tile<D>(k, v, cu_q, k_start, k_len, tiles, H, KV);
    const int iq0 = ft.iq0, h = ft.h, q_begin = ft.q_begin, len_q = ft.len_q, offset = ft.offset;
    const int rows = ft.rows, n_keys = ft.n_keys, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t kv_stride = (size_t)KV * D, q_stride = (size_t)H * D;
    const bf16 *kg = ft.kg, *vg = ft.vg;
    const float scale_log2 = scale * FLASH_LOG2E;

    // Q is staged in V's buffer and held in registers from then on.
    flash_load_rows<D, FLASH_TILE>(vs, q + (size_t)q_begin * q_stride + h * D, q_stride, iq0, rows);
    cp_async_commit();
    if (n_keys > 0) flash_load_rows<D, FLASH_TILE>(ks, kg, kv_stride, 0, min(FLASH_TILE, n_keys));
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) flash_load_a<D>(qf[kk], vs, warp * 16, kk);
    __syncthreads();

    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const int row_a = iq0 + warp * 16 + (lane >> 2);
    const int last_key[2] = {offset + row_a, offset + row_a + 8};

    for (int n0 = 0; n0 < n_keys; n0 += FLASH_TILE) {
        flash_load_rows<D, FLASH_TILE>(vs, vg, kv_stride, n0, min(FLASH_TILE, n_keys - n0));
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        float s[NT][4];
#pragma unroll
        for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int nt = 0; nt < NT; nt += 2) {
                uint32_t bf[4];
                flash_load_bt<D>(bf, ks, nt * 8, kk);
                mma_16816(s[nt], qf[kk], bf[0], bf[1]);
                mma_16816(s[nt + 1], qf[kk], bf[2], bf[3]);
            }
        }
        __syncthreads();
        if (n0 + FLASH_TILE < n_keys)
            flash_load_rows<D, FLASH_TILE>(ks, kg, kv_stride, n0 + FLASH_TILE, min(FLASH_TILE, n_keys - n0 - FLASH_TILE));
        cp_async_commit();

        flash_softmax_step(s, m, l, o, scale_log2, n0, lane, last_key, n_keys, offset + iq0);

        cp_async_wait<1>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < FLASH_TILE / 16; ++kk) {
            uint32_t pa[4];
            flash_acc_to_a<NT>(pa, s, kk);
#pragma unroll
            for (int dt = 0; dt < DT; dt += 2) {
                uint32_t bf[4];
                flash_load_b<D>(bf, vs, kk * 16, dt * 8);
                mma_16816(o[dt], pa, bf[0], bf[1]);
                mma_16816(o[dt + 1], pa, bf[2], bf[3]);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

    flash_fwd_store<D>(out, lse, o, m, l, row_a, len_q, q_begin, H, h, lane);
}

// dS = P ⊙ (dO·Vᵀ − Δ) in place of the scores s, for a warp's 16 query rows and a tile of keys from
// n0; MASK zeroes P for keys after a row or past the sequence (tiles crossing the diagonal).
template <bool MASK, int NT>
__device__ __forceinline__ void flash_dq_ds_body(float (&s)[NT][4], const float (&dp)[NT][4], float scale_log2,
                                                 const float (&lse2)[2], const float (&dlt)[2], int n0, int lane,
                                                 int row_a, int n_keys) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = n0 + nt * 8 + 2 * (lane & 3) + (e & 1);
            const int row = row_a + 8 * (e >> 1);
            const bool masked = MASK && (key > row || key >= n_keys);
            const float p = masked ? 0.0f : exp2_ftz(fmaf(s[nt][e], scale_log2, -lse2[e >> 1]));
            s[nt][e] = p * (dp[nt][e] - dlt[e >> 1]);
        }
    }
}

// flash_dq_ds_body for the tile of keys from n0, unmasked when the tile lies wholly at or before the
// block's first row iq0.
template <int NT>
__device__ __forceinline__ void flash_dq_ds(float (&s)[NT][4], const float (&dp)[NT][4], float scale_log2,
                                            const float (&lse2)[2], const float (&dlt)[2], int n0, int lane,
                                            int row_a, int n_keys, int iq0) {
    if (n0 + NT * 8 <= iq0 + 1) {
        flash_dq_ds_body<false>(s, dp, scale_log2, lse2, dlt, n0, lane, row_a, n_keys);
    } else {
        flash_dq_ds_body<true>(s, dp, scale_log2, lse2, dlt, n0, lane, row_a, n_keys);
    }
}

// Pᵀ into s and dSᵀ into dp, for a warp's 16 keys (rows) and a tile of queries (columns) from i0;
// MASK zeroes P where the key comes after the query (tiles crossing the diagonal).
template <bool MASK, int NT>
__device__ __forceinline__ void flash_dkv_p_body(float (&s)[NT][4], float (&dp)[NT][4], float scale_log2,
                                                 const float* lse2s, const float* dlts, int i0, int lane, int key_a) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int col = nt * 8 + 2 * (lane & 3) + (e & 1);
            const int key = key_a + 8 * (e >> 1);
            const bool masked = MASK && key > i0 + col;
            const float p = masked ? 0.0f : exp2_ftz(fmaf(s[nt][e], scale_log2, -lse2s[col]));
            s[nt][e] = p;
            dp[nt][e] = p * (dp[nt][e] - dlts[col]);
        }
    }
}

// flash_dkv_p_body for the query tile from i0, unmasked when it lies wholly at or after the block's
// last key (keys j0 .. j0 + 64).
template <int NT>
__device__ __forceinline__ void flash_dkv_p(float (&s)[NT][4], float (&dp)[NT][4], float scale_log2,
                                            const float* lse2s, const float* dlts, int i0, int lane, int key_a,
                                            int j0) {
    if (j0 + FLASH_TILE <= i0 + 1) {
        flash_dkv_p_body<false>(s, dp, scale_log2, lse2s, dlts, i0, lane, key_a);
    } else {
        flash_dkv_p_body<true>(s, dp, scale_log2, lse2s, dlts, i0, lane, key_a);
    }
}

// dQ for 64 query rows of one head: dQ = scale · Σ_keys dS · K, dS = P ⊙ (dO·Vᵀ − Δ).
template <int D>
__device__ void flash_bwd_dq(bf16* __restrict__ dq, const bf16* __restrict__ q, const bf16* __restrict__ k,
                             const bf16* __restrict__ v, const bf16* __restrict__ dout,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             const int* __restrict__ cu_q, const int* __restrict__ tiles, int H, int KV,
                             float scale) {
    constexpr int STRIDE = D + FLASH_PAD, KT = FLASH_BWD_QTILE, NT = KT / 8, DT = D / 8;
    DYNAMIC_SMEM(unsigned char, flash_smem);
    // Two stages of [K tile; V tile], each [KT][STRIDE]: the next stage loads while this one is used.
    constexpr int STAGE = 2 * KT * STRIDE;
    bf16* ks = reinterpret_cast<bf16*>(flash_smem);
    const FlashFwdTile ft = flash_fwd_tile<D>(k, v, cu_q, nullptr, nullptr, tiles, H, KV);
    const int iq0 = ft.iq0, h = ft.h, q_begin = ft.q_begin, len = ft.len_q, rows = ft.rows;
    const int n_keys = ft.n_keys, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t kv_stride = (size_t)KV * D, q_stride = (size_t)H * D;
    const bf16 *kg = ft.kg, *vg = ft.vg;
    const float scale_log2 = scale * FLASH_LOG2E;

    // Q, then dO, staged through the (64-row) K/V buffer into registers.
    uint32_t qf[D / 16][4], dof[D / 16][4];
    flash_load_rows<D, FLASH_TILE>(ks, q + (size_t)q_begin * q_stride + h * D, q_stride, iq0, rows);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) flash_load_a<D>(qf[kk], ks, warp * 16, kk);
    __syncthreads();
    flash_load_rows<D, FLASH_TILE>(ks, dout + (size_t)q_begin * q_stride + h * D, q_stride, iq0, rows);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) flash_load_a<D>(dof[kk], ks, warp * 16, kk);
    __syncthreads();

    const int row_a = iq0 + warp * 16 + (lane >> 2);
    float lse2[2], dlt[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = row_a + 8 * i;
        const bool ok = row < len;
        lse2[i] = ok ? lse[(size_t)(q_begin + row) * H + h] * FLASH_LOG2E : INFINITY;
        dlt[i] = ok ? delta[(size_t)(q_begin + row) * H + h] : 0.0f;
    }
    float acc[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

    const int key_tiles = (n_keys + KT - 1) / KT;
    auto load_kv = [&](int t) {
        const int n0 = t * KT, nv = min(KT, n_keys - n0);
        bf16* stage = ks + (t & 1) * STAGE;
        flash_load_rows<D, KT>(stage, kg, kv_stride, n0, nv);
        flash_load_rows<D, KT>(stage + KT * STRIDE, vg, kv_stride, n0, nv);
    };
    load_kv(0);
    cp_async_commit();
    for (int t = 0; t < key_tiles; ++t) {
        // Stage t + 1 was last read in iteration t - 1, which ended with a barrier.
        if (t + 1 < key_tiles) load_kv(t + 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const int n0 = t * KT;
        const bf16* kt = ks + (t & 1) * STAGE;
        const bf16* vt = kt + KT * STRIDE;
        float s[NT][4], dp[NT][4];
#pragma unroll
        for (int i = 0; i < NT; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int nt = 0; nt < NT; nt += 2) {
                uint32_t bf[4];
                flash_load_bt<D>(bf, kt, nt * 8, kk);
                mma_16816(s[nt], qf[kk], bf[0], bf[1]);
                mma_16816(s[nt + 1], qf[kk], bf[2], bf[3]);
                flash_load_bt<D>(bf, vt, nt * 8, kk);
                mma_16816(dp[nt], dof[kk], bf[0], bf[1]);
                mma_16816(dp[nt + 1], dof[kk], bf[2], bf[3]);
            }
        }
        flash_dq_ds(s, dp, scale_log2, lse2, dlt, n0, lane, row_a, n_keys, iq0);
#pragma unroll
        for (int kk = 0; kk < KT / 16; ++kk) {
            uint32_t da[4];
            flash_acc_to_a<NT>(da, s, kk);
#pragma unroll
            for (int dt = 0; dt < DT; dt += 2) {
                uint32_t bf[4];
                flash_load_b<D>(bf, kt, kk * 16, dt * 8);
                mma_16816(acc[dt], da, bf[0], bf[1]);
                mma_16816(acc[dt + 1], da, bf[2], bf[3]);
            }
        }
        __syncthreads();
    }
    flash_rows_store<D>(dq, acc, row_a, len, q_begin, H, h, lane, scale);
}

// dK and dV for 64 keys of one kv head, summed over the query heads of its group:
// dV = Σ Pᵀ·dO, dK = scale · Σ dSᵀ·Q, computed transposed (keys are the rows of every product).
//
// ATOMIC_DQ (the fast, non-deterministic backward): the same kernel also adds each tile's
// dQ = scale · dS·K into the f32 `dq_acc` with atomics, so no dQ kernel recomputes P and dP (five
// products a tile pair instead of seven). The order in which blocks add is not fixed, so dQ can
// differ in the last bits between runs.
template <int D, bool ATOMIC_DQ>
__device__ void flash_bwd_dkv(bf16* __restrict__ dk, bf16* __restrict__ dv, float* __restrict__ dq_acc,
                              const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                              const bf16* __restrict__ dout, const float* __restrict__ lse,
                              const float* __restrict__ delta, const int* __restrict__ cu_q,
                              const int* __restrict__ tiles, const int* __restrict__ live_from, int H, int KV,
                              float scale) {
    constexpr int STRIDE = D + FLASH_PAD, QT = FLASH_BWD_QTILE, NT = QT / 8, DT = D / 8;
    DYNAMIC_SMEM(unsigned char, flash_smem);
    bf16* ks = reinterpret_cast<bf16*>(flash_smem);  // [64][STRIDE]
    bf16* vs = ks + FLASH_TILE * STRIDE;             // [64][STRIDE]
    // Two stages of [Q tile; dO tile] ([QT][STRIDE] each) and of the tile's scaled lse and delta: the
    // next (query head, query tile) loads while this one is used.
    constexpr int STAGE = 2 * QT * STRIDE;
    bf16* qs0 = vs + FLASH_TILE * STRIDE;
    float* lse2s0 = reinterpret_cast<float*>(qs0 + 2 * STAGE);  // [2][QT]
    float* dlts0 = lse2s0 + 2 * QT;                             // [2][QT]
    // ATOMIC_DQ: scale · dSᵀ of the current tile in bf16, [64 keys][QT + pad].
    constexpr int DS_STRIDE = QT + FLASH_PAD;
    bf16* dss = reinterpret_cast<bf16*>(dlts0 + 2 * QT);
    const FlashBwdTile bt = flash_bwd_tile(cu_q, tiles, live_from, H, KV);
    const int j0 = bt.j0, g = bt.g, group = bt.group, q_begin = bt.q_begin, len = bt.len, nk = bt.nk;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const size_t kv_stride = (size_t)KV * D, q_stride = (size_t)H * D;
    const float scale_log2 = scale * FLASH_LOG2E;

    flash_load_rows<D, FLASH_TILE>(ks, k + (size_t)q_begin * kv_stride + g * D, kv_stride, j0, nk);
    flash_load_rows<D, FLASH_TILE>(vs, v + (size_t)q_begin * kv_stride + g * D, kv_stride, j0, nk);
    cp_async_commit();

    float dka[DT][4], dva[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[i][e] = dva[i][e] = 0.0f;
    const int key_a = j0 + warp * 16 + (lane >> 2);

    // Query tiles from the one holding j0 to the sequence's end, for each query head of the group.
    // (Past the sequence's dead rows: masking is per element, so a later first tile needs nothing
    // else.)
    const int i_first = max(j0 / QT, bt.live / QT) * QT;
    const int per_head = (len - i_first + QT - 1) / QT;
    const int steps = group * per_head;
    auto load_q = [&](int it) {
        const int h = g * group + it / per_head, i0 = i_first + (it % per_head) * QT;
        const int nq = min(QT, len - i0), buf = it & 1;
        bf16* qs = qs0 + buf * STAGE;
        flash_load_rows<D, QT>(qs, q + (size_t)q_begin * q_stride + h * D, q_stride, i0, nq);
        flash_load_rows<D, QT>(qs + QT * STRIDE, dout + (size_t)q_begin * q_stride + h * D, q_stride, i0, nq);
        flash_stage_rows<QT>(lse2s0 + buf * QT, dlts0 + buf * QT, lse, delta, q_begin, i0, len, H, h);
    };
    load_q(0);
    cp_async_commit();
    for (int it = 0; it < steps; ++it) {
        // Stage it + 1 was last read in iteration it - 1, which ended with a barrier.
        if (it + 1 < steps) load_q(it + 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        {
            const int i0 = i_first + (it % per_head) * QT, buf = it & 1;
            const bf16* qs = qs0 + buf * STAGE;
            const bf16* dos = qs + QT * STRIDE;
            const float* lse2s = lse2s0 + buf * QT;
            const float* dlts = dlts0 + buf * QT;
            float s[NT][4], dp[NT][4];
#pragma unroll
            for (int i = 0; i < NT; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                uint32_t ka[4], va[4];
                flash_load_a<D>(ka, ks, warp * 16, kk);
                flash_load_a<D>(va, vs, warp * 16, kk);
#pragma unroll
                for (int nt = 0; nt < NT; nt += 2) {
                    uint32_t bf[4];
                    flash_load_bt<D>(bf, qs, nt * 8, kk);
                    mma_16816(s[nt], ka, bf[0], bf[1]);
                    mma_16816(s[nt + 1], ka, bf[2], bf[3]);
                    flash_load_bt<D>(bf, dos, nt * 8, kk);
                    mma_16816(dp[nt], va, bf[0], bf[1]);
                    mma_16816(dp[nt + 1], va, bf[2], bf[3]);
                }
            }
            // s holds Pᵀ and dp becomes dSᵀ (rows: keys, columns: queries).
            flash_dkv_p(s, dp, scale_log2, lse2s, dlts, i0, lane, key_a, j0);
            if constexpr (ATOMIC_DQ) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int i = 0; i < 2; ++i)
                        *reinterpret_cast<uint32_t*>(dss + (warp * 16 + (lane >> 2) + 8 * i) * DS_STRIDE + nt * 8 +
                                                     2 * (lane & 3)) =
                            pack_bf16x2(dp[nt][2 * i] * scale, dp[nt][2 * i + 1] * scale);
            }
#pragma unroll
            for (int kk = 0; kk < QT / 16; ++kk) {
                uint32_t pa[4], da[4];
                flash_acc_to_a<NT>(pa, s, kk);
                flash_acc_to_a<NT>(da, dp, kk);
#pragma unroll
                for (int dt = 0; dt < DT; dt += 2) {
                    uint32_t bf[4];
                    flash_load_b<D>(bf, dos, kk * 16, dt * 8);
                    mma_16816(dva[dt], pa, bf[0], bf[1]);
                    mma_16816(dva[dt + 1], pa, bf[2], bf[3]);
                    flash_load_b<D>(bf, qs, kk * 16, dt * 8);
                    mma_16816(dka[dt], da, bf[0], bf[1]);
                    mma_16816(dka[dt + 1], da, bf[2], bf[3]);
                }
            }
            if constexpr (ATOMIC_DQ) {
                // dQ[QT][D] = dS[QT][64] · K[64][D]: warp w takes query rows (w & 1) * 16 and half
                // of the columns, reading every warp's dSᵀ rows.
                __syncthreads();
                const int h = g * group + it / per_head, m0 = (warp & 1) * 16, c0 = (warp >> 1) * (D / 2);
                float dqa[DT / 2][4];
#pragma unroll
                for (int i = 0; i < DT / 2; ++i) dqa[i][0] = dqa[i][1] = dqa[i][2] = dqa[i][3] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < FLASH_TILE / 16; ++kk) {
                    uint32_t a[4];
                    flash_load_a_trans(a, dss, DS_STRIDE, m0, kk * 16);
#pragma unroll
                    for (int dt = 0; dt < DT / 2; dt += 2) {
                        uint32_t bf[4];
                        flash_load_b<D>(bf, ks, kk * 16, c0 + dt * 8);
                        mma_16816(dqa[dt], a, bf[0], bf[1]);
                        mma_16816(dqa[dt + 1], a, bf[2], bf[3]);
                    }
                }
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const int row = i0 + m0 + (lane >> 2) + 8 * i;
                    if (row >= len) continue;
                    float* drow = dq_acc + (size_t)(q_begin + row) * q_stride + h * D + c0 + 2 * (lane & 3);
#pragma unroll
                    for (int dt = 0; dt < DT / 2; ++dt) atomic_add2(drow + dt * 8, dqa[dt][2 * i], dqa[dt][2 * i + 1]);
                }
            }
            __syncthreads();
        }
    }
    flash_dkv_store<D>(dk, dv, dka, dva, key_a, len, q_begin, KV, g, lane, scale);
}

#define FLASH_INSTANTIATE(D)                                                                                      \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS, 1)                                                 \
        flash_fwd_d##D(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* cu_q,       \
                       const int* k_start, const int* k_len, const int* tiles, int H, int KV, float scale) {      \
        flash_fwd<D>(out, lse, q, k, v, cu_q, k_start, k_len, tiles, H, KV, scale);                               \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS, 1)                                                 \
        flash_bwd_dq_d##D(bf16* dq, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,                \
                          const float* lse, const float* delta, const int* cu_q, const int* tiles, int H, int KV, \
                          float scale) {                                                                          \
        flash_bwd_dq<D>(dq, q, k, v, dout, lse, delta, cu_q, tiles, H, KV, scale);                                \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS, 1)                                                 \
        flash_bwd_dkv_d##D(bf16* dk, bf16* dv, const bf16* q, const bf16* k, const bf16* v, const bf16* dout,     \
                           const float* lse, const float* delta, const int* cu_q, const int* tiles,               \
                           const int* live_from, int H, int KV, float scale) {                                    \
        flash_bwd_dkv<D, false>(dk, dv, nullptr, q, k, v, dout, lse, delta, cu_q, tiles, live_from, H, KV, scale);\
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS, 1)                                                 \
        flash_bwd_dkv_dq_d##D(bf16* dk, bf16* dv, float* dq_acc, const bf16* q, const bf16* k, const bf16* v,     \
                              const bf16* dout, const float* lse, const float* delta, const int* cu_q,            \
                              const int* tiles, const int* live_from, int H, int KV, float scale) {               \
        flash_bwd_dkv<D, true>(dk, dv, dq_acc, q, k, v, dout, lse, delta, cu_q, tiles, live_from, H, KV, scale);  \
    }

FLASH_INSTANTIATE(64)
FLASH_INSTANTIATE(128)

// ---------------------------------------------------------------------------------------------------
// Hopper forward (sm_90a): the schedule of flash_fwd (64 query rows a warpgroup, 64-key tiles,
// online softmax in registers), with both products on wgmma: S = Q·Kᵀ takes Q from registers
// (loaded once) and K from shared memory (m64n64k16), O += P·V takes P from registers and V from
// shared memory (m64n{D}k16). A block is two warpgroups, 128 query rows of one head, that share each
// K and V tile. At 64 rows a block each byte of K and V brought from L2 feeds 64 FLOPs (a bf16
// element meets 64 query rows, a multiply and an add each): 500 TFLOP/s would take about 8 TB/s of
// L2 traffic, at or past what the L2 sustains (FlashAttention-2 and -3 take 128 rows at head_dim
// 128); 128 rows halve it. Each warpgroup pipelines its tiles (the softmax of tile t + 1 runs while
// P_t·V_t does), and the two warpgroups' softmaxes and products overlap each other. The tiles are
// laid out the way wgmma reads them: per 64 columns, a [rows][64] block of 128-byte rows with the
// 128-byte swizzle (16-byte chunk c of row r at chunk c ^ (r % 8)), each block 1024-byte aligned.
// Every other architecture runs flash_fwd.

// Warpgroups a block of the Hopper kernels (64 query rows, or 64 keys in the dK/dV kernels, each).
// The `_narrow` kernels have one: smaller blocks fit more to an SM (the forward's at head_dim 64:
// three instead of one), so short sequences, whose blocks spend much of their time loading their
// first tiles, may run better on them, at twice the L2 traffic a FLOP. Kept to measure which wins
// where.
#define HOPPER_WGS 2

// A barrier for every thread of the block that, unlike __syncthreads, may be reached at different
// places of the code (a warpgroup out of work waits at its own; PTX's non-.aligned form).
__device__ __forceinline__ void block_barrier() {
#ifdef RLHF_EMULATION
    emu::bar_sync(0, emu::block_threads());
#else
    asm volatile("barrier.sync 0;\n" ::: "memory");
#endif
}

// Named barrier `id` (1 .. 15) for COUNT threads, whole warps.
template <int COUNT>
__device__ __forceinline__ void named_barrier(int id) {
#ifdef RLHF_EMULATION
    emu::bar_sync(id, COUNT);
#else
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(COUNT) : "memory");
#endif
}

__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t value) {
#ifdef RLHF_EMULATION
    emu::st_shared_u32(addr, value);
#else
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(value));
#endif
}

// The thread's warpgroup, through a shuffle, which the compiler knows to be the same across a warp:
// computed from threadIdx.x alone, it cannot prove the wgmma branches warp-uniform and guards each
// with a WARPSYNC.
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffffu, threadIdx.x / FLASH_THREADS, 0); }

// A warpgroup's 64 of a query block's rows and the keys they see. The block loads every key tile
// one of its rows sees; a warpgroup computes over its own (in a causal sequence, the first one
// tile fewer), and one past the sequence's end over none.
struct FlashRowShare {
    int iq0, rows, n_keys, tiles;
};

__device__ __forceinline__ FlashRowShare flash_row_share(const FlashFwdTile& ft, int wg) {
    FlashRowShare r;
    r.iq0 = ft.iq0 + wg * FLASH_TILE;
    r.rows = max(0, min(FLASH_TILE, ft.len_q - r.iq0));
    r.n_keys = r.rows > 0 ? max(0, min(ft.offset + ft.len_q, ft.offset + r.iq0 + r.rows)) : 0;
    r.tiles = (r.n_keys + FLASH_TILE - 1) / FLASH_TILE;
    return r;
}

#define HOPPER_BLOCK_BYTES (FLASH_TILE * 128)

template <bool B>
struct CompileTimeBool {
    static constexpr bool value = B;
};  // one [64 rows][64 columns] bf16 block

// The first 1024-byte boundary of a Hopper kernel's dynamic shared memory, where its swizzled tiles
// start (the 128-byte swizzle repeats every 1024 bytes); the host gives each kernel 1 KiB more.
__device__ __forceinline__ uint32_t hopper_smem_base(const unsigned char* smem) {
    return (smem_u32(smem) + 1023) & ~1023u;
}

// The 128-byte-swizzled address of 16-byte chunk `chunk` (of D / 8) in row `row` of a [64][D] tile.
// (Host-callable, like the descriptors below, so tests/host/attention_layout_check.cu can check
// them against the wgmma layouts.)
__host__ __device__ __forceinline__ uint32_t hopper_swizzle(int row, int chunk) {
    return (chunk >> 3) * HOPPER_BLOCK_BYTES + row * 128 + (((chunk & 7) ^ (row & 7)) << 4);
}

// The address lane `lane` of warp `warp` gives ldmatrix.x4 for k-step kk of a swizzled [64][D]
// tile, so that the four 8x8 matrices arrive in the mma.sync (and wgmma) A layout of the warp's 16
// rows: lane i gives row i % 8 of matrix i / 8; matrices 1 and 3 are rows 8 to 15, matrices 2 and 3
// columns 8 to 15 of the k-step.
__host__ __device__ __forceinline__ uint32_t hopper_a_frag_offset(int warp, int lane, int kk) {
    return hopper_swizzle(warp * 16 + (lane & 15), 2 * kk + (lane >> 4));
}

// Where hopper_load_tile's copies go: a block of THREADS threads fills swizzled [64][D] tiles.
template <int D, int THREADS>
struct HopperLoad {
    static constexpr int CHUNKS = D / 8, ROW_STEP = THREADS / CHUNKS, TILE_BYTES = FLASH_TILE * D * 2;
    static_assert(ROW_STEP % 8 == 0 && FLASH_TILE % ROW_STEP == 0, "rows must keep their swizzle phase");
    // Thread tid's j-th copy, row tid / CHUNKS + j * ROW_STEP (counted from the first tile's) and
    // 16-byte chunk tid % CHUNKS, lands at first(tid) + step(j) from the first tile. Rows step by a
    // multiple of 8, so the swizzled chunk is the same in every row; tid / CHUNKS < ROW_STEP, which
    // divides 64, so row tid / CHUNKS + r stays in tile r / 64.
    __host__ __device__ static uint32_t first(int tid) { return hopper_swizzle(tid / CHUNKS, tid % CHUNKS); }
    __host__ __device__ static constexpr uint32_t step(int j) {
        return (j * ROW_STEP / FLASH_TILE) * TILE_BYTES + (j * ROW_STEP % FLASH_TILE) * 128;
    }
};

// Rows row0 .. row0 + ROWS of a [*, row_stride] bf16 matrix into swizzled [64][D] tiles from `tile`
// on (rows 64 .. 127 in the next tile), by a block of THREADS threads; rows at or past n_valid are
// zero-filled.
template <int D, int ROWS = FLASH_TILE, int THREADS = FLASH_THREADS>
__device__ __forceinline__ void hopper_load_tile(uint32_t tile, const bf16* g, size_t row_stride, int row0,
                                                 int n_valid) {
    using L = HopperLoad<D, THREADS>;
    static_assert(ROWS % L::ROW_STEP == 0, "rows must split evenly over the block");
    const int r0 = threadIdx.x / L::CHUNKS, c = threadIdx.x % L::CHUNKS;
    const bf16* src = g + (size_t)(row0 + r0) * row_stride + c * 8;
    const uint32_t dst = tile + L::first(threadIdx.x);
    const size_t src_step = (size_t)L::ROW_STEP * row_stride;
#pragma unroll
    for (int j = 0; j < ROWS / L::ROW_STEP; ++j) {
        const bool ok = r0 + j * L::ROW_STEP < n_valid;
        cp_async16(dst + L::step(j), ok ? src + j * src_step : g, ok);
    }
}

// A wgmma shared-memory descriptor for the 128-byte swizzle: start address, leading and stride
// byte offsets (16-byte units), swizzle mode 1 in bits 62-63.
__host__ __device__ __forceinline__ uint64_t hopper_desc(uint32_t addr, uint32_t leading, uint32_t stride) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(leading >> 4) << 16) | ((uint64_t)(stride >> 4) << 32) |
           (1ull << 62);
}

// K-major operand (Q as A, K as B) at k-step kk (16 columns): 32 bytes into the row within a
// 64-column block, the next block every four steps; 8-row groups 1024 bytes apart.
__host__ __device__ __forceinline__ uint64_t hopper_desc_k(uint32_t tile, int kk) {
    return hopper_desc(tile + (kk >> 2) * HOPPER_BLOCK_BYTES + (kk & 3) * 32, 16, 1024);
}

// MN-major operand (V as B, N = head_dim contiguous) at k-step kk (16 keys): 16 rows of 128 bytes
// on; 64-column blocks HOPPER_BLOCK_BYTES apart (leading), 8-key groups 1024 bytes apart (stride).
__host__ __device__ __forceinline__ uint64_t hopper_desc_mn(uint32_t tile, int kk) {
    return hopper_desc(tile + kk * 16 * 128, HOPPER_BLOCK_BYTES, 1024);
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef RLHF_EMULATION
    emu::wgmma_fence();
#elif defined(HOPPER_WGMMA)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef RLHF_EMULATION
    emu::wgmma_commit();
#elif defined(HOPPER_WGMMA)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Waits until at most N of the warpgroup's committed wgmma groups are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef RLHF_EMULATION
    emu::wgmma_wait(N);
#elif defined(HOPPER_WGMMA)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
__device__ __forceinline__ void wgmma_wait_all() { wgmma_wait<0>(); }
// The compiler must assume `x` changes here (it is the same register on both sides).
__device__ __forceinline__ void compiler_fence(float& x) {
#ifndef RLHF_EMULATION
    asm volatile("" : "+f"(x)::"memory");
#endif
}
__device__ __forceinline__ void compiler_fence(uint32_t& x) {
#ifndef RLHF_EMULATION
    asm volatile("" : "+r"(x)::"memory");
#endif
}
// Ties accumulators to the point after a wgmma wait, so the compiler reads none of them before it.
template <int N>
__device__ __forceinline__ void wgmma_fence_regs(float (&d)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) compiler_fence(d[i][e]);
}
// The same for register operands: their producing instructions stay before the wgmma fence.
template <int N>
__device__ __forceinline__ void wgmma_fence_regs(uint32_t (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) compiler_fence(a[i][e]);
}
// cp.async writes through the generic proxy; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef RLHF_EMULATION
    emu::fence_proxy_async();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Operand lists of the wgmma wrappers: the accumulators of an m64nN tile, N / 8 groups of four.
#define WGMMA_ACC_N32(d) \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), \
    "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), \
    "+f"(d[3][2]), "+f"(d[3][3])
#define WGMMA_ACC_N64(d) \
    WGMMA_ACC_N32(d), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), \
    "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), \
    "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
#define WGMMA_ACC_N128(d) \
    WGMMA_ACC_N64(d), \
    "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), \
    "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), \
    "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), \
    "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), \
    "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
#define WGMMA_REGS_16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define WGMMA_REGS_32 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WGMMA_REGS_64 \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// d (+)= A·B for m64n64k16, A and B from shared memory, f32 accumulators in the mma.sync m16n8
// layout per warp and n8 tile. TA / TB: the operand is stored MN-major (M or N contiguous), else
// K-major. `accumulate` 0 overwrites d.
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n64_ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
#ifdef RLHF_EMULATION
    emu::wgmma(&d[0][0], 64, nullptr, desc_a, desc_b, accumulate, TA, TB);
#elif defined(HOPPER_WGMMA)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGMMA_REGS_32
                 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : WGMMA_ACC_N64(d)
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TA), "n"(TB));
#endif
}

// The same for m64n32k16.
template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n32_ss(float (&d)[4][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
#ifdef RLHF_EMULATION
    emu::wgmma(&d[0][0], 32, nullptr, desc_a, desc_b, accumulate, TA, TB);
#elif defined(HOPPER_WGMMA)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 " WGMMA_REGS_16
                 ", %16, %17, p, 1, 1, %19, %20;\n}\n"
                 : WGMMA_ACC_N32(d)
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TA), "n"(TB));
#endif
}

// d (+)= A·B for m64n64k16, A (bf16) from registers in the mma.sync m16k16 layout per warp, B from
// shared memory; TB: B is stored MN-major (N contiguous), else K-major. `accumulate` 0 overwrites d.
template <int TB>
__device__ __forceinline__ void wgmma_m64n64_rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b,
                                                int accumulate) {
#ifdef RLHF_EMULATION
    emu::wgmma(&d[0][0], 64, a, 0, desc_b, accumulate, 0, TB);
#elif defined(HOPPER_WGMMA)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " WGMMA_REGS_32
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                 : WGMMA_ACC_N64(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TB));
#endif
}

// d += A·B for m64nNk16 (N = 64, 128), A (bf16) from registers in the mma.sync m16k16 layout per
// warp, B from shared memory stored MN-major (N contiguous: the transpose flag).
__device__ __forceinline__ void wgmma_m64n64_rs_bt(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
    wgmma_m64n64_rs<1>(d, a, desc_b, 1);
}

__device__ __forceinline__ void wgmma_m64n128_rs_bt(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b) {
#ifdef RLHF_EMULATION
    emu::wgmma(&d[0][0], 128, a, 0, desc_b, 1, 0, 1);
#elif defined(HOPPER_WGMMA)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " WGMMA_REGS_64
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : WGMMA_ACC_N128(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
#endif
}

template <int D>
__device__ __forceinline__ void wgmma_pv(float (&o)[D / 8][4], const uint32_t (&a)[4], uint64_t desc_b) {
    if constexpr (D == 64) wgmma_m64n64_rs_bt(o, a, desc_b);
    else wgmma_m64n128_rs_bt(o, a, desc_b);
}

template <int D, int WGS>
__device__ void flash_fwd_hopper(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q,
                                 const bf16* __restrict__ k, const bf16* __restrict__ v,
                                 const int* __restrict__ cu_q, const int* __restrict__ k_start,
                                 const int* __restrict__ k_len, const int* __restrict__ tiles, int H, int KV,
                                 float scale) {
#ifdef HOPPER_WGMMA
    constexpr int NT = FLASH_TILE / 8, DT = D / 8, TILE_BYTES = FLASH_TILE * D * 2;
    constexpr int ROWS = FLASH_TILE * WGS, THREADS = FLASH_THREADS * WGS;
    DYNAMIC_SMEM(unsigned char, flash_smem);
    // One Q tile per warpgroup, then two stages of (K, V) that the warpgroups share.
    const uint32_t base = hopper_smem_base(flash_smem);
    const int wg = warpgroup_index(), wt = threadIdx.x % FLASH_THREADS;
    const uint32_t qs = base + wg * TILE_BYTES;
    auto ks = [&](int stage) { return base + (WGS + 2 * stage) * TILE_BYTES; };
    auto vs = [&](int stage) { return base + (WGS + 1 + 2 * stage) * TILE_BYTES; };
    const FlashFwdTile ft = flash_fwd_tile<D, ROWS>(k, v, cu_q, k_start, k_len, tiles, H, KV);
    const int h = ft.h, q_begin = ft.q_begin, len_q = ft.len_q, offset = ft.offset;
    const int warp = wt >> 5, lane = wt & 31;
    const size_t kv_stride = (size_t)KV * D, q_stride = (size_t)H * D;
    const bf16 *kg = ft.kg, *vg = ft.vg;
    const float scale_log2 = scale * FLASH_LOG2E;
    const int n_tiles = (ft.n_keys + FLASH_TILE - 1) / FLASH_TILE;
    const FlashRowShare share = flash_row_share(ft, wg);
    const int iq0 = share.iq0, rows = share.rows, n_keys = share.n_keys, my_tiles = share.tiles;

    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const int row_a = iq0 + warp * 16 + (lane >> 2);
    const int last_key[2] = {offset + row_a, offset + row_a + 8};

    // Pipelined over key tiles: while P_t·V_t runs on the tensor cores, the softmax of tile t + 1
    // (whose S was issued just before) runs on the CUDA cores; only the output rescale waits for
    // P_t·V_t. K runs one tile ahead of V, so copy group t brings K_{t+2} and V_{t+1}: two stages of
    // each suffice, and a group has a whole iteration to land.
    auto load_k = [&](int t) {
        hopper_load_tile<D, FLASH_TILE, THREADS>(ks(t & 1), kg, kv_stride, t * FLASH_TILE,
                                                 min(FLASH_TILE, ft.n_keys - t * FLASH_TILE));
    };
    auto load_v = [&](int t) {
        hopper_load_tile<D, FLASH_TILE, THREADS>(vs(t & 1), vg, kv_stride, t * FLASH_TILE,
                                                 min(FLASH_TILE, ft.n_keys - t * FLASH_TILE));
    };
    // Iteration t's copies, by the whole block: group t - 1 (K_{t+1}, V_t) landed and every thread
    // is past iteration t - 1, so the stages of K_t (read by S_t) and V_{t-1} (read by
    // P_{t-1}·V_{t-1}) are free. A warpgroup out of tiles still takes part.
    auto sync_and_load = [&](int t) {
        cp_async_wait<0>();
        fence_proxy_async();
        block_barrier();
        if (t + 2 < n_tiles) load_k(t + 2);
        if (t + 1 < n_tiles) load_v(t + 1);
        cp_async_commit();
    };
    // Q stays in registers as the A operand of S = Q·Kᵀ: an S product then reads only K from shared
    // memory, 2 KB instead of 4 a 64x64x16 step, whose 4 KB would take shared memory's whole
    // bandwidth at the tensor cores' rate, with the tile copies and P·V's reads of V still to come.
    uint32_t qa[D / 16][4];
    auto issue_s = [&](float (&s)[NT][4], int t) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) wgmma_m64n64_rs<0>(s, qa[kk], hopper_desc_k(ks(t & 1), kk), kk > 0);
        wgmma_commit();
    };
    auto softmax = [&](float (&s)[NT][4], float (&alpha)[2], int t) {
        flash_softmax_scores(s, m, l, alpha, scale_log2, t * FLASH_TILE, lane, last_key, n_keys, offset + iq0);
    };

    hopper_load_tile<D, ROWS, THREADS>(base, q + (size_t)q_begin * q_stride + h * D, q_stride, ft.iq0, ft.rows);
    if (n_tiles > 0) load_k(0);
    cp_async_commit();
    if (n_tiles > 1) load_k(1);
    if (n_tiles > 0) load_v(0);
    cp_async_commit();

    // P of the tile whose P·V is next, as wgmma A operands.
    uint32_t pa[FLASH_TILE / 16][4];
    if (n_tiles > 0) {
        cp_async_wait<1>();
        fence_proxy_async();
        block_barrier();
    }
    if (my_tiles > 0) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qa[kk], qs + hopper_a_frag_offset(warp, lane, kk));
        float s[NT][4], alpha[2];
        issue_s(s, 0);
        wgmma_wait_all();
        wgmma_fence_regs(s);
        softmax(s, alpha, 0);  // o is still zero: nothing to rescale
#pragma unroll
        for (int kk = 0; kk < FLASH_TILE / 16; ++kk) flash_acc_to_a<NT>(pa[kk], s, kk);
    }
    // One iteration; NEXT (known at compile time: ptxas serialises every wgmma of a kernel whose
    // issue or wait of S_{t+1} is conditional at run time) says whether tile t + 1 exists.
    auto step = [&](int t, auto next) {
        constexpr bool NEXT = decltype(next)::value;
        sync_and_load(t);
        float s[NT][4], alpha[2];
        if constexpr (NEXT) issue_s(s, t + 1);
        wgmma_fence_regs(pa);
        wgmma_fence_regs(o);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < FLASH_TILE / 16; ++kk) wgmma_pv<D>(o, pa[kk], hopper_desc_mn(vs(t & 1), kk));
        wgmma_commit();
        if constexpr (NEXT) {
            wgmma_wait<1>();  // S_{t+1} done
            wgmma_fence_regs(s);
            softmax(s, alpha, t + 1);
        }
        wgmma_wait_all();
        wgmma_fence_regs(o);
        if constexpr (NEXT) {
            flash_rescale(o, alpha);
#pragma unroll
            for (int kk = 0; kk < FLASH_TILE / 16; ++kk) flash_acc_to_a<NT>(pa[kk], s, kk);
        }
    };
    for (int t = 0; t + 1 < my_tiles; ++t) step(t, CompileTimeBool<true>{});
    if (my_tiles > 0) step(my_tiles - 1, CompileTimeBool<false>{});
    for (int t = my_tiles; t < n_tiles; ++t) sync_and_load(t);
    cp_async_wait<0>();

    if (rows > 0) flash_fwd_store<D>(out, lse, o, m, l, row_a, len_q, q_begin, H, h, lane);
#else
    // Only sm_90a has wgmma; the host launches these kernels on compute capability 9.0 alone, so
    // reaching this is a dispatch bug, and it must not pass for a result.
    __trap();
#endif
}

// Adds a warpgroup's dQ tile (`COLS` columns from col0, accumulators in the mma.sync m16n8 layout,
// `row` the thread's first row in the sequence) into the f32 dq_acc, two floats an atomic.
template <int COLS>
__device__ __forceinline__ void flash_dq_atomics(float* dq_acc, const float (&dqa)[COLS / 8][4], int row, int len,
                                                 int q_begin, size_t q_stride, int h, int D, int col0, int lane) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (row + 8 * i >= len) continue;
        float* drow = dq_acc + (size_t)(q_begin + row + 8 * i) * q_stride + h * D + col0 + 2 * (lane & 3);
#pragma unroll
        for (int dt = 0; dt < COLS / 8; ++dt) atomic_add2(drow + dt * 8, dqa[dt][2 * i], dqa[dt][2 * i + 1]);
    }
}

// Hopper backward (sm_90a), the fast mode's schedule on wgmma: a block (two warpgroups) owns 128
// keys of one kv head, 64 a warpgroup, and loops over the query heads of its group and the 64-row
// query tiles that see them; both warpgroups read each Q and dO tile, which halves that L2 traffic
// against blocks of 64 keys. Per tile, each warpgroup: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (shared-memory
// operands), Pᵀ and dSᵀ in registers, dV += Pᵀ·dO and dK += dSᵀ·Q (Pᵀ and dSᵀ from registers, dO
// and Q read MN-major). Then scale·dSᵀ goes to shared memory and dQ = dS·K (both operands MN-major)
// is added into the f32 dq_acc with atomics: each warpgroup takes D / WGS of dQ's columns over
// the block's 128 keys, so a dQ element gets one atomic a block rather than two. At head_dim 128 a
// warpgroup's 64 columns are one swizzled column block of the K tiles, read MN-major; at 64 its 32
// would start half-way into the K tiles' 128-byte rows, so the block first writes a K-major copy
// of Kᵀ ([64 d][128 keys]) whose 32-row halves are whole swizzle atoms. In a causal sequence the second warpgroup's first query
// tile is wholly masked; it runs it anyway (P = 0) so that every wgmma stays unconditional.
// The two warpgroups meet at two barriers a tile, so their phases (products, then the elementwise
// dS) line up, where two one-warpgroup blocks on an SM drift apart and overlap each other's phases:
// WGS = 1 builds that variant (64 keys a block, the `_narrow` kernels), kept to measure which wins.
template <int D, bool ATOMIC_DQ, int WGS>
__device__ void flash_bwd_hopper(bf16* __restrict__ dk, bf16* __restrict__ dv, float* __restrict__ dq_acc,
                                 const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                                 const bf16* __restrict__ dout, const float* __restrict__ lse,
                                 const float* __restrict__ delta, const int* __restrict__ cu_q,
                                 const int* __restrict__ tiles, const int* __restrict__ live_from, int H, int KV,
                                 float scale) {
#ifdef HOPPER_WGMMA
    constexpr int QT = FLASH_TILE, NT = QT / 8, DT = D / 8, TILE_BYTES = FLASH_TILE * D * 2;
    constexpr int KEYS = FLASH_TILE * WGS, THREADS = FLASH_THREADS * WGS;
    DYNAMIC_SMEM(unsigned char, flash_smem);
    // K (a tile per warpgroup), V (the same), two stages of (Q, dO), dSᵀ (a [64][64] block per
    // warpgroup), Kᵀ where KT_COPY (a [64 d][64 keys] block per warpgroup), then two stages of
    // scaled lse and delta.
    constexpr bool KT_COPY = ATOMIC_DQ && (D / 64) % WGS != 0;
    static_assert(!KT_COPY || D == 64, "the Kᵀ copy is laid out for head_dim 64");
    const uint32_t base = hopper_smem_base(flash_smem);
    const int wg = warpgroup_index(), wt = threadIdx.x % FLASH_THREADS;
    auto k_tile = [&](int w) { return base + w * TILE_BYTES; };
    auto ds_block = [&](int w) { return base + (2 * WGS + 4) * TILE_BYTES + w * HOPPER_BLOCK_BYTES; };
    const uint32_t ks = k_tile(wg), vs = base + (WGS + wg) * TILE_BYTES, dss = ds_block(wg);
    auto qs = [&](int stage) { return base + (2 * WGS + 2 * stage) * TILE_BYTES; };
    auto dos = [&](int stage) { return base + (2 * WGS + 1 + 2 * stage) * TILE_BYTES; };
    auto kt_block = [&](int w) { return ds_block(WGS) + w * HOPPER_BLOCK_BYTES; };
    float* lse2s0 = reinterpret_cast<float*>(flash_smem + (kt_block(KT_COPY ? WGS : 0) - smem_u32(flash_smem)));
    float* dlts0 = lse2s0 + 2 * QT;
    const FlashBwdTile bt = flash_bwd_tile<KEYS>(cu_q, tiles, live_from, H, KV);
    const int j0 = bt.j0, g = bt.g, group = bt.group, q_begin = bt.q_begin, len = bt.len, nk = bt.nk;
    const int warp = wt >> 5, lane = wt & 31;
    const size_t kv_stride = (size_t)KV * D, q_stride = (size_t)H * D;
    const float scale_log2 = scale * FLASH_LOG2E;

    hopper_load_tile<D, KEYS, THREADS>(k_tile(0), k + (size_t)q_begin * kv_stride + g * D, kv_stride, j0, nk);
    hopper_load_tile<D, KEYS, THREADS>(base + WGS * TILE_BYTES, v + (size_t)q_begin * kv_stride + g * D, kv_stride,
                                       j0, nk);

    float dka[DT][4], dva[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[i][e] = dva[i][e] = 0.0f;
    const int jw = j0 + wg * FLASH_TILE;  // this warpgroup's first key
    const int key_a = jw + warp * 16 + (lane >> 2);

    // Query tiles from the one holding j0 (a multiple of KEYS) to the end, for each query head.
    // (Past the sequence's dead rows, as flash_bwd_dkv.)
    const int i_first = max(j0, bt.live / QT * QT);
    const int per_head = (len - i_first + QT - 1) / QT;
    const int steps = group * per_head;
    auto load_q = [&](int it) {
        const int h = g * group + it / per_head, i0 = i_first + (it % per_head) * QT;
        const int nq = min(QT, len - i0), stage = it & 1;
        hopper_load_tile<D, QT, THREADS>(qs(stage), q + (size_t)q_begin * q_stride + h * D, q_stride, i0, nq);
        hopper_load_tile<D, QT, THREADS>(dos(stage), dout + (size_t)q_begin * q_stride + h * D, q_stride, i0, nq);
        flash_stage_rows<QT>(lse2s0 + stage * QT, dlts0 + stage * QT, lse, delta, q_begin, i0, len, H, h);
    };
    load_q(0);
    cp_async_commit();
    for (int it = 0; it < steps; ++it) {
        const int h = g * group + it / per_head, i0 = i_first + (it % per_head) * QT, stage = it & 1;
        // Stage `it` landed; every thread is past iteration it - 1 (its stage, and dSᵀ, are free).
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (it + 1 < steps) load_q(it + 1);
        cp_async_commit();
        if constexpr (KT_COPY) {
            // Once, the K tiles having landed: Kᵀ two keys a store, a warp a 128-byte row (no bank
            // conflicts on the stores; the reads, once a block, may conflict). The dQ product's
            // fence and barrier below order it before wgmma reads it.
            if (it == 0) {
                for (int e = threadIdx.x; e < KEYS * D / 2; e += THREADS) {
                    const int w = e / (FLASH_TILE * D / 2), d = e / (FLASH_TILE / 2) % D, kp = e % (FLASH_TILE / 2);
                    auto at = [&](int key) {
                        const uint32_t a = k_tile(w) + hopper_swizzle(key, d >> 3) + (d & 7) * 2;
                        return *reinterpret_cast<const unsigned short*>(flash_smem + (a - smem_u32(flash_smem)));
                    };
                    const uint32_t pair = at(2 * kp) | (uint32_t)at(2 * kp + 1) << 16;
                    st_shared_u32(kt_block(w) + hopper_swizzle(d, kp >> 2) + (kp & 3) * 4, pair);
                }
            }
        }
        const float* lse2s = lse2s0 + stage * QT;
        const float* dlts = dlts0 + stage * QT;

        float s[NT][4], dp[NT][4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            wgmma_m64n64_ss<0, 0>(s, hopper_desc_k(ks, kk), hopper_desc_k(qs(stage), kk), kk > 0);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            wgmma_m64n64_ss<0, 0>(dp, hopper_desc_k(vs, kk), hopper_desc_k(dos(stage), kk), kk > 0);
        wgmma_commit();
        wgmma_wait_all();
        wgmma_fence_regs(s);
        wgmma_fence_regs(dp);

        flash_dkv_p(s, dp, scale_log2, lse2s, dlts, i0, lane, key_a, jw);
        // scale·dSᵀ into this warpgroup's swizzled [64 keys][64 queries] block for the dQ product.
        if constexpr (ATOMIC_DQ) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const int row = warp * 16 + (lane >> 2) + 8 * i, col = nt * 8 + 2 * (lane & 3);
                    const uint32_t at = dss + hopper_swizzle(row, col >> 3) + (col & 7) * 2;
                    st_shared_u32(at, pack_bf16x2(dp[nt][2 * i] * scale, dp[nt][2 * i + 1] * scale));
                }
        }
        uint32_t pa[QT / 16][4], da[QT / 16][4];
#pragma unroll
        for (int kk = 0; kk < QT / 16; ++kk) {
            flash_acc_to_a<NT>(pa[kk], s, kk);
            flash_acc_to_a<NT>(da[kk], dp, kk);
        }
        wgmma_fence_regs(pa);
        wgmma_fence_regs(da);
        wgmma_fence_regs(dka);
        wgmma_fence_regs(dva);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < QT / 16; ++kk) wgmma_pv<D>(dva, pa[kk], hopper_desc_mn(dos(stage), kk));
#pragma unroll
        for (int kk = 0; kk < QT / 16; ++kk) wgmma_pv<D>(dka, da[kk], hopper_desc_mn(qs(stage), kk));
        wgmma_commit();

        if constexpr (ATOMIC_DQ) {
            // dQ, each warpgroup D / WGS columns over every warpgroup's keys: one atomic a dQ
            // element a block. The dSᵀ blocks (and Kᵀ) the product reads are written by both
            // warpgroups.
            fence_proxy_async();
            __syncthreads();
            if constexpr (KT_COPY) {
                constexpr int COLS = D / WGS;
                static_assert(COLS == 32, "m64n32 products");
                const int col0 = wg * COLS;
                float dqa[4][4];
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < KEYS / 16; ++kk)
                    wgmma_m64n32_ss<1, 0>(dqa, hopper_desc_mn(ds_block(kk / 4), kk % 4),
                                          hopper_desc_k(kt_block(0) + col0 * 128, kk), kk > 0);
                wgmma_commit();
                wgmma_wait_all();
                wgmma_fence_regs(dqa);
                flash_dq_atomics<COLS>(dq_acc, dqa, i0 + warp * 16 + (lane >> 2), len, q_begin, q_stride, h, D,
                                       col0, lane);
            } else {
                // 64 columns at a time (registers): a column block of the K tiles, MN-major.
                constexpr int MINE = D / 64 / WGS;
#pragma unroll
                for (int ci = 0; ci < MINE; ++ci) {
                    const int col0 = (wg + ci * WGS) * 64;
                    float dqa[8][4];
                    wgmma_fence();
#pragma unroll
                    for (int w = 0; w < WGS; ++w) {
                        const uint32_t k_cols = k_tile(w) + (col0 / 64) * HOPPER_BLOCK_BYTES;
#pragma unroll
                        for (int kk = 0; kk < FLASH_TILE / 16; ++kk)
                            wgmma_m64n64_ss<1, 1>(dqa, hopper_desc_mn(ds_block(w), kk), hopper_desc_mn(k_cols, kk),
                                                  w > 0 || kk > 0);
                    }
                    wgmma_commit();
                    wgmma_wait_all();
                    wgmma_fence_regs(dqa);
                    flash_dq_atomics<64>(dq_acc, dqa, i0 + warp * 16 + (lane >> 2), len, q_begin, q_stride, h, D,
                                         col0, lane);
                }
            }
        } else {
            wgmma_wait_all();  // dV and dK, before their operands' stages are reloaded
        }
        wgmma_fence_regs(dka);
        wgmma_fence_regs(dva);
    }
    cp_async_wait<0>();
    flash_dkv_store<D>(dk, dv, dka, dva, key_a, len, q_begin, KV, g, lane, scale);
#else
    // Only sm_90a has wgmma; the host launches these kernels on compute capability 9.0 alone, so
    // reaching this is a dispatch bug, and it must not pass for a result.
    __trap();
#endif
}

// The deterministic mode's dQ on wgmma: a block of WGS warpgroups owns 64 query rows of one head a
// warpgroup and loops over the 64-key tiles they see, K and V tiles shared as in the forward: S =
// Q·Kᵀ and dP = dO·Vᵀ from shared memory, dS in registers, dQ += dS·K with dS as the register
// operand and K read MN-major. Every dQ row is written by one block, so with flash_bwd_dkv_hopper
// (the dK/dV kernel without its dQ part) the backward has no atomics.
template <int D, int WGS>
__device__ void flash_bwd_dq_hopper(bf16* __restrict__ dq, const bf16* __restrict__ q, const bf16* __restrict__ k,
                                    const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                    const float* __restrict__ lse, const float* __restrict__ delta,
                                    const int* __restrict__ cu_q, const int* __restrict__ tiles, int H, int KV,
                                    float scale) {
#ifdef HOPPER_WGMMA
    constexpr int NT = FLASH_TILE / 8, DT = D / 8, TILE_BYTES = FLASH_TILE * D * 2;
    constexpr int ROWS = FLASH_TILE * WGS, THREADS = FLASH_THREADS * WGS;
    DYNAMIC_SMEM(unsigned char, flash_smem);
    // Q (a tile per warpgroup), dO (the same), then two stages of (K, V).
    const uint32_t base = hopper_smem_base(flash_smem);
    const int wg = warpgroup_index(), wt = threadIdx.x % FLASH_THREADS;
    const uint32_t qs = base + wg * TILE_BYTES, dos = base + (WGS + wg) * TILE_BYTES;
    auto ks = [&](int stage) { return base + (2 * WGS + 2 * stage) * TILE_BYTES; };
    auto vs = [&](int stage) { return base + (2 * WGS + 1 + 2 * stage) * TILE_BYTES; };
    const FlashFwdTile ft = flash_fwd_tile<D, ROWS>(k, v, cu_q, nullptr, nullptr, tiles, H, KV);
    const int h = ft.h, q_begin = ft.q_begin, len = ft.len_q;
    const int warp = wt >> 5, lane = wt & 31;
    const size_t kv_stride = (size_t)KV * D, q_stride = (size_t)H * D;
    const bf16 *kg = ft.kg, *vg = ft.vg;
    const float scale_log2 = scale * FLASH_LOG2E;
    const int n_tiles = (ft.n_keys + FLASH_TILE - 1) / FLASH_TILE;
    const FlashRowShare share = flash_row_share(ft, wg);
    const int iq0 = share.iq0, rows = share.rows, n_keys = share.n_keys, my_tiles = share.tiles;

    const int row_a = iq0 + warp * 16 + (lane >> 2);
    float lse2[2], dlt[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = row_a + 8 * i;
        const bool ok = row < len;
        lse2[i] = ok ? lse[(size_t)(q_begin + row) * H + h] * FLASH_LOG2E : INFINITY;
        dlt[i] = ok ? delta[(size_t)(q_begin + row) * H + h] : 0.0f;
    }
    auto load_kv = [&](int t) {
        const int nv = min(FLASH_TILE, ft.n_keys - t * FLASH_TILE);
        hopper_load_tile<D, FLASH_TILE, THREADS>(ks(t & 1), kg, kv_stride, t * FLASH_TILE, nv);
        hopper_load_tile<D, FLASH_TILE, THREADS>(vs(t & 1), vg, kv_stride, t * FLASH_TILE, nv);
    };
    hopper_load_tile<D, ROWS, THREADS>(base, q + (size_t)q_begin * q_stride + h * D, q_stride, ft.iq0, ft.rows);
    hopper_load_tile<D, ROWS, THREADS>(base + WGS * TILE_BYTES, dout + (size_t)q_begin * q_stride + h * D, q_stride,
                                       ft.iq0, ft.rows);
    if (n_tiles > 0) load_kv(0);
    cp_async_commit();

    // Tile t landed; every thread is past iteration t - 1, whose stage tile t + 1 reuses. A
    // warpgroup out of tiles still takes part.
    auto sync_and_load = [&](int t) {
        cp_async_wait<0>();
        fence_proxy_async();
        block_barrier();
        if (t + 1 < n_tiles) load_kv(t + 1);
        cp_async_commit();
    };
    float acc[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    for (int t = 0; t < my_tiles; ++t) {
        const int n0 = t * FLASH_TILE;
        sync_and_load(t);
        float s[NT][4], dp[NT][4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            wgmma_m64n64_ss<0, 0>(s, hopper_desc_k(qs, kk), hopper_desc_k(ks(t & 1), kk), kk > 0);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            wgmma_m64n64_ss<0, 0>(dp, hopper_desc_k(dos, kk), hopper_desc_k(vs(t & 1), kk), kk > 0);
        wgmma_commit();
        wgmma_wait_all();
        wgmma_fence_regs(s);
        wgmma_fence_regs(dp);
        flash_dq_ds(s, dp, scale_log2, lse2, dlt, n0, lane, row_a, n_keys, iq0);
        uint32_t da[FLASH_TILE / 16][4];
#pragma unroll
        for (int kk = 0; kk < FLASH_TILE / 16; ++kk) flash_acc_to_a<NT>(da[kk], s, kk);
        wgmma_fence_regs(da);
        wgmma_fence_regs(acc);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < FLASH_TILE / 16; ++kk) wgmma_pv<D>(acc, da[kk], hopper_desc_mn(ks(t & 1), kk));
        wgmma_commit();
        wgmma_wait_all();
        wgmma_fence_regs(acc);
    }
    for (int t = my_tiles; t < n_tiles; ++t) sync_and_load(t);
    cp_async_wait<0>();
    if (rows > 0) flash_rows_store<D>(dq, acc, row_a, len, q_begin, H, h, lane, scale);
#else
    // Only sm_90a has wgmma; the host launches these kernels on compute capability 9.0 alone, so
    // reaching this is a dispatch bug, and it must not pass for a result.
    __trap();
#endif
}

#define HOPPER_WIDTH_INSTANTIATE(D, WGS, SUFFIX)                                                                   \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS * WGS, 1)                                           \
        flash_fwd_hopper##SUFFIX##_d##D(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,        \
                                        const int* cu_q, const int* k_start, const int* k_len, const int* tiles,   \
                                        int H, int KV, float scale) {                                              \
        flash_fwd_hopper<D, WGS>(out, lse, q, k, v, cu_q, k_start, k_len, tiles, H, KV, scale);                   \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS * WGS, 1)                                           \
        flash_bwd_hopper##SUFFIX##_d##D(bf16* dk, bf16* dv, float* dq_acc, const bf16* q, const bf16* k,           \
                                        const bf16* v, const bf16* dout, const float* lse, const float* delta,     \
                                        const int* cu_q, const int* tiles, const int* live_from, int H, int KV,    \
                                        float scale) {                                                             \
        flash_bwd_hopper<D, true, WGS>(dk, dv, dq_acc, q, k, v, dout, lse, delta, cu_q, tiles, live_from, H, KV,   \
                                       scale);                                                                     \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS * WGS, 1)                                           \
        flash_bwd_dkv_hopper##SUFFIX##_d##D(bf16* dk, bf16* dv, const bf16* q, const bf16* k, const bf16* v,       \
                                            const bf16* dout, const float* lse, const float* delta,                \
                                            const int* cu_q, const int* tiles, const int* live_from, int H, int KV, \
                                            float scale) {                                                         \
        flash_bwd_hopper<D, false, WGS>(dk, dv, nullptr, q, k, v, dout, lse, delta, cu_q, tiles, live_from, H, KV, \
                                        scale);                                                                    \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS * WGS, 1)                                           \
        flash_bwd_dq_hopper##SUFFIX##_d##D(bf16* dq, const bf16* q, const bf16* k, const bf16* v,                  \
                                           const bf16* dout, const float* lse, const float* delta,                 \
                                           const int* cu_q, const int* tiles, int H, int KV, float scale) {        \
        flash_bwd_dq_hopper<D, WGS>(dq, q, k, v, dout, lse, delta, cu_q, tiles, H, KV, scale);                     \
    }

#define HOPPER_INSTANTIATE(D)                                                                                      \
    HOPPER_WIDTH_INSTANTIATE(D, HOPPER_WGS, )                                                                      \
    HOPPER_WIDTH_INSTANTIATE(D, 1, _narrow)

HOPPER_INSTANTIATE(64)
HOPPER_INSTANTIATE(128)

// ---------------------------------------------------------------------------------------------------
// KV-cache decode (flash-decoding): a few new query rows per sequence against a long cache. The
// flash kernels would spend a 64-row tile on each sequence's one row and read each KV head once per
// query head; here one block serves a sequence's whole GQA group (every query head sharing a KV head,
// for each new row) over one split of the cache, so K and V are read once, and splits of the cache
// run in parallel when there are few sequences. A second kernel merges the splits' partial softmax
// states (m, l, unnormalised o) into the output and the row's logsumexp. CUDA cores, f32 arithmetic:
// the work is reading the cache.

constexpr int DECODE_THREADS = 128;  // 4 warps; must equal the launcher's
constexpr int DECODE_WARPS = DECODE_THREADS / 32;
constexpr int DECODE_KTILE = 32;     // keys per shared-memory tile, one per lane
constexpr int DECODE_MAX_ROWS = 16;  // query rows (new rows x group heads) per block

// po [Nq, H, S, D], pm / pl [Nq, H, S]: split s of query row i, head h. A split that holds none of
// a row's keys leaves m = -inf, l = 0, o = 0.
template <typename T, int D>
__device__ void decode_partial(float* __restrict__ po, float* __restrict__ pm, float* __restrict__ pl,
                               const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                               const int* __restrict__ cu_q, const int* __restrict__ k_start,
                               const int* __restrict__ k_len, int H, int KV, float scale, int S, int split_len) {
    constexpr int C = D / 32;  // output columns per lane
    __shared__ float qs[DECODE_MAX_ROWS][D];
    __shared__ float ks[DECODE_KTILE][D + 1];  // +1: lane j reads row j without bank conflicts
    __shared__ float vs[DECODE_KTILE][D];
    const int b = blockIdx.x, g = blockIdx.y, s = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int q0 = cu_q[b], qlen = cu_q[b + 1] - q0;
    const int r = H / KV, rows = qlen * r;
    if (rows == 0) return;  // a finished sequence in a generation batch: nothing to read or write
    const int k0 = k_start[b], kl = k_len[b];
    const int j0 = s * split_len, j1 = min(j0 + split_len, kl);
    const size_t kv_stride = (size_t)KV * D;

    // Row rr is new query row rr / r of the sequence, head g * r + rr % r.
    for (int e = threadIdx.x; e < rows * D; e += DECODE_THREADS) {
        const int rr = e / D, d = e % D;
        const int row = q0 + rr / r, h = g * r + rr % r;
        qs[rr][d] = to_f32(q[((size_t)row * H + h) * D + d]) * scale;
    }
    float m[DECODE_MAX_ROWS / DECODE_WARPS], l[DECODE_MAX_ROWS / DECODE_WARPS];
    float o[DECODE_MAX_ROWS / DECODE_WARPS][C];
#pragma unroll
    for (int i = 0; i < DECODE_MAX_ROWS / DECODE_WARPS; ++i) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < C; ++c) o[i][c] = 0.0f;
    }

    // Each thread carries PER 16-byte vectors of K and of V per tile. In bf16, tile t + 1's loads
    // are issued before tile t's arithmetic, so they are in flight while it runs (a block that
    // alternates loads and arithmetic leaves the memory system idle half the time, with a few
    // blocks an SM). In f32 (twice the vectors; the CPU path's twin, not a fast path) holding them
    // across the arithmetic spills, so each tile is loaded where it is stored.
    constexpr int N = Vec16<T>::N;
    constexpr int PER = DECODE_KTILE * D / N / DECODE_THREADS;
    constexpr bool AHEAD = sizeof(T) == 2;
    static_assert(DECODE_KTILE * D / N % DECODE_THREADS == 0, "whole vectors per thread");
    uint4 kr[PER], vr[PER];
    auto fetch = [&](int t) {
#pragma unroll
        for (int p = 0; p < PER; ++p) {
            const int e = threadIdx.x + p * DECODE_THREADS;
            const int j = e * N / D, d = e * N % D;
            if (t + j < j1) {
                // 16-byte loads: a row of D elements starts on a multiple of D * sizeof(T) bytes.
                const size_t at = (size_t)(k0 + t + j) * kv_stride + (size_t)g * D + d;
                kr[p] = fetch16(k + at);
                vr[p] = fetch16(v + at);
            } else {
                kr[p] = vr[p] = make_uint4(0u, 0u, 0u, 0u);  // zero bits: 0.0 in f32 and bf16
            }
        }
    };
    if (AHEAD && j0 < j1) fetch(j0);

    for (int t = j0; t < j1; t += DECODE_KTILE) {
        if (!AHEAD) fetch(t);
        __syncthreads();  // the previous tile is consumed (and, the first time, qs is written)
#pragma unroll
        for (int p = 0; p < PER; ++p) {
            const int e = threadIdx.x + p * DECODE_THREADS;
            const int j = e * N / D, d = e * N % D;
            float kx[N], vx[N];
            unpack16<T>(kr[p], kx);
            unpack16<T>(vr[p], vx);
#pragma unroll
            for (int c = 0; c < N; ++c) {
                ks[j][d + c] = kx[c];
                vs[j][d + c] = vx[c];
            }
        }
        __syncthreads();
        if (AHEAD && t + DECODE_KTILE < j1) fetch(t + DECODE_KTILE);
#pragma unroll
        for (int i = 0; i < DECODE_MAX_ROWS / DECODE_WARPS; ++i) {
            const int rr = warp + i * DECODE_WARPS;
            if (rr >= rows) break;
            // Causal: new row iq sees the cache up to its own position.
            const int n_keys = kl - qlen + rr / r + 1;
            const int key = t + lane;
            float score = -INFINITY;
            if (key < j1 && key < n_keys) {
                float acc = 0.0f;
#pragma unroll 16
                for (int d = 0; d < D; ++d) acc = fmaf(qs[rr][d], ks[lane][d], acc);
                score = acc;
            }
            const float m_new = fmaxf(m[i], warp_max(score));
            if (m_new == -INFINITY) continue;  // nothing visible yet
            const float alpha = expf(m[i] - m_new);  // 0 when m was -inf
            const float p = score == -INFINITY ? 0.0f : expf(score - m_new);
            l[i] = l[i] * alpha + warp_sum(p);
            m[i] = m_new;
#pragma unroll
            for (int c = 0; c < C; ++c) o[i][c] *= alpha;
#pragma unroll 8
            for (int j = 0; j < DECODE_KTILE; ++j) {
                const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                for (int c = 0; c < C; ++c) o[i][c] = fmaf(pj, vs[j][lane + 32 * c], o[i][c]);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < DECODE_MAX_ROWS / DECODE_WARPS; ++i) {
        const int rr = warp + i * DECODE_WARPS;
        if (rr >= rows) break;
        const int row = q0 + rr / r, h = g * r + rr % r;
        const size_t at = ((size_t)row * H + h) * S + s;
#pragma unroll
        for (int c = 0; c < C; ++c) po[at * D + lane + 32 * c] = o[i][c];
        if (lane == 0) {
            pm[at] = m[i];
            pl[at] = l[i];
        }
    }
}

// One block of D threads per (query row, head): merges the S partial states.
template <typename T>
__device__ void decode_combine(T* __restrict__ out, float* __restrict__ lse, const float* __restrict__ po,
                               const float* __restrict__ pm, const float* __restrict__ pl, int H, int D, int S) {
    const size_t rh = (size_t)blockIdx.x * H + blockIdx.y;
    const int d = threadIdx.x;
    float big = -INFINITY;
    for (int s = 0; s < S; ++s) big = fmaxf(big, pm[rh * S + s]);
    float total = 0.0f, acc = 0.0f;
    for (int s = 0; s < S; ++s) {
        const float mm = pm[rh * S + s];
        if (mm == -INFINITY) continue;
        const float w = expf(mm - big);
        total += w * pl[rh * S + s];
        acc += w * po[(rh * S + s) * D + d];
    }
    out[rh * D + d] = from_f32<T>(acc / total);
    if (d == 0) lse[rh] = big + logf(total);
}

#define DECODE_INSTANTIATE(T, SUFFIX, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(DECODE_THREADS)                                                 \
        decode_partial_##SUFFIX##_d##D(float* po, float* pm, float* pl, const T* q, const T* k, const T* v,      \
                                       const int* cu_q, const int* k_start, const int* k_len, int H, int KV,     \
                                       float scale, int S, int split_len) {                                      \
        decode_partial<T, D>(po, pm, pl, q, k, v, cu_q, k_start, k_len, H, KV, scale, S, split_len);            \
    }

DECODE_INSTANTIATE(float, f32, 64)
DECODE_INSTANTIATE(float, f32, 128)
DECODE_INSTANTIATE(bf16, bf16, 64)
DECODE_INSTANTIATE(bf16, bf16, 128)

#define DECODE_COMBINE(T, SUFFIX)                                                                                \
    extern "C" __global__ void decode_combine_##SUFFIX(T* out, float* lse, const float* po, const float* pm,    \
                                                        const float* pl, int H, int D, int S) {                 \
        decode_combine<T>(out, lse, po, pm, pl, H, D, S);                                                        \
    }

DECODE_COMBINE(float, f32)
DECODE_COMBINE(bf16, bf16)
