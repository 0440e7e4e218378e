// Every kernel of kernels/attention.cu run on the CPU by the emulator of emulation.h, launched as
// src/ops/attention.rs launches it (grids, block sizes, shared memory, tile lists: the formulas
// below are copies of that file's), against double-precision loops: the simple kernels (f32 and
// bf16), the mma.sync flash kernels, the Hopper wgmma kernels of two warpgroups and their one-
// warpgroup twins, fast and deterministic backward, the row-dot pre-pass, and the decode kernels.
// Each launch runs twice, with copies and wgmma completing late and eager and the threads in
// opposite orders; the two must agree bit for bit (the fast backward's dQ, summed by atomics whose
// order the schedule changes, within 1e-6 of its size).
//
// This checks the kernels' logic (tiling, masking, the online softmax, pipelining, barriers, the
// operand layouts as emulation.h models them), not their speed nor anything only the hardware
// decides. tests/kernel_host.rs compiles and runs it; it prints one line per failure and ends with
// "N checks, M failed".
#include "emulation.h"

#include "../../kernels/attention.cu"

#include <random>

#include "tally.h"

namespace {

using tally::check;
const char* only = nullptr;  // run only the launches whose description contains this
bool intensity = false;      // print each launch's tensor-core FLOPs per byte cp.async brought in

bool selected(const std::string& what) { return only == nullptr || what.find(only) != std::string::npos; }

// src/ops/attention.rs's constants.
constexpr int kFlashTile = 64, kFlashThreads = 128, kFlashPad = 8, kBwdQTile = 32, kHopperRows = 128;
constexpr int kDecodeThreads = 128, kDecodeKTile = 32, kDecodeTargetBlocks = 512;

struct Batch {
    std::vector<int> cu_q, k_start, k_len;
    int nq = 0, nk = 0;  // query rows; key rows (the cache's, with room)
    bool packed = true;
};

Batch packed(const std::vector<int>& lens) {
    Batch b;
    b.cu_q.push_back(0);
    for (int n : lens) {
        b.k_start.push_back(b.cu_q.back());
        b.k_len.push_back(n);
        b.cu_q.push_back(b.cu_q.back() + n);
    }
    b.nq = b.nk = b.cu_q.back();
    return b;
}

// New rows q_lens[i] against caches of k_lens[i] keys (the last q_lens[i] of them the new rows'),
// each sequence's cache `room` rows apart.
Batch cached(const std::vector<int>& q_lens, const std::vector<int>& k_lens, int room) {
    Batch b;
    b.packed = false;
    b.cu_q.push_back(0);
    for (size_t i = 0; i < q_lens.size(); ++i) {
        b.k_start.push_back((int)i * room);
        b.k_len.push_back(k_lens[i]);
        b.cu_q.push_back(b.cu_q.back() + q_lens[i]);
    }
    b.nq = b.cu_q.back();
    b.nk = (int)q_lens.size() * room;
    return b;
}

std::vector<int> query_tiles(const Batch& b, int rows) {
    std::vector<int> t;
    for (size_t s = 0; s + 1 < b.cu_q.size(); ++s)
        for (int start = 0; start < b.cu_q[s + 1] - b.cu_q[s]; start += rows) {
            t.push_back((int)s);
            t.push_back(start);
        }
    return t;
}

struct Problem {
    std::string name;
    Batch batch;
    int H, KV, D;
    float scale;
    std::vector<bf16> q, k, v, dout;
    // The reference, from the bf16 inputs: out, lse (natural log), dq, dk, dv, delta.
    std::vector<double> out, lse, dq, dk, dv, delta;
};

std::vector<bf16> random_bf16(std::mt19937& rng, size_t n) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<bf16> x(n);
    for (auto& e : x) e = __float2bfloat16_rn(normal(rng));
    return x;
}

double f(bf16 x) { return (double)__bfloat162float(x); }

// Causal, aligned bottom-right: local query iq of a sequence with len_q rows sees its first
// k_len - len_q + iq + 1 keys.
void reference(Problem& p) {
    const Batch& b = p.batch;
    const int H = p.H, KV = p.KV, D = p.D, group = H / KV;
    p.out.assign((size_t)b.nq * H * D, 0.0);
    p.lse.assign((size_t)b.nq * H, 0.0);
    p.dq.assign(p.out.size(), 0.0);
    p.dk.assign((size_t)b.nk * KV * D, 0.0);
    p.dv.assign(p.dk.size(), 0.0);
    p.delta.assign(p.lse.size(), 0.0);
    for (size_t s = 0; s + 1 < b.cu_q.size(); ++s) {
        const int len_q = b.cu_q[s + 1] - b.cu_q[s];
        for (int iq = 0; iq < len_q; ++iq)
            for (int h = 0; h < H; ++h) {
                const int row = b.cu_q[s] + iq, g = h / group;
                const int n_keys = std::min(b.k_len[s], b.k_len[s] - len_q + iq + 1);
                const bf16* qr = &p.q[((size_t)row * H + h) * D];
                const bf16* dor = &p.dout[((size_t)row * H + h) * D];
                std::vector<double> sc(n_keys), pr(n_keys);
                double mx = -INFINITY;
                for (int j = 0; j < n_keys; ++j) {
                    const bf16* kr = &p.k[((size_t)(b.k_start[s] + j) * KV + g) * D];
                    double acc = 0.0;
                    for (int d = 0; d < D; ++d) acc += f(qr[d]) * f(kr[d]);
                    sc[j] = acc * p.scale;
                    mx = std::max(mx, sc[j]);
                }
                double sum = 0.0;
                for (int j = 0; j < n_keys; ++j) sum += std::exp(sc[j] - mx);
                const double lse = mx + std::log(sum);
                p.lse[(size_t)row * H + h] = lse;
                double* o = &p.out[((size_t)row * H + h) * D];
                for (int j = 0; j < n_keys; ++j) {
                    pr[j] = std::exp(sc[j] - lse);
                    const bf16* vr = &p.v[((size_t)(b.k_start[s] + j) * KV + g) * D];
                    for (int d = 0; d < D; ++d) o[d] += pr[j] * f(vr[d]);
                }
                double delta = 0.0;
                for (int d = 0; d < D; ++d) delta += f(dor[d]) * o[d];
                p.delta[(size_t)row * H + h] = delta;
                for (int j = 0; j < n_keys; ++j) {
                    const size_t kv_at = ((size_t)(b.k_start[s] + j) * KV + g) * D;
                    double dp = 0.0;
                    for (int d = 0; d < D; ++d) dp += f(dor[d]) * f(p.v[kv_at + d]);
                    const double ds = pr[j] * (dp - delta);
                    for (int d = 0; d < D; ++d) {
                        p.dq[((size_t)row * H + h) * D + d] += p.scale * ds * f(p.k[kv_at + d]);
                        p.dk[kv_at + d] += p.scale * ds * f(qr[d]);
                        p.dv[kv_at + d] += pr[j] * f(dor[d]);
                    }
                }
            }
    }
}

Problem make(std::mt19937& rng, const std::string& name, Batch b, int H, int KV, int D) {
    Problem p;
    p.name = name + " D" + std::to_string(D);
    p.batch = std::move(b);
    p.H = H;
    p.KV = KV;
    p.D = D;
    p.scale = 1.0f / std::sqrt((float)D);
    p.q = random_bf16(rng, (size_t)p.batch.nq * H * D);
    p.k = random_bf16(rng, (size_t)p.batch.nk * KV * D);
    p.v = random_bf16(rng, (size_t)p.batch.nk * KV * D);
    p.dout = random_bf16(rng, (size_t)p.batch.nq * H * D);
    reference(p);
    return p;
}

template <typename T>
std::vector<double> widen(const std::vector<T>& x) {
    std::vector<double> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
        if constexpr (std::is_same_v<T, bf16>) out[i] = f(x[i]);
        else out[i] = (double)x[i];
    }
    return out;
}

void compare(const std::string& what, const std::vector<double>& got, const std::vector<double>& want, double tol,
             bool absolute = false) {
    double err = 0.0, big = 0.0;
    size_t worst = 0;
    bool finite = got.size() == want.size();
    for (size_t i = 0; i < want.size() && finite; ++i) {
        if (!std::isfinite(got[i])) {
            finite = false;
            worst = i;
            break;
        }
        const double e = std::fabs(got[i] - want[i]);
        if (e > err) {
            err = e;
            worst = i;
        }
        big = std::max(big, std::fabs(want[i]));
    }
    // Relative to the largest magnitude, with a floor for outputs that are all but zero (a
    // one-key row's gradients are exactly 0 in exact arithmetic, rounding noise in a kernel's).
    const double bar = absolute ? tol : tol * std::max(big, 1e-3);
    char msg[256];
    if (!finite)
        std::snprintf(msg, sizeof msg, "%s: element %zu is %g (want %g)", what.c_str(), worst,
                      worst < got.size() ? got[worst] : NAN, worst < want.size() ? want[worst] : NAN);
    else
        std::snprintf(msg, sizeof msg, "%s: max error %.3g at %zu (got %.6g, want %.6g), allowed %.3g", what.c_str(),
                      err, worst, got[worst], want[worst], bar);
    check(finite && err <= bar, msg);
}

template <typename T>
void register_all(const std::vector<T>& v) {
    emu::register_global(v.data(), v.size() * sizeof(T));
}

template <typename T>
void poison(std::vector<T>& v) {
    for (auto& e : v) {
        if constexpr (std::is_same_v<T, bf16>) e = __float2bfloat16_rn(NAN);
        else e = (T)NAN;
    }
}

const emu::Mode kModes[2] = {{true, false}, {false, true}};

// Runs `run(mode)` in both modes; `run` returns its outputs (or an empty list when a launch
// failed, after reporting it). The outputs must agree bit for bit, except those in `loose`.
template <typename Run>
std::vector<std::vector<double>> both_modes(const std::string& what, Run run, std::vector<bool> loose = {}) {
    std::vector<std::vector<double>> first;
    for (int m = 0; m < 2; ++m) {
        std::vector<std::vector<double>> outs = run(kModes[m]);
        if (outs.empty()) return {};
        if (m == 0) {
            first = std::move(outs);
            continue;
        }
        for (size_t i = 0; i < outs.size(); ++i) {
            size_t diff = 0, at = 0;
            double worst = 0.0, big = 0.0;
            for (size_t j = 0; j < outs[i].size(); ++j) {
                const double a = first[i][j], b = outs[i][j];
                big = std::max(big, std::fabs(a));
                if (!(a == b || (std::isnan(a) && std::isnan(b)))) {
                    if (diff++ == 0) at = j;
                    worst = std::max(worst, std::fabs(a - b));
                }
            }
            const bool is_loose = i < loose.size() && loose[i];
            char msg[256];
            std::snprintf(msg, sizeof msg,
                          "%s: output %zu differs between the late/forward and eager/reverse schedules at %zu "
                          "elements (first %zu, largest difference %.3g)",
                          what.c_str(), i, diff, at, worst);
            check(is_loose ? worst <= 1e-6 * big : diff == 0, msg);
        }
    }
    return first;
}

// The shared-memory accesses of what ran since `before` are free of bank conflicts: every ldmatrix
// matrix and every warp's st.shared served in one wavefront (the padded rows of the mma.sync kernels
// and the 128-byte swizzle of the Hopper ones are there for this).
void check_banks(const std::string& what, const emu::Stats& before) {
    const emu::Stats& now = emu::stats();
    const uint64_t phases = now.ldmatrix_phases - before.ldmatrix_phases,
                   waves = now.ldmatrix_wavefronts - before.ldmatrix_wavefronts,
                   stores = now.st_shared - before.st_shared,
                   store_waves = now.st_shared_wavefronts - before.st_shared_wavefronts;
    char msg[256];
    std::snprintf(msg, sizeof msg,
                  "%s: bank conflicts: ldmatrix %llu wavefronts for %llu matrices, st.shared %llu for %llu stores",
                  what.c_str(), (unsigned long long)waves, (unsigned long long)phases,
                  (unsigned long long)store_waves, (unsigned long long)stores);
    check(waves == phases && store_waves == stores, msg);
    if (intensity) {
        // Both schedules ran the same operations: halve.
        const double flops = (now.mma_flops - before.mma_flops) / 2.0, bytes = (now.copy_bytes - before.copy_bytes) / 2.0,
                     atomic = (now.atomic_bytes - before.atomic_bytes) / 2.0;
        std::printf("INTENSITY|%s|%.4g tensor FLOPs|%.4g bytes by cp.async|%.1f FLOPs a byte|%.4g bytes by atomics\n",
                    what.c_str(), flops, bytes, flops / bytes, atomic);
    }
}

bool launched(const std::string& what, bool ok) {
    check(ok, what + ": " + (ok ? std::string() : emu::last_error()));
    return ok;
}

struct Dev {
    std::vector<int> cu_q, k_start, k_len, tiles64, tiles128;
};

Dev tables(const Batch& b) {
    return Dev{b.cu_q, b.k_start, b.k_len, query_tiles(b, kFlashTile), query_tiles(b, kHopperRows)};
}

void register_inputs(const Problem& p, const Dev& t) {
    emu::clear_globals();
    register_all(p.q);
    register_all(p.k);
    register_all(p.v);
    register_all(p.dout);
    register_all(t.cu_q);
    register_all(t.k_start);
    register_all(t.k_len);
    register_all(t.tiles64);
    register_all(t.tiles128);
}

enum class Fwd { Simple, Mma, Hopper, HopperNarrow };
const char* fwd_name(Fwd k) {
    switch (k) {
        case Fwd::Simple: return "simple";
        case Fwd::Mma: return "mma";
        case Fwd::Hopper: return "hopper";
        default: return "hopper_narrow";
    }
}

using FlashFwdFn = void (*)(bf16*, float*, const bf16*, const bf16*, const bf16*, const int*, const int*, const int*,
                            const int*, int, int, float);

FlashFwdFn flash_fwd_fn(Fwd k, int D) {
    switch (k) {
        case Fwd::Mma: return D == 64 ? flash_fwd_d64 : flash_fwd_d128;
        case Fwd::Hopper: return D == 64 ? flash_fwd_hopper_d64 : flash_fwd_hopper_d128;
        default: return D == 64 ? flash_fwd_hopper_narrow_d64 : flash_fwd_hopper_narrow_d128;
    }
}

void check_forward(const Problem& p, Fwd kind) {
    const Batch& b = p.batch;
    const Dev t = tables(b);
    const int D = p.D, H = p.H, KV = p.KV, B = (int)b.k_len.size();
    const std::string what = p.name + " forward " + fwd_name(kind);
    if (!selected(what)) return;
    const emu::Stats banks = emu::stats();
    auto outs = both_modes(what, [&](emu::Mode mode) -> std::vector<std::vector<double>> {
        std::vector<bf16> out((size_t)b.nq * H * D);
        std::vector<float> lse((size_t)b.nq * H);
        poison(out);
        poison(lse);
        register_inputs(p, t);
        bool ok;
        if (kind == Fwd::Simple) {
            const unsigned threads = (unsigned)((std::max(D, 128) + 31) / 32 * 32);
            ok = emu::launch(dim3(b.nq, H), dim3(threads), D * 4, mode, [&] {
                attention_fwd_bf16(out.data(), lse.data(), p.q.data(), p.k.data(), p.v.data(), t.cu_q.data(),
                                   t.k_start.data(), t.k_len.data(), B, H, KV, D, p.scale);
            });
        } else {
            const bool wide = kind == Fwd::Hopper;
            const int wgs = wide ? kHopperRows / kFlashTile : 1;
            const size_t smem = kind == Fwd::Mma ? 2 * kFlashTile * (D + kFlashPad) * 2
                                                 : (size_t)(wgs + 4) * kFlashTile * D * 2 + 1024;
            const std::vector<int>& tiles = wide ? t.tiles128 : t.tiles64;
            const FlashFwdFn fn = flash_fwd_fn(kind, D);
            ok = emu::launch(dim3((unsigned)tiles.size() / 2, H), dim3(kFlashThreads * (wide ? wgs : 1)), smem, mode,
                             [&] {
                                 fn(out.data(), lse.data(), p.q.data(), p.k.data(), p.v.data(), t.cu_q.data(),
                                    t.k_start.data(), t.k_len.data(), tiles.data(), H, KV, p.scale);
                             });
        }
        if (!launched(what, ok)) return {};
        return {widen(out), widen(lse)};
    });
    if (outs.empty()) return;
    check_banks(what, banks);
    compare(what + " out", outs[0], p.out, 1e-2);
    compare(what + " lse", outs[1], p.lse, 2e-3, true);
}

enum class Bwd { Simple, MmaFast, MmaDet, HopperFast, HopperDet, NarrowFast, NarrowDet };
const char* bwd_name(Bwd k) {
    const char* names[] = {"simple", "mma fast", "mma deterministic", "hopper fast", "hopper deterministic",
                           "hopper_narrow fast", "hopper_narrow deterministic"};
    return names[(int)k];
}

using DkvDqFn = void (*)(bf16*, bf16*, float*, const bf16*, const bf16*, const bf16*, const bf16*, const float*,
                         const float*, const int*, const int*, const int*, int, int, float);
using DkvFn = void (*)(bf16*, bf16*, const bf16*, const bf16*, const bf16*, const bf16*, const float*, const float*,
                       const int*, const int*, const int*, int, int, float);
using DqFn = void (*)(bf16*, const bf16*, const bf16*, const bf16*, const bf16*, const float*, const float*,
                          const int*, const int*, int, int, float);

// The backward from the reference's lse and output (rounded to bf16, as the forward leaves it), with
// delta from the row-dot kernel.
void check_backward(const Problem& p, Bwd kind) {
    const Batch& b = p.batch;
    const Dev t = tables(b);
    const int D = p.D, H = p.H, KV = p.KV, B = (int)b.k_len.size();
    const std::string what = p.name + " backward " + bwd_name(kind);
    if (!selected(what)) return;
    std::vector<bf16> out_bf16(p.out.size());
    for (size_t i = 0; i < p.out.size(); ++i) out_bf16[i] = __float2bfloat16_rn((float)p.out[i]);
    std::vector<float> lse(p.lse.begin(), p.lse.end());
    const bool fast = kind == Bwd::MmaFast || kind == Bwd::HopperFast || kind == Bwd::NarrowFast;
    const emu::Stats banks = emu::stats();
    auto outs = both_modes(
        what,
        [&](emu::Mode mode) -> std::vector<std::vector<double>> {
            std::vector<float> delta((size_t)b.nq * H);
            std::vector<bf16> dq((size_t)b.nq * H * D), dk((size_t)b.nk * KV * D), dv(dk.size());
            std::vector<float> dq_acc(fast ? dq.size() : 0, 0.0f);
            poison(delta);
            poison(dq);
            poison(dk);
            poison(dv);
            register_inputs(p, t);
            register_all(out_bf16);
            register_all(lse);
            register_all(delta);
            const unsigned threads = (unsigned)((std::max(D, 128) + 31) / 32 * 32);
            bool ok = emu::launch(dim3(b.nq, H), dim3(threads), 0, mode, [&] {
                attention_bwd_dot_bf16(delta.data(), p.dout.data(), out_bf16.data(), H, D);
            });
            if (!launched(what + " row-dot", ok)) return {};
            const int row_bytes = (D + kFlashPad) * 2;
            const int dkv_smem = (2 * kFlashTile + 4 * kBwdQTile) * row_bytes + 4 * kBwdQTile * 4;
            const int hopper_tile = kFlashTile * D * 2;
            const bool narrow = kind == Bwd::NarrowFast || kind == Bwd::NarrowDet;
            const bool hopper = narrow || kind == Bwd::HopperFast || kind == Bwd::HopperDet;
            const int wgs = narrow ? 1 : kHopperRows / kFlashTile;
            const int kt_copy = (D / 64) % wgs != 0 ? wgs * hopper_tile : 0;
            const int hopper_dkv_smem =
                (2 * wgs + 4) * hopper_tile + wgs * kFlashTile * 64 * 2 + kt_copy + 4 * kFlashTile * 4 + 1024;
            const bool wide = hopper && !narrow;
            const std::vector<int>& tiles = wide ? t.tiles128 : t.tiles64;
            const dim3 kv_grid((unsigned)tiles.size() / 2, KV), q_grid((unsigned)tiles.size() / 2, H);
            const dim3 block(kFlashThreads * (wide ? wgs : 1));
            const bool d64 = D == 64;
            if (kind == Bwd::Simple) {
                ok = emu::launch(dim3(b.nq, H), dim3(threads), 2 * D * 4, mode, [&] {
                    attention_bwd_dq_bf16(dq.data(), p.q.data(), p.k.data(), p.v.data(), p.dout.data(), lse.data(),
                                          delta.data(), t.cu_q.data(), t.k_start.data(), t.k_len.data(), B, H, KV, D,
                                          p.scale);
                }) && emu::launch(dim3(b.nq, KV), dim3(threads), 2 * D * 4, mode, [&] {
                    attention_bwd_dkv_bf16(dk.data(), dv.data(), p.q.data(), p.k.data(), p.v.data(), p.dout.data(),
                                           lse.data(), delta.data(), t.cu_q.data(), B, H, KV, D, p.scale);
                });
            } else if (fast) {
                DkvDqFn fn = kind == Bwd::MmaFast  ? (d64 ? flash_bwd_dkv_dq_d64 : flash_bwd_dkv_dq_d128)
                             : narrow             ? (d64 ? flash_bwd_hopper_narrow_d64 : flash_bwd_hopper_narrow_d128)
                                                  : (d64 ? flash_bwd_hopper_d64 : flash_bwd_hopper_d128);
                const int smem = hopper ? hopper_dkv_smem : dkv_smem + kFlashTile * (kBwdQTile + kFlashPad) * 2;
                ok = emu::launch(kv_grid, block, smem, mode, [&] {
                    fn(dk.data(), dv.data(), dq_acc.data(), p.q.data(), p.k.data(), p.v.data(), p.dout.data(),
                       lse.data(), delta.data(), t.cu_q.data(), tiles.data(), nullptr, H, KV, p.scale);
                });
                for (size_t i = 0; i < dq.size(); ++i) dq[i] = __float2bfloat16_rn(dq_acc[i]);
            } else {
                DkvFn dkv = !hopper ? (d64 ? flash_bwd_dkv_d64 : flash_bwd_dkv_d128)
                            : narrow ? (d64 ? flash_bwd_dkv_hopper_narrow_d64 : flash_bwd_dkv_hopper_narrow_d128)
                                     : (d64 ? flash_bwd_dkv_hopper_d64 : flash_bwd_dkv_hopper_d128);
                DqFn dqf = !hopper ? (d64 ? flash_bwd_dq_d64 : flash_bwd_dq_d128)
                               : narrow ? (d64 ? flash_bwd_dq_hopper_narrow_d64 : flash_bwd_dq_hopper_narrow_d128)
                                        : (d64 ? flash_bwd_dq_hopper_d64 : flash_bwd_dq_hopper_d128);
                const int dq_smem = hopper ? (2 * wgs + 4) * hopper_tile + 1024 : 4 * kBwdQTile * row_bytes;
                ok = emu::launch(kv_grid, block, hopper ? hopper_dkv_smem : dkv_smem, mode, [&] {
                    dkv(dk.data(), dv.data(), p.q.data(), p.k.data(), p.v.data(), p.dout.data(), lse.data(),
                        delta.data(), t.cu_q.data(), tiles.data(), nullptr, H, KV, p.scale);
                }) && emu::launch(q_grid, block, dq_smem, mode, [&] {
                    dqf(dq.data(), p.q.data(), p.k.data(), p.v.data(), p.dout.data(), lse.data(), delta.data(),
                        t.cu_q.data(), tiles.data(), H, KV, p.scale);
                });
            }
            if (!launched(what, ok)) return {};
            return {widen(delta), widen(dk), widen(dv), fast ? widen(dq_acc) : widen(dq)};
        },
        {false, false, false, fast});
    if (outs.empty()) return;
    check_banks(what, banks);
    // delta from the bf16-rounded output against the reference's exact one.
    compare(what + " delta", outs[0], p.delta, 1e-2);
    compare(what + " dk", outs[1], p.dk, 2e-2);
    compare(what + " dv", outs[2], p.dv, 2e-2);
    compare(what + " dq", outs[3], p.dq, 2e-2);
}

// The decode kernels, split as AttnBatch::decode_split splits (small problems: a tile a split), or
// with `whole` in one split a sequence (every tile of a cache through one block's loop).
template <typename T>
void check_decode(const Problem& p, bool whole) {
    const Batch& b = p.batch;
    const Dev t = tables(b);
    const int D = p.D, H = p.H, KV = p.KV, B = (int)b.k_len.size();
    const int max_keys = *std::max_element(b.k_len.begin(), b.k_len.end());
    const int blocks = B * KV, tiles = (max_keys + kDecodeKTile - 1) / kDecodeKTile;
    const int wanted = whole ? 1 : std::clamp((kDecodeTargetBlocks + blocks - 1) / blocks, 1, tiles);
    const int split_len = (tiles + wanted - 1) / wanted * kDecodeKTile;
    const int splits = (max_keys + split_len - 1) / split_len;
    const bool f32 = std::is_same_v<T, float>;
    const std::string what = p.name + " decode " + (f32 ? "f32" : "bf16") + " (" + std::to_string(splits) +
                             " splits of " + std::to_string(split_len) + " keys)";
    if (!selected(what)) return;
    std::vector<T> q(p.q.size()), k(p.k.size()), v(p.v.size());
    for (size_t i = 0; i < q.size(); ++i) q[i] = (T)__bfloat162float(p.q[i]);
    for (size_t i = 0; i < k.size(); ++i) k[i] = (T)__bfloat162float(p.k[i]);
    for (size_t i = 0; i < v.size(); ++i) v[i] = (T)__bfloat162float(p.v[i]);
    auto outs = both_modes(what, [&](emu::Mode mode) -> std::vector<std::vector<double>> {
        const size_t states = (size_t)b.nq * H * splits;
        std::vector<float> po(states * D), pm(states), pl(states), lse((size_t)b.nq * H);
        std::vector<T> out((size_t)b.nq * H * D);
        poison(po);
        poison(pm);
        poison(pl);
        poison(lse);
        poison(out);
        emu::clear_globals();
        register_all(q);
        register_all(k);
        register_all(v);
        bool ok = emu::launch(dim3(B, KV, splits), dim3(kDecodeThreads), 0, mode, [&] {
            if constexpr (f32) {
                (D == 64 ? decode_partial_f32_d64 : decode_partial_f32_d128)(po.data(), pm.data(), pl.data(), q.data(),
                                                                            k.data(), v.data(), t.cu_q.data(),
                                                                            t.k_start.data(), t.k_len.data(), H, KV,
                                                                            p.scale, splits, split_len);
            } else {
                (D == 64 ? decode_partial_bf16_d64 : decode_partial_bf16_d128)(
                    po.data(), pm.data(), pl.data(), q.data(), k.data(), v.data(), t.cu_q.data(), t.k_start.data(),
                    t.k_len.data(), H, KV, p.scale, splits, split_len);
            }
        });
        ok = ok && emu::launch(dim3(b.nq, H), dim3(D), 0, mode, [&] {
            if constexpr (f32) decode_combine_f32(out.data(), lse.data(), po.data(), pm.data(), pl.data(), H, D, splits);
            else decode_combine_bf16(out.data(), lse.data(), po.data(), pm.data(), pl.data(), H, D, splits);
        });
        if (!launched(what, ok)) return {};
        return {widen(out), widen(lse)};
    });
    if (outs.empty()) return;
    compare(what + " out", outs[0], p.out, f32 ? 1e-5 : 1e-2);
    compare(what + " lse", outs[1], p.lse, f32 ? 1e-5 : 2e-3, true);
}

}  // namespace

int main(int argc, char** argv) {
    // Arguments: the seed of the random inputs; optionally a filter (say "hopper_narrow fast", ""
    // for all) and "large", which adds the long sequences (minutes rather than seconds), or
    // "intensity", which runs the flash kernels at T = 2,048 alone and prints, for each, the
    // tensor-core FLOPs per byte its cp.async copies read from global memory (L2).
    const unsigned seed = argc > 1 ? (unsigned)std::strtoul(argv[1], nullptr, 10) : 1u;
    if (argc > 2 && argv[2][0] != '\0') only = argv[2];
    const bool large = argc > 3 && std::string(argv[3]) == "large";
    intensity = argc > 3 && std::string(argv[3]) == "intensity";
    std::printf("seed %u\n", seed);
    std::mt19937 rng(seed);
    if (intensity) {
        for (int D : {64, 128}) {
            const Problem p = make(rng, "T=[2048] H1/KV1", packed({2048}), 1, 1, D);
            for (Fwd k : {Fwd::Mma, Fwd::Hopper, Fwd::HopperNarrow}) check_forward(p, k);
            for (Bwd k : {Bwd::MmaFast, Bwd::MmaDet, Bwd::HopperFast, Bwd::HopperDet, Bwd::NarrowFast, Bwd::NarrowDet})
                check_backward(p, k);
        }
        return tally::finish();
    }
    for (int D : {64, 128}) {
        // Packed training batches: a single row, a ragged batch with a partial tile and one past a
        // 128-row block, GQA groups of 3 and 9.
        std::vector<Problem> train;
        train.push_back(make(rng, "T=[1] H2/KV2", packed({1}), 2, 2, D));
        train.push_back(make(rng, "T=[17,127,70] H3/KV1", packed({17, 127, 70}), 3, 1, D));
        train.push_back(make(rng, "T=[200] H2/KV1", packed({200}), 2, 1, D));
        if (D == 64) train.push_back(make(rng, "T=[33] H9/KV1", packed({33}), 9, 1, D));
        if (large) {
            train.push_back(make(rng, "T=[1000] H2/KV2", packed({1000}), 2, 2, D));
            train.push_back(make(rng, "T=[4097] H1/KV1", packed({4097}), 1, 1, D));
        }
        for (const Problem& p : train) {
            for (Fwd k : {Fwd::Simple, Fwd::Mma, Fwd::Hopper, Fwd::HopperNarrow}) check_forward(p, k);
            for (Bwd k : {Bwd::Simple, Bwd::MmaFast, Bwd::MmaDet, Bwd::HopperFast, Bwd::HopperDet, Bwd::NarrowFast,
                          Bwd::NarrowDet})
                check_backward(p, k);
        }
        // A prefill against a cache (more keys than new rows; caches with room between them).
        const Problem prefill = make(rng, "prefill q=[40,70] k=[90,70] H2/KV2", cached({40, 70}, {90, 70}, 128), 2, 2, D);
        for (Fwd k : {Fwd::Simple, Fwd::Mma, Fwd::Hopper, Fwd::HopperNarrow}) check_forward(prefill, k);
        // Decode: one and two new rows against caches of 45 and 300 keys, GQA 2.
        const Problem decode = make(rng, "decode q=[1,2] k=[45,300] H4/KV2", cached({1, 2}, {45, 300}, 320), 4, 2, D);
        for (bool whole : {false, true}) {
            check_decode<float>(decode, whole);
            check_decode<bf16>(decode, whole);
        }
        check_forward(decode, Fwd::Mma);
        check_forward(decode, Fwd::Hopper);
    }
    return tally::finish();
}
