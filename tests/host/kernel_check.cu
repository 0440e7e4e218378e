// Runs the loss kernels' per-thread arithmetic on the CPU: the __host__ __device__ functions of
// kernels/logprob.cu and kernels/kl.cu, with each row split over a 512-thread block as the launch
// splits it and the partial states merged in the order the warp shuffles merge them, against
// double-precision loops. It checks the algorithm (vector pushes, rescaling, masked and NaN entries,
// which thread adds the target's one-hot term, ragged tiles), not the GPU's instructions: exp_ftz is
// expf on the host. tests/kernel_host.rs compiles and runs it; it prints one line per failure and
// exits non-zero if there was any.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../../kernels/kl.cu"
#include "../../kernels/logprob.cu"
#include "tally.h"

namespace {

constexpr int kThreads = 512;  // THREADS in src/ops/logprob.rs and src/ops/kl.rs

void check(const std::string& what, double got, double want, double rel, double abs_tol) {
    const bool ok = (std::isnan(want) && std::isnan(got)) || (std::isinf(want) && got == want) ||
                    (std::isfinite(got) && std::fabs(got - want) <= abs_tol + rel * std::fabs(want));
    if (tally::failed(ok)) std::printf("FAIL %s: got %.9g, want %.9g\n", what.c_str(), got, want);
}

// Lane l of a warp merges with lane l ^ o for o = 16 .. 1; lane 0 of each warp then feeds the first
// warp, whose lanes past the warp count hold `init`.
template <typename S, typename Merge>
S block_merge(const std::vector<S>& per_thread, S init, Merge merge) {
    auto butterfly = [&](std::vector<S> lanes) {
        for (int o = 16; o > 0; o >>= 1) {
            const std::vector<S> prev = lanes;
            for (int l = 0; l < 32; ++l) lanes[l] = merge(prev[l], prev[l ^ o]);
        }
        return lanes[0];
    };
    std::vector<S> firsts(32, init);
    for (size_t w = 0; w < per_thread.size() / 32; ++w)
        firsts[w] = butterfly(std::vector<S>(per_thread.begin() + 32 * w, per_thread.begin() + 32 * (w + 1)));
    return butterfly(firsts);
}

template <typename T> std::vector<T> cast(const std::vector<float>& v) {
    std::vector<T> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = from_f32<T>(v[i]);
    return out;
}

template <typename T> const char* type_name();
template <> const char* type_name<float>() { return "f32"; }
template <> const char* type_name<bf16>() { return "bf16"; }

struct Row {
    std::vector<float> x;  // as the kernel reads it (already rounded to T)
    int target;
};

// Normal logits of std `sigma`; every `mask_every`-th entry -inf (0: none); the target never masked.
std::vector<float> logits(std::mt19937& rng, int V, float sigma, int mask_every) {
    std::normal_distribution<float> normal(0.0f, sigma);
    std::vector<float> x(V);
    for (int v = 0; v < V; ++v) x[v] = mask_every > 0 && v % mask_every == 1 ? -INFINITY : normal(rng);
    return x;
}

struct RefFwd {
    double lse, entropy;
};

RefFwd ref_fwd(const std::vector<double>& z) {
    double m = -INFINITY;
    for (double v : z) m = std::fmax(m, v);
    double s = 0.0;
    for (double v : z)
        if (v != -INFINITY) s += std::exp(v - m);
    const double lse = m + std::log(s);
    double h = 0.0;
    for (double v : z)
        if (v != -INFINITY) h -= std::exp(v - lse) * (v - lse);
    return {lse, h};
}

template <typename T>
void logprob_case(std::mt19937& rng, int V, float sigma, float scale, int mask_every, bool ignore_target) {
    const std::string name = std::string("logprob ") + type_name<T>() + " V=" + std::to_string(V) +
                             " scale=" + std::to_string(scale) + " mask=" + std::to_string(mask_every);
    std::vector<T> x = cast<T>(logits(rng, V, sigma, mask_every));
    int tgt = static_cast<int>(rng() % V);
    if (mask_every > 0 && tgt % mask_every == 1) tgt -= 1;
    if (ignore_target) tgt = -100;
    std::vector<double> z(V);
    for (int v = 0; v < V; ++v) z[v] = mul_rn(to_f32(x[v]), scale);
    const RefFwd want = ref_fwd(z);

    std::vector<EntropyState> states(kThreads);
    for (int t = 0; t < kThreads; ++t)
        states[t] = scale == 1.0f ? row_state<T, false>(x.data(), V, scale, t, kThreads)
                                  : row_state<T, true>(x.data(), V, scale, t, kThreads);
    float lse, h;
    entropy_finish(block_merge(states, entropy_init(), entropy_merge), &lse, &h);
    check(name + " lse", lse, want.lse, 2e-6, 1e-6);
    check(name + " entropy", h, want.entropy, 1e-4, 2e-5);

    std::normal_distribution<float> normal(0.0f, 1.0f);
    const float g_lp = normal(rng), g_ent = normal(rng);
    const LogitGrad g = logit_grad_init(lse, h, tgt < 0 ? 0.0f : g_lp, g_ent, scale);
    std::vector<T> dx(V, from_f32<T>(NAN));
    for (int t = 0; t < kThreads; ++t) {
        if (scale == 1.0f)
            row_grad<T, false>(dx.data(), x.data(), V, scale, g, tgt, t, kThreads);
        else
            row_grad<T, true>(dx.data(), x.data(), V, scale, g, tgt, t, kThreads);
    }
    const double rel = sizeof(T) == 2 ? 8e-3 : 2e-5;
    for (int v = 0; v < V; ++v) {
        const double got = to_f32(dx[v]);
        if (z[v] == -INFINITY) {
            check(name + " dlogits[masked " + std::to_string(v) + "] is 0", got, 0.0, 0.0, 0.0);
            continue;
        }
        const double logp = z[v] - want.lse, p = std::exp(logp);
        const double oh = v == tgt ? 1.0 : 0.0;
        const double gl = tgt < 0 ? 0.0 : g_lp;
        const double d = scale * (gl * (oh - p) - g_ent * p * (logp + want.entropy));
        check(name + " dlogits[" + std::to_string(v) + "]", got, d, rel, 2e-6 * scale);
    }

    // The LM-head-fused form: z (scaled, in the tile's dtype Z) arrives in vocabulary tiles of width
    // `tile`, the last one ragged; odd widths take the scalar path. Z = f32 always; Z = bf16 (the
    // tile of bf16 operands) where the bf16 logits are z exactly (scale 1).
    auto tiled = [&](auto z_zero) {
        using Z = decltype(z_zero);
        constexpr int W = Vec16<Z>::N;
        for (int tile : {V, 1000, 1003}) {
            if (tile > V) continue;
            const std::string tname = name + " tile=" + std::to_string(tile) + " z " + type_name<Z>();
            std::vector<Z> zt(V);
            for (int v = 0; v < V; ++v) zt[v] = from_f32<Z>(static_cast<float>(z[v]));
            EntropyState acc = entropy_init();
            for (int v0 = 0; v0 < V; v0 += tile) {
                const int vc = std::min(tile, V - v0);
                // A warp per row: 32 lanes, merged by the butterfly alone.
                std::vector<EntropyState> lanes(32);
                for (int t = 0; t < 32; ++t) lanes[t] = row_state<Z, false>(zt.data() + v0, vc, 1.0f, t, 32);
                const EntropyState st = block_merge(lanes, entropy_init(), entropy_merge);
                acc = v0 == 0 ? st : entropy_merge(acc, st);
            }
            float tl, th;
            entropy_finish(acc, &tl, &th);
            check(tname + " lse", tl, want.lse, 2e-6, 1e-6);
            check(tname + " entropy", th, want.entropy, 1e-4, 2e-5);
            const LogitGrad tg = logit_grad_init(tl, th, tgt < 0 ? 0.0f : g_lp, g_ent, 1.0f);
            std::vector<T> dz(V, from_f32<T>(NAN));
            for (int v0 = 0; v0 < V; v0 += tile) {
                const int vc = std::min(tile, V - v0);
                const int local = tgt >= v0 && tgt < v0 + vc ? tgt - v0 : -1;
                // On the device the vector stores need an aligned start; here v0 stands for the offset.
                const bool vec = vc % W == 0 && v0 % W == 0;
                for (int t = 0; t < 32; ++t)
                    tile_grad<T, Z>(dz.data() + v0, zt.data() + v0, vc, tg, local, vec, t, 32);
            }
            for (int v = 0; v < V; ++v) {
                const double got = to_f32(dz[v]);
                if (z[v] == -INFINITY) {
                    check(tname + " dz[masked] is 0", got, 0.0, 0.0, 0.0);
                    continue;
                }
                const double logp = z[v] - want.lse, p = std::exp(logp);
                const double gl = tgt < 0 ? 0.0 : g_lp;
                const double d = gl * ((v == tgt ? 1.0 : 0.0) - p) - g_ent * p * (logp + want.entropy);
                check(tname + " dz[" + std::to_string(v) + "]", got, d, rel, 2e-6);
            }
        }
    };
    tiled(0.0f);
    if constexpr (std::is_same<T, bf16>::value) {
        if (scale == 1.0f) tiled(from_f32<bf16>(0.0f));
    }
}

template <typename T> void logprob_nan_row(int V, int nan_at) {
    std::vector<float> xf(V, 0.5f);
    xf[nan_at] = NAN;
    std::vector<T> x = cast<T>(xf);
    std::vector<EntropyState> states(kThreads);
    for (int t = 0; t < kThreads; ++t) states[t] = row_state<T, false>(x.data(), V, 1.0f, t, kThreads);
    float lse, h;
    entropy_finish(block_merge(states, entropy_init(), entropy_merge), &lse, &h);
    const std::string name = std::string("logprob ") + type_name<T>() + " NaN at " + std::to_string(nan_at) + " of " + std::to_string(V);
    check(name + " lse is NaN", lse, NAN, 0, 0);
}

template <typename T> void kl_case(std::mt19937& rng, int V, int mask_every, bool ref_masked_alone) {
    const std::string name = std::string("kl ") + type_name<T>() + " V=" + std::to_string(V) + " mask=" +
                             std::to_string(mask_every) + (ref_masked_alone ? " ref-only mask" : "");
    std::vector<float> xf = logits(rng, V, 2.0f, mask_every), yf(V);
    std::normal_distribution<float> noise(0.0f, 0.5f);
    for (int v = 0; v < V; ++v) yf[v] = xf[v] + noise(rng);
    if (ref_masked_alone) {
        for (int v = 0; v < V; ++v) xf[v] = yf[v] == -INFINITY ? 1.0f : xf[v];
    }
    std::vector<T> x = cast<T>(xf), y = cast<T>(yf);
    std::vector<double> xd(V), yd(V);
    for (int v = 0; v < V; ++v) xd[v] = to_f32(x[v]), yd[v] = to_f32(y[v]);
    const double lp = ref_fwd(xd).lse, lq = ref_fwd(yd).lse;
    double want = 0.0;
    for (int v = 0; v < V; ++v) {
        if (xd[v] == -INFINITY) continue;
        want += std::exp(xd[v] - lp) * ((xd[v] - lp) - (yd[v] - lq));
    }
    std::vector<KlState> states(kThreads);
    for (int t = 0; t < kThreads; ++t) states[t] = kl_row_state<T>(x.data(), y.data(), V, t, kThreads);
    float glp, glq, gkl;
    kl_finish(block_merge(states, kl_init(), kl_merge), &glp, &glq, &gkl);
    check(name + " lse_p", glp, lp, 2e-6, 1e-6);
    check(name + " kl", gkl, want, 1e-4, 2e-5);
    if (!std::isfinite(want)) return;
    check(name + " lse_q", glq, lq, 2e-6, 1e-6);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const float g = normal(rng);
    std::vector<T> dx(V, from_f32<T>(NAN));
    for (int t = 0; t < kThreads; ++t) kl_row_grad<T>(dx.data(), x.data(), y.data(), V, glp, glq - gkl, g, t, kThreads);
    const double rel = sizeof(T) == 2 ? 8e-3 : 2e-5;
    for (int v = 0; v < V; ++v) {
        const double got = to_f32(dx[v]);
        if (xd[v] == -INFINITY) {
            check(name + " dx[masked] is 0", got, 0.0, 0.0, 0.0);
            continue;
        }
        const double logp = xd[v] - lp;
        check(name + " dx[" + std::to_string(v) + "]", got, g * std::exp(logp) * (logp - (yd[v] - lq) - want), rel, 1e-6);
    }
}

template <typename T> void run_all(std::mt19937& rng) {
    // Aligned rows take the 16-byte path, the others the strided scalar one; V = 1 and 3 leave most
    // threads empty.
    for (int V : {1, 3, 8, 77, 1000, 4099, 50257, 49152}) {
        logprob_case<T>(rng, V, 3.0f, 1.0f, 0, false);
        logprob_case<T>(rng, V, 3.0f, 1.0f / 0.9f, V > 8 ? 7 : 0, V == 1000);
    }
    logprob_case<T>(rng, 128256, 3.0f, 1.0f, 5, false);
    logprob_case<T>(rng, 77, 1000.0f, 1.0f / 0.9f, 0, false);  // logits in the thousands
    logprob_case<T>(rng, 4096, 1.0f, 1.0f, 2, false);          // half the vocabulary masked
    for (int V : {16, 4099}) {
        logprob_nan_row<T>(V, 0);
        logprob_nan_row<T>(V, V - 1);
    }
    for (int V : {1, 77, 1000, 50257, 49152}) {
        kl_case<T>(rng, V, 0, false);
        if (V > 8) {
            kl_case<T>(rng, V, 7, false);
            kl_case<T>(rng, V, 7, true);
        }
    }
}

}  // namespace

int main(int argc, char** argv) {
    const unsigned seed = argc > 1 ? static_cast<unsigned>(std::stoul(argv[1])) : std::random_device{}();
    std::printf("kernel host check, seed %u\n", seed);
    std::mt19937 rng(seed);
    run_all<float>(rng);
    run_all<bf16>(rng);
    return tally::finish();
}
