// Preference losses: DPO family, SimPO, ORPO, KTO. Conventions: TRL's (../shared/LOSSES.md).
//
// Inputs are per-token log-probs [R, T] of the policy (and reference), a response mask [R, T], for ORPO
// an NLL mask, for KTO labels [R]. Paired losses have R = 2B rows: chosen 0..B, rejected B..2B.
//
// 1. pref_row_sums   one block per row: S = sum mask*lp, S_ref = sum mask*ref, n = sum mask, and ORPO's
//                    sum nll*lp, sum nll.
// 2. pref_pair_loss  one block for the batch: per pair (per row for KTO) the loss, the rewards, and the
//                    derivative of the batch-mean loss with respect to each row's sequence value
//                    (divided by n for losses on mean log-probs); the batch sum is a block reduction, so
//                    the result is deterministic.
// 3. pref_token_grad d loss / d lp[r, t] = coef[r] * mask[r, t]  (- nll[r, t] / sum(nll) for ORPO).
// log-sigmoid is computed as -softplus(-x): |beta * margin| in the hundreds stays finite.
#include "common.cuh"

extern "C" __global__ void pref_row_sums(float* __restrict__ sums,          // [R, 5]
                                         const float* __restrict__ lp,      // [R, T]
                                         const float* __restrict__ ref,     // [R, T] (read if has_ref)
                                         const float* __restrict__ mask,    // [R, T]
                                         const float* __restrict__ nll,     // [R, T] (read if has_nll)
                                         int T, int has_ref, int has_nll) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    float s = 0.0f, sr = 0.0f, n = 0.0f, ns = 0.0f, nn = 0.0f;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        const size_t i = row * T + t;
        const float m = mask[i], l = lp[i];
        s += m * l;
        n += m;
        if (has_ref) sr += m * ref[i];
        if (has_nll) {
            ns += nll[i] * l;
            nn += nll[i];
        }
    }
    s = block_sum(s, scratch);
    sr = block_sum(sr, scratch);
    n = block_sum(n, scratch);
    ns = block_sum(ns, scratch);
    nn = block_sum(nn, scratch);
    if (threadIdx.x == 0) {
        float* o = sums + row * 5;
        o[0] = s;
        o[1] = sr;
        o[2] = n;
        o[3] = ns;
        o[4] = nn;
    }
}

__device__ __forceinline__ float dsigmoid(float x) { return sigmoid(x) * sigmoid(-x); }

// DPO loss codes, in DpoLoss::ALL order (src/ops/pref_loss.rs).
enum DpoCode { SIGMOID, HINGE, IPO, ROBUST, EXO_PAIR, NCA_PAIR, BCO_PAIR, SPPO_HARD, APO_ZERO, APO_DOWN, SIGMOID_NORM };

__device__ __forceinline__ bool dpo_mean_logps(int code) { return code == IPO || code == SIGMOID_NORM; }

// Sets loss and dc, dr = d loss / d (chosen, rejected) log-ratio.
__device__ void dpo_pair(int code, float beta, float eps, float clr, float rlr, float* loss, float* dc, float* dr) {
    const float u = beta * (clr - rlr);
    float du = 0.0f;
    switch (code) {
        case SIGMOID:
        case SIGMOID_NORM:
            *loss = -(1.0f - eps) * log_sigmoid(u) - eps * log_sigmoid(-u);
            du = -(1.0f - eps) * sigmoid(-u) + eps * sigmoid(u);
            break;
        case HINGE:
            *loss = fmaxf(1.0f - u, 0.0f);
            du = u < 1.0f ? -1.0f : 0.0f;
            break;
        case IPO: {
            const float a = clr - rlr - 1.0f / (2.0f * beta);
            *loss = a * a;
            *dc = 2.0f * a;
            *dr = -2.0f * a;
            return;
        }
        case ROBUST: {
            const float den = 1.0f - 2.0f * eps;
            *loss = (-(1.0f - eps) * log_sigmoid(u) + eps * log_sigmoid(-u)) / den;
            du = (-(1.0f - eps) * sigmoid(-u) - eps * sigmoid(u)) / den;
            break;
        }
        case EXO_PAIR: {
            const float e = eps == 0.0f ? 1e-3f : eps;
            *loss = sigmoid(u) * (log_sigmoid(u) - log1pf(-e)) + sigmoid(-u) * (log_sigmoid(-u) - logf(e));
            du = dsigmoid(u) * (u - log1pf(-e) + logf(e));
            break;
        }
        case NCA_PAIR: {
            const float c = beta * clr, r = beta * rlr;
            *loss = -log_sigmoid(c) - 0.5f * log_sigmoid(-c) - 0.5f * log_sigmoid(-r);
            *dc = beta * (-sigmoid(-c) + 0.5f * sigmoid(c));
            *dr = beta * 0.5f * sigmoid(r);
            return;
        }
        case BCO_PAIR: {
            const float c = beta * clr, r = beta * rlr;
            *loss = -log_sigmoid(c) - log_sigmoid(-r);
            *dc = -beta * sigmoid(-c);
            *dr = beta * sigmoid(r);
            return;
        }
        case SPPO_HARD: {
            const float a = clr - 1.0f / (2.0f * beta), b = rlr + 1.0f / (2.0f * beta);
            *loss = a * a + b * b;
            *dc = 2.0f * a;
            *dr = 2.0f * b;
            return;
        }
        case APO_ZERO: {
            const float c = beta * clr, r = beta * rlr;
            *loss = 1.0f - sigmoid(c) + sigmoid(r);
            *dc = -beta * dsigmoid(c);
            *dr = beta * dsigmoid(r);
            return;
        }
        case APO_DOWN: {
            const float c = beta * clr;
            *loss = sigmoid(c) + 1.0f - sigmoid(u);
            *dc = beta * dsigmoid(c) - beta * dsigmoid(u);
            *dr = beta * dsigmoid(u);
            return;
        }
    }
    *dc = beta * du;
    *dr = -beta * du;
}

// log(1 - e^x) for x < 0 (Maechler 2012).
__device__ __forceinline__ float log1mexp(float x) {
    return x < -0.6931471805599453f ? log1pf(-expf(x)) : logf(-expm1f(x));
}

// family: 0 DPO (code = loss type), 1 SimPO, 2 ORPO, 3 KTO.
// p0..p3: DPO (beta, label_smoothing), SimPO (beta, label_smoothing, gamma), ORPO (beta),
//         KTO (beta, desirable_weight, undesirable_weight, reference point z0).
extern "C" __global__ void pref_pair_loss(float* __restrict__ per_item,    // [items, 4]: loss, reward_c, reward_r, log_odds
                                          float* __restrict__ coef,        // [R]
                                          float* __restrict__ scalars,     // [3]: loss, nll_loss, nll count
                                          const float* __restrict__ sums,  // [R, 5]
                                          const float* __restrict__ labels,// [R] (KTO)
                                          int R, int family, int code, float p0, float p1, float p2, float p3,
                                          int has_nll) {
    __shared__ float scratch[32];
    const bool kto = family == 3;
    const int items = kto ? R : R / 2;
    const float inv_items = 1.0f / (float)items;
    const bool mean = (family == 0 && dpo_mean_logps(code)) || family == 1 || family == 2;
    float local = 0.0f;
    for (int i = threadIdx.x; i < items; i += blockDim.x) {
        if (kto) {
            const float* s = sums + (size_t)i * 5;
            const float lr = s[0] - s[1];
            const bool desirable = labels[i] > 0.0f;
            const float beta = p0, w = desirable ? p1 : p2, z0 = p3;
            const float x = desirable ? beta * (lr - z0) : beta * (z0 - lr);
            const float loss = w * (1.0f - sigmoid(x));
            const float d = (desirable ? -1.0f : 1.0f) * w * beta * dsigmoid(x);
            per_item[i * 4 + 0] = loss;
            per_item[i * 4 + 1] = beta * lr;
            per_item[i * 4 + 2] = 0.0f;
            per_item[i * 4 + 3] = 0.0f;
            coef[i] = d * inv_items;
            local += loss;
            continue;
        }
        const float* sc = sums + (size_t)i * 5;
        const float* sr = sums + (size_t)(i + items) * 5;
        const float nc = mean ? sc[2] : 1.0f, nr = mean ? sr[2] : 1.0f;
        const float pc = sc[0] / nc, pr = sr[0] / nr;  // policy sequence values
        float loss = 0.0f, dc = 0.0f, dr = 0.0f, rc = 0.0f, rr = 0.0f, log_odds = 0.0f;
        if (family == 0) {
            const float clr = pc - sc[1] / nc, rlr = pr - sr[1] / nr;
            dpo_pair(code, p0, p1, clr, rlr, &loss, &dc, &dr);
            // TRL logs rewards from the summed log-ratios, also for the length-normalised losses.
            rc = p0 * (sc[0] - sc[1]);
            rr = p0 * (sr[0] - sr[1]);
        } else if (family == 1) {
            const float beta = p0, eps = p1, gamma = p2;
            const float z = beta * ((pc - pr) - gamma / beta);
            loss = -(1.0f - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
            const float dz = -(1.0f - eps) * sigmoid(-z) + eps * sigmoid(z);
            dc = beta * dz;
            dr = -beta * dz;
            rc = beta * pc;
            rr = beta * pr;
        } else {
            const float beta = p0;
            log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr));
            loss = -beta * log_sigmoid(log_odds);
            const float dl = -beta * sigmoid(-log_odds);
            dc = dl * (-1.0f / expm1f(pc));
            dr = dl * (1.0f / expm1f(pr));
            rc = beta * pc;
            rr = beta * pr;
        }
        per_item[i * 4 + 0] = loss;
        per_item[i * 4 + 1] = rc;
        per_item[i * 4 + 2] = rr;
        per_item[i * 4 + 3] = log_odds;
        coef[i] = dc * inv_items / nc;
        coef[i + items] = dr * inv_items / nr;
        local += loss;
    }
    const float total = block_sum(local, scratch);
    float nll_sum = 0.0f, nll_count = 0.0f;
    if (has_nll) {
        for (int r = threadIdx.x; r < R; r += blockDim.x) {
            nll_sum += sums[(size_t)r * 5 + 3];
            nll_count += sums[(size_t)r * 5 + 4];
        }
        nll_sum = block_sum(nll_sum, scratch);
        nll_count = block_sum(nll_count, scratch);
    }
    if (threadIdx.x == 0) {
        const float nll = has_nll ? -nll_sum / nll_count : 0.0f;
        scalars[0] = total * inv_items + nll;
        scalars[1] = nll;
        scalars[2] = nll_count;
    }
}

extern "C" __global__ void pref_token_grad(float* __restrict__ grad,           // [R, T]
                                           const float* __restrict__ coef,     // [R]
                                           const float* __restrict__ mask,     // [R, T]
                                           const float* __restrict__ nll,      // [R, T] (read if has_nll)
                                           const float* __restrict__ scalars,  // [3]
                                           int T, int n, int has_nll) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = coef[i / T] * mask[i];
    if (has_nll) g -= nll[i] / scalars[2];
    grad[i] = g;
}
