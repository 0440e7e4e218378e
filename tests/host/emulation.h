// CUDA kernels on the CPU, for tests: the kernels' own source, compiled by the host compiler, run
// block by block with every thread of a block a fiber. Threads switch only where they
// meet (barriers, warp shuffles and votes, ldmatrix, mma.sync, wgmma), so a block runs
// deterministically on one core, and everything between two meetings runs as one piece.
//
// What it checks beyond the arithmetic:
//   - every thread of a warp (or warpgroup, or barrier) meets at the same kind of operation; a
//     meeting some thread never reaches is reported as a deadlock naming where each thread waits;
//   - shared memory written by one warp (cp.async, st.shared) and read by another (ldmatrix, wgmma)
//     must have a barrier both took part in between the write and the read (vector clocks over
//     warps; plain C++ loads and stores, and races between lanes of one warp, are not tracked), and
//     what wgmma reads must have been fenced for the async proxy by the writing warp;
//   - cp.async copies land when the issuing thread waits for their group ("late"), or as soon as
//     they are issued ("eager"); wgmma reads its operands and writes its accumulators at the wait
//     (late) or at the issue (eager). A kernel that reads a tile before its copy was waited for, or
//     overwrites a stage still being read, or reads accumulators before the wait, gives different
//     results in the two modes. The modes also run the threads in opposite orders, so a thread that
//     reads shared memory another writes without a barrier between them sees different data;
//   - cp.async, ldmatrix, wgmma operands and st.shared stay inside the block's dynamic shared memory
//     (which starts poisoned with NaNs), with the alignment PTX requires; cp.async reads only from
//     buffers the harness registered; wgmma's descriptors and flags agree across the warpgroup.
// It also counts shared-memory bank conflicts of ldmatrix and st.shared (emu::stats()).
// Not modelled: timing, the memory model beyond the above, partial-warp masks.
//
// The kernels see RLHF_EMULATION and route each inline-PTX operation to the functions below.
#pragma once
#define RLHF_EMULATION 1

#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif
#include <vector_types.h>

#include "wgmma_layout.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
    return a < b ? a : b;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
    return a < b ? b : a;
}

namespace emu {

constexpr size_t kWindowBytes = 232 * 1024;  // an H100's shared memory a block, and some
constexpr size_t kDynamicOffset = 16;        // dynamic shared memory starts only 16-byte aligned
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 512 * 1024;

constexpr int kMaxWarps = kMaxThreads / 32;

struct Copy {
    unsigned char* dst;
    const unsigned char* src;
    int bytes, src_bytes, warp;
};

// The last write of a shared-memory byte in this block: by which warp, at which of its clocks, and
// its write count then (for the async-proxy fence).
struct Stamp {
    uint32_t clock = 0;  // 0: not written in this block
    uint32_t seq = 0;
    uint8_t warp = 0;
};

// Switching fibers: on x86-64 a stack switch saving the callee-saved registers (swapcontext also
// saves the signal mask, a system call each switch, which made it most of the emulator's time);
// elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
// Weak, so that every translation unit of a library may include this header.
asm(R"(
    .text
    .weak emu_switch_stack
    .type emu_switch_stack, @function
emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_stack, .-emu_switch_stack
)");
struct Context {
    void* sp = nullptr;
};
#else
struct Context {
    ucontext_t uc;
};
#endif

struct Fiber {
    Context ctx;
    uint3 tid;
    int linear = 0;
    bool done = false;
    const uint64_t* wait_generation = nullptr;
    uint64_t wait_value = 0;
    const char* waiting_at = "";
    std::vector<Copy> open_copies;
    std::deque<std::vector<Copy>> copy_groups;
};

// Threads that must all arrive before any goes on; the last one to arrive runs the operation.
struct Meeting {
    int arrived = 0, expected = 0;
    uint64_t generation = 0;
    const char* kind = nullptr;
};

struct WarpSlots {
    Meeting meeting;
    uint32_t in[32][16], out[32][16];
};

struct WgmmaOp {
    int n;  // 64 or 128
    uint64_t desc_a, desc_b;
    bool a_in_registers, accumulate;
    int trans_a, trans_b;
    float* d[128];
    const uint32_t* a[128];
    uint32_t known[kMaxWarps];  // per writer warp, the clock every issuing warp has seen
};

struct WarpgroupSlots {
    Meeting meeting;
    WgmmaOp pending;  // filled by each thread before the meeting
    std::vector<WgmmaOp> open;
    std::deque<std::vector<WgmmaOp>> groups;
};

// Shared-memory accesses in wavefronts (one per 128 bytes served without a bank conflict): an access
// whose wavefronts exceed its ideal count has bank conflicts.
struct Stats {
    uint64_t ldmatrix_phases = 0, ldmatrix_wavefronts = 0;  // a phase: one 8x8 matrix
    uint64_t st_shared = 0, st_shared_wavefronts = 0;       // a warp's 32 four-byte stores
    uint64_t copy_bytes = 0;   // global bytes read by cp.async (zero-filled ones not counted)
    uint64_t mma_flops = 0;    // 2·m·n·k of every mma.sync and wgmma
    uint64_t atomic_bytes = 0; // bytes updated by atomics
};

struct Mode {
    bool late = true;      // copies and wgmma complete at their wait (else at their issue)
    bool reverse = false;  // threads scheduled from the last
};

struct State {
    dim3 grid, block;
    uint3 block_idx;
    size_t dynamic_bytes = 0;
    Mode mode;
    std::vector<Fiber> fibers;
    std::vector<std::unique_ptr<char[]>> stacks;
    int current = -1;
    Context scheduler;
    WarpSlots warps[kMaxThreads / 32];
    WarpgroupSlots warpgroups[kMaxThreads / 128];
    Meeting barriers[16];
    uint32_t barrier_warps[16];  // warps arrived at each barrier, a bit each
    // clocks[r][w]: warp w's clock as warp r knows it (from the barriers they shared).
    uint32_t clocks[kMaxWarps][kMaxWarps];
    uint32_t writes[kMaxWarps], fenced[kMaxWarps];  // shared-memory writes so far; those fenced
    std::vector<Stamp> stamps = std::vector<Stamp>(kWindowBytes);
    std::function<void()> body;
    std::string error;
    std::map<const unsigned char*, size_t> globals;  // start -> bytes
    Stats stats;
    alignas(4096) unsigned char window[kWindowBytes];
};

inline State& st() {
    static State* s = new State();
    return *s;
}
inline Fiber& cur() { return st().fibers[st().current]; }
inline int linear_tid() { return cur().linear; }

inline void switch_context(Context& save, Context& load) {
#if defined(__x86_64__)
    emu_switch_stack(&save.sp, load.sp);
#else
    swapcontext(&save.uc, &load.uc);
#endif
}

// Records the first error, abandons the calling thread and the block.
[[noreturn]] inline void fail(const std::string& what) {
    State& s = st();
    if (s.error.empty()) {
        char where[96];
        std::snprintf(where, sizeof where, "block (%u,%u,%u) thread %d: ", s.block_idx.x, s.block_idx.y,
                      s.block_idx.z, s.current);
        s.error = where + what;
    }
    Fiber& f = cur();
    f.done = true;
    switch_context(f.ctx, s.scheduler);
    std::abort();  // never resumed
}

inline void wait_for(const uint64_t* generation, uint64_t value, const char* what) {
    Fiber& f = cur();
    f.wait_generation = generation;
    f.wait_value = value;
    f.waiting_at = what;
    switch_context(f.ctx, st().scheduler);
}

template <typename Last>
inline void meet(Meeting& m, int expected, const char* kind, Last&& last) {
    if (m.arrived == 0) {
        m.kind = kind;
        m.expected = expected;
    } else if (std::strcmp(m.kind, kind) != 0 || m.expected != expected) {
        fail(std::string("threads meet at different operations: ") + m.kind + " (" + std::to_string(m.expected) +
             " threads) and " + kind + " (" + std::to_string(expected) + ")");
    }
    if (++m.arrived == m.expected) {
        last();
        m.arrived = 0;
        ++m.generation;
        return;
    }
    wait_for(&m.generation, m.generation, kind);
}

// ----- memory -----

inline void register_global(const void* p, size_t bytes) {
    st().globals[static_cast<const unsigned char*>(p)] = bytes;
}
inline void unregister_global(const void* p) { st().globals.erase(static_cast<const unsigned char*>(p)); }
inline void clear_globals() { st().globals.clear(); }

inline void check_global(const void* p, size_t bytes, const char* what) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    auto it = st().globals.upper_bound(c);
    if (it != st().globals.begin()) {
        --it;
        if (c + bytes <= it->first + it->second) return;
    }
    fail(std::string(what) + " reads outside every buffer given to the kernel");
}

inline unsigned char* dynamic_smem() { return st().window + kDynamicOffset; }

// Checks that [addr, addr + bytes) lies in the block's dynamic shared memory and is aligned.
inline unsigned char* smem_at(uint32_t addr, size_t bytes, size_t align, const char* what) {
    const size_t lo = kDynamicOffset, hi = kDynamicOffset + st().dynamic_bytes;
    if (addr < lo || addr + bytes > hi) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "%s at shared address %u (+%zu) outside the dynamic shared memory [%zu, %zu)",
                      what, addr, bytes, lo, hi);
        fail(msg);
    }
    if (addr % align != 0) fail(std::string(what) + " misaligned at shared address " + std::to_string(addr));
    return st().window + addr;
}

inline int warp_of_current() { return linear_tid() / 32; }

inline void stamp_write(uint32_t addr, size_t bytes, int warp) {
    State& s = st();
    const Stamp stamp{s.clocks[warp][warp], ++s.writes[warp], (uint8_t)warp};
    for (size_t i = 0; i < bytes; ++i) s.stamps[addr + i] = stamp;
}

// A read by warps whose knowledge of each writer's clock is `known` (a writer's own reads need no
// barrier: `self`, or -1), through the async proxy or not.
inline void check_read(uint32_t addr, size_t bytes, const uint32_t* known, int self, bool async_proxy,
                       const char* what) {
    State& s = st();
    for (size_t i = 0; i < bytes; ++i) {
        const Stamp& w = s.stamps[addr + i];
        if (w.clock == 0 || w.warp == self) continue;
        char msg[200];
        if (known[w.warp] < w.clock) {
            std::snprintf(msg, sizeof msg,
                          "%s reads shared address %u, written by warp %d with no barrier between the write and "
                          "the read",
                          what, addr + (uint32_t)i, w.warp);
            fail(msg);
        }
        if (async_proxy && w.seq > s.fenced[w.warp]) {
            std::snprintf(msg, sizeof msg,
                          "%s reads shared address %u, written by warp %d with no fence.proxy.async after the write",
                          what, addr + (uint32_t)i, w.warp);
            fail(msg);
        }
    }
}

inline void fence_proxy_async() {
    State& s = st();
    const int w = warp_of_current();
    s.fenced[w] = s.writes[w];
}

inline uint32_t shared_address(const void* p) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (c < st().window || c >= st().window + kWindowBytes)
        fail("a shared-memory address taken of memory outside shared memory");
    return (uint32_t)(c - st().window);
}

inline float bf16_at(const unsigned char* p) {
    __nv_bfloat16 v;
    std::memcpy(&v, p, 2);
    return __bfloat162float(v);
}

inline void apply(const Copy& c) {
    std::memcpy(c.dst, c.src, c.src_bytes);
    std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
    stamp_write((uint32_t)(c.dst - st().window), c.bytes, c.warp);
}

// cp.async.cg 16 bytes; src_bytes 0 writes zeros and reads nothing.
inline void cp_async16(uint32_t dst, const void* src, int src_bytes) {
    unsigned char* d = smem_at(dst, 16, 16, "cp.async destination");
    if (src_bytes > 0) {
        if (reinterpret_cast<uintptr_t>(src) % 16 != 0) fail("cp.async source not 16-byte aligned");
        check_global(src, src_bytes, "cp.async");
    }
    const Copy c{d, static_cast<const unsigned char*>(src), 16, src_bytes, warp_of_current()};
    st().stats.copy_bytes += src_bytes;
    if (st().mode.late) cur().open_copies.push_back(c);
    else apply(c);
}
inline void cp_async_commit() {
    Fiber& f = cur();
    f.copy_groups.push_back(std::move(f.open_copies));
    f.open_copies.clear();
}
inline void cp_async_wait(int newest_left) {
    Fiber& f = cur();
    while ((int)f.copy_groups.size() > newest_left) {
        for (const Copy& c : f.copy_groups.front()) apply(c);
        f.copy_groups.pop_front();
    }
}

// Wavefronts to serve a set of 4-byte words: the most distinct words any one of the 32 banks holds.
inline int wavefronts(const uint32_t* word_addrs, int n) {
    int most = 1;
    for (int i = 0; i < n; ++i) {
        int same_bank = 0;
        for (int j = 0; j < n; ++j) {
            if ((word_addrs[j] / 4) % 32 != (word_addrs[i] / 4) % 32) continue;
            bool first = true;  // count each distinct word of the bank once
            for (int k = 0; k < j; ++k) first = first && word_addrs[k] != word_addrs[j];
            same_bank += first;
        }
        most = std::max(most, same_bank);
    }
    return most;
}

inline Stats& stats() { return st().stats; }

// ----- barriers and warp operations -----

// Each warp at a barrier learns every other's clock, then advances its own: writes before the
// barrier carry the old clock, which every participant now knows.
inline void bar_sync(int id, int count) {
    if (id < 0 || id >= 16) fail("barrier id out of range");
    if (count % 32 != 0) fail("a barrier's thread count must be a multiple of 32");
    State& s = st();
    s.barrier_warps[id] |= 1u << warp_of_current();
    meet(s.barriers[id], count, "barrier", [&] {
        const uint32_t mask = s.barrier_warps[id];
        uint32_t merged[kMaxWarps] = {};
        for (int r = 0; r < kMaxWarps; ++r)
            if (mask >> r & 1)
                for (int w = 0; w < kMaxWarps; ++w) merged[w] = std::max(merged[w], s.clocks[r][w]);
        for (int r = 0; r < kMaxWarps; ++r)
            if (mask >> r & 1) {
                std::memcpy(s.clocks[r], merged, sizeof merged);
                s.clocks[r][r] = merged[r] + 1;
            }
        s.barrier_warps[id] = 0;
    });
}
inline int block_threads() { return (int)(st().block.x * st().block.y * st().block.z); }

inline WarpSlots& warp_slots() { return st().warps[linear_tid() / 32]; }

// A warp-wide operation: each lane puts `words` words in its slot; the last to arrive maps every
// lane's inputs to every lane's outputs.
template <typename Op>
inline const uint32_t* warp_op(unsigned mask, const char* kind, const uint32_t* words, int n, Op&& op) {
    if (mask != 0xffffffffu) fail(std::string(kind) + " with a partial mask is not emulated");
    if (block_threads() % 32 != 0) fail("a warp operation in a block of a partial warp is not emulated");
    WarpSlots& w = warp_slots();
    const int lane = linear_tid() % 32;
    std::memcpy(w.in[lane], words, n * 4);
    meet(w.meeting, 32, kind, [&] { op(w.in, w.out); });
    return w.out[lane];
}

// A shuffle of a 4- or 8-byte value: lane l takes the value of lane source(l, its argument).
template <typename T, typename Source>
inline T shuffle(unsigned mask, T v, uint32_t arg, int width, const char* kind, Source source) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "32- and 64-bit shuffles only");
    if (width != 32) fail("shuffles narrower than a warp are not emulated");
    uint32_t in[3] = {0, 0, arg};
    std::memcpy(in, &v, sizeof(T));
    const uint32_t* out = warp_op(mask, kind, in, 3, [&](auto& i, auto& o) {
        for (int l = 0; l < 32; ++l) {
            const int src = source(l, i[l][2]);
            o[l][0] = i[src][0];
            o[l][1] = i[src][1];
        }
    });
    T r;
    std::memcpy(&r, out, sizeof(T));
    return r;
}

// ldmatrix.m8n8.x4.b16: lane i gives the address of row i % 8 of matrix i / 8; lane l receives, of
// each matrix, elements (l / 4, 2 (l % 4) and + 1), or with .trans (2 (l % 4) and + 1, l / 4).
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
    uint32_t in[1] = {addr};
    smem_at(addr, 16, 16, "ldmatrix row");
    check_read(addr, 16, st().clocks[warp_of_current()], warp_of_current(), false, "ldmatrix");
    const uint32_t* out = warp_op(0xffffffffu, trans ? "ldmatrix.trans" : "ldmatrix", in, 1, [&](auto& i, auto& o) {
        for (int m = 0; m < 4; ++m) {
            uint32_t words[32];
            for (int r = 0; r < 8; ++r)
                for (int j = 0; j < 4; ++j) words[4 * r + j] = i[8 * m + r][0] + 4 * j;
            stats().ldmatrix_phases += 1;
            stats().ldmatrix_wavefronts += wavefronts(words, 32);
        }
        auto elem = [&](int m, int row, int col) {
            uint16_t v;
            std::memcpy(&v, st().window + i[8 * m + row][0] + 2 * col, 2);
            return (uint32_t)v;
        };
        for (int l = 0; l < 32; ++l)
            for (int m = 0; m < 4; ++m) {
                const int a = l / 4, b = 2 * (l % 4);
                o[l][m] = trans ? elem(m, b, a) | elem(m, b + 1, a) << 16 : elem(m, a, b) | elem(m, a, b + 1) << 16;
            }
    });
    for (int m = 0; m < 4; ++m) r[m] = out[m];
}

// A warp-wide store (the kernels store a warp at a time), so that its bank conflicts can be counted.
inline void st_shared_u32(uint32_t addr, uint32_t value) {
    std::memcpy(smem_at(addr, 4, 4, "st.shared"), &value, 4);
    stamp_write(addr, 4, warp_of_current());
    const uint32_t in[1] = {addr};
    warp_op(0xffffffffu, "st.shared", in, 1, [](auto& i, auto&) {
        uint32_t words[32];
        for (int l = 0; l < 32; ++l) words[l] = i[l][0];
        stats().st_shared += 1;
        stats().st_shared_wavefronts += wavefronts(words, 32);
    });
}

inline float lo_bf16(uint32_t w) {
    const uint16_t h = (uint16_t)(w & 0xFFFF);
    return bf16_at(reinterpret_cast<const unsigned char*>(&h));
}
inline float hi_bf16(uint32_t w) {
    const uint16_t h = (uint16_t)(w >> 16);
    return bf16_at(reinterpret_cast<const unsigned char*>(&h));
}

// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32: c += a·b in the PTX fragment layouts (group g = lane
// / 4, t = lane % 4): a holds A rows g and g + 8, columns 2t, 2t + 1 and those + 8; b holds B rows
// (k) 2t, 2t + 1 and + 8 of column g; c rows g and g + 8, columns 2t, 2t + 1.
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    uint32_t in[10];
    std::memcpy(in, a, 16);
    in[4] = b0;
    in[5] = b1;
    std::memcpy(in + 6, c, 16);
    const uint32_t* out = warp_op(0xffffffffu, "mma.m16n8k16", in, 10, [&](auto& i, auto& o) {
        st().stats.mma_flops += 2 * 16 * 8 * 16;
        float A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l / 4, t = l % 4;
            for (int r = 0; r < 4; ++r) {
                const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
                A[row][col] = lo_bf16(i[l][r]);
                A[row][col + 1] = hi_bf16(i[l][r]);
            }
            for (int r = 0; r < 2; ++r) {
                B[2 * t + 8 * r][g] = lo_bf16(i[l][4 + r]);
                B[2 * t + 8 * r + 1][g] = hi_bf16(i[l][4 + r]);
            }
            for (int e = 0; e < 4; ++e) std::memcpy(&C[g + 8 * (e >> 1)][2 * t + (e & 1)], &i[l][6 + e], 4);
        }
        for (int l = 0; l < 32; ++l) {
            const int g = l / 4, t = l % 4;
            for (int e = 0; e < 4; ++e) {
                const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
                float acc = C[row][col];
                for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
                std::memcpy(&o[l][e], &acc, 4);
            }
        }
    });
    std::memcpy(c, out, 16);
}

// ----- wgmma -----

// Where wgmma reads element (mn, k) of a k16 step through descriptor `desc` (wgmma_layout.h).
inline uint32_t operand_address(uint64_t desc, bool mn_major, int mn, int k) {
    const wgmma_layout::Desc d = wgmma_layout::decode(desc);
    if (d.swizzle != 1) fail("a wgmma descriptor without the 128-byte swizzle is not emulated");
    return mn_major ? wgmma_layout::read_mn_major(d, mn, k) : wgmma_layout::read_k_major(d, mn, k);
}

inline float operand_at(const WgmmaOp& op, uint64_t desc, bool mn_major, int mn, int k) {
    const uint32_t addr = operand_address(desc, mn_major, mn, k);
    const unsigned char* p = smem_at(addr, 2, 2, "wgmma operand");
    check_read(addr, 2, op.known, -1, true, "wgmma");
    return bf16_at(p);
}

// D (m64nN, f32) of thread t: warp w = t / 32, lane l: d[i][e] is row 16w + l/4 + 8(e/2), column
// 8i + 2(l%4) + e%2, the mma.sync accumulator layout per warp and n8 tile. A from registers: the
// m16k16 A fragment of mma.sync per warp.
inline void execute(const WgmmaOp& op) {
    static float A[64][16], B[16][128];
    for (int m = 0; m < 64; ++m)
        for (int k = 0; k < 16; ++k) {
            if (op.a_in_registers) {
                const int w = m / 16, r = m % 16, lane = (r % 8) * 4 + (k % 8) / 2, reg = (r / 8) + 2 * (k / 8);
                const uint32_t word = op.a[32 * w + lane][reg];
                A[m][k] = k % 2 ? hi_bf16(word) : lo_bf16(word);
            } else {
                A[m][k] = operand_at(op, op.desc_a, op.trans_a, m, k);
            }
        }
    for (int n = 0; n < op.n; ++n)
        for (int k = 0; k < 16; ++k) B[k][n] = operand_at(op, op.desc_b, op.trans_b, n, k);
    for (int t = 0; t < 128; ++t) {
        const int w = t / 32, l = t % 32;
        for (int i = 0; i < op.n / 8; ++i)
            for (int e = 0; e < 4; ++e) {
                const int row = 16 * w + l / 4 + 8 * (e >> 1), col = 8 * i + 2 * (l % 4) + (e & 1);
                float acc = op.accumulate ? op.d[t][4 * i + e] : 0.0f;
                for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
                op.d[t][4 * i + e] = acc;
            }
    }
}

inline WarpgroupSlots& warpgroup_slots() { return st().warpgroups[linear_tid() / 128]; }

inline void wgmma(float* d, int n, const uint32_t* a, uint64_t desc_a, uint64_t desc_b, int accumulate, int trans_a,
                  int trans_b) {
    if (block_threads() % 128 != 0) fail("wgmma in a block of a partial warpgroup");
    WarpgroupSlots& g = warpgroup_slots();
    const int t = linear_tid() % 128;
    // Uniform fields from the first thread to arrive; the others must agree.
    WgmmaOp& p = g.pending;
    const bool regs = a != nullptr, acc = accumulate != 0;
    if (g.meeting.arrived == 0) {
        p.n = n;
        p.desc_a = desc_a;
        p.desc_b = desc_b;
        p.a_in_registers = regs;
        p.accumulate = acc;
        p.trans_a = trans_a;
        p.trans_b = trans_b;
    } else if (p.n != n || p.a_in_registers != regs || (!regs && p.desc_a != desc_a) || p.desc_b != desc_b ||
               p.accumulate != acc || p.trans_a != trans_a || p.trans_b != trans_b) {
        fail("wgmma operands or flags differ across the warpgroup");
    }
    p.d[t] = d;
    p.a[t] = a;
    meet(g.meeting, 128, "wgmma.mma_async", [&] {
        st().stats.mma_flops += 2ull * 64 * n * 16;
        // What all four warps know of each writer; a warp's own writes precede its own issue but
        // not the other three's.
        const int first = linear_tid() / 128 * 4;
        for (int w = 0; w < kMaxWarps; ++w) {
            uint32_t k = UINT32_MAX;
            for (int r = first; r < first + 4; ++r)
                if (r != w) k = std::min(k, st().clocks[r][w]);
            p.known[w] = k;
        }
        if (st().mode.late) g.open.push_back(p);
        else execute(p);
    });
}
inline void wgmma_fence() { meet(warpgroup_slots().meeting, 128, "wgmma.fence", [] {}); }
inline void wgmma_commit() {
    WarpgroupSlots& g = warpgroup_slots();
    meet(g.meeting, 128, "wgmma.commit_group", [&] {
        g.groups.push_back(std::move(g.open));
        g.open.clear();
    });
}
inline void wgmma_wait(int newest_left) {
    WarpgroupSlots& g = warpgroup_slots();
    meet(g.meeting, 128, "wgmma.wait_group", [&] {
        while ((int)g.groups.size() > newest_left) {
            for (const WgmmaOp& op : g.groups.front()) execute(op);
            g.groups.pop_front();
        }
    });
}

// ----- launches -----

inline void fiber_entry() {
    st().body();
    Fiber& f = cur();
    f.done = true;
    switch_context(f.ctx, st().scheduler);
    std::abort();  // never resumed
}

// A fresh fiber whose first switch-in runs fiber_entry on `stack`.
inline void start_context(Context& c, char* stack, size_t bytes) {
#if defined(__x86_64__)
    // What emu_switch_stack pops: MXCSR and the x87 control word, r15 .. rbp, then the return
    // address, which must sit 16-byte aligned for fiber_entry to start as if called.
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~(uintptr_t)15;
    void** ret = reinterpret_cast<void**>(top - 16);
    *ret = reinterpret_cast<void*>(&fiber_entry);
    uint64_t* regs = reinterpret_cast<uint64_t*>(ret) - 6;
    for (int i = 0; i < 6; ++i) regs[i] = 0;
    uint32_t* control = reinterpret_cast<uint32_t*>(regs - 1);
    control[0] = 0x1F80;  // MXCSR default
    control[1] = 0x037F;  // x87 control word default
    c.sp = control;
#else
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, fiber_entry, 0);
#endif
}

inline bool run_block() {
    State& s = st();
    const int n = block_threads();
    s.fibers.assign(n, Fiber());
    while ((int)s.stacks.size() < n) s.stacks.emplace_back(new char[kStackBytes]);
    for (auto& w : s.warps) w.meeting = Meeting();
    for (auto& g : s.warpgroups) {
        g.meeting = Meeting();
        g.open.clear();
        g.groups.clear();
    }
    for (auto& b : s.barriers) b = Meeting();
    std::memset(s.barrier_warps, 0, sizeof s.barrier_warps);
    std::memset(s.clocks, 0, sizeof s.clocks);
    for (int w = 0; w < kMaxWarps; ++w) s.clocks[w][w] = 1;
    std::memset(s.writes, 0, sizeof s.writes);
    std::memset(s.fenced, 0, sizeof s.fenced);
    std::fill(s.stamps.begin(), s.stamps.begin() + std::min(kWindowBytes, kDynamicOffset + s.dynamic_bytes), Stamp());
    for (int i = 0; i < n; ++i) {
        Fiber& f = s.fibers[i];
        f.linear = i;
        f.tid = uint3{(unsigned)(i % s.block.x), (unsigned)(i / s.block.x % s.block.y),
                      (unsigned)(i / (s.block.x * s.block.y))};
        start_context(f.ctx, s.stacks[i].get(), kStackBytes);
    }
    for (;;) {
        bool progress = false, all_done = true;
        for (int k = 0; k < n; ++k) {
            const int i = s.mode.reverse ? n - 1 - k : k;
            Fiber& f = s.fibers[i];
            if (f.done) continue;
            all_done = false;
            if (f.wait_generation && *f.wait_generation == f.wait_value) continue;
            f.wait_generation = nullptr;
            s.current = i;
            switch_context(s.scheduler, f.ctx);
            progress = true;
            if (!s.error.empty()) return false;
        }
        if (all_done) break;
        if (!progress) {
            std::string where;
            for (int i = 0; i < n; i += 32) where += " warp " + std::to_string(i / 32) + ": " + s.fibers[i].waiting_at + (s.fibers[i].done ? " (exited)" : "") + ";";
            s.error = "deadlock in block (" + std::to_string(s.block_idx.x) + "," + std::to_string(s.block_idx.y) +
                      "):" + where;
            return false;
        }
    }
    // (Empty groups may stay: a pipeline's last commit often has nothing in it.)
    for (const Fiber& f : s.fibers) {
        size_t pending = f.open_copies.size();
        for (const auto& g : f.copy_groups) pending += g.size();
        if (pending > 0) {
            s.error = "thread " + std::to_string(f.linear) + " exited with " + std::to_string(pending) +
                      " cp.async copies it never waited for";
            return false;
        }
    }
    for (int g = 0; g < n / 128; ++g)
        if (!s.warpgroups[g].groups.empty() || !s.warpgroups[g].open.empty()) {
            s.error = "a warpgroup exited with wgmma operations it never waited for";
            return false;
        }
    return true;
}

// Runs `kernel` (a call of the kernel with its arguments) over the grid; false with
// emu::last_error() set at the first failure.
inline bool launch(dim3 grid, dim3 block, size_t dynamic_bytes, Mode mode, std::function<void()> kernel) {
    State& s = st();
    if (dynamic_bytes + kDynamicOffset > kWindowBytes) {
        s.error = "dynamic shared memory of " + std::to_string(dynamic_bytes) + " bytes exceeds the emulated " +
                  std::to_string(kWindowBytes - kDynamicOffset);
        return false;
    }
    if (block.x * block.y * block.z > (unsigned)kMaxThreads) {
        s.error = "more than 1024 threads a block";
        return false;
    }
    s.error.clear();
    s.grid = grid;
    s.block = block;
    s.dynamic_bytes = dynamic_bytes;
    s.mode = mode;
    s.body = std::move(kernel);
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                s.block_idx = uint3{x, y, z};
                std::memset(s.window, 0xFF, kWindowBytes);  // bf16 and f32 NaN
                if (!run_block()) return false;
            }
    return true;
}

inline const std::string& last_error() { return st().error; }

// Kernels by name, for an emulated driver's cuModuleGetFunction and cuLaunchKernel: each binds its
// kernel to copies of the arguments cuLaunchKernel's parameter array points to, so that a launch
// recorded into a graph can run after the caller's argument variables are gone.
using Call = std::function<void()>;
using Binder = std::function<Call(void**)>;
inline std::map<std::string, Binder>& kernels() {
    static std::map<std::string, Binder>* k = new std::map<std::string, Binder>();
    return *k;
}
template <typename... A, size_t... I>
inline Call bind_arguments(void (*f)(A...), void** params, std::index_sequence<I...>) {
    std::tuple<std::decay_t<A>...> args(*static_cast<std::decay_t<A>*>(params[I])...);
    return [f, args] { std::apply(f, args); };
}
struct Registrar {
    template <typename... A>
    Registrar(const char* name, void (*f)(A...)) {
        kernels()[name] = [f](void** params) { return ::emu::bind_arguments(f, params, std::index_sequence_for<A...>{}); };
    }
};
#define EMU_KERNEL(name) static ::emu::Registrar emu_registrar_##name(#name, &name);

}  // namespace emu

// ----- the CUDA names kernels use -----

#define threadIdx (::emu::cur().tid)
#define blockIdx (::emu::st().block_idx)
#define blockDim (::emu::st().block)
#define gridDim (::emu::st().grid)

inline void __syncthreads() { emu::bar_sync(0, emu::block_threads()); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emu::shuffle(mask, v, (uint32_t)lane_mask, width, "shfl.bfly",
                        [](int l, uint32_t m) { return (l ^ (int)m) & 31; });
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return emu::shuffle(mask, v, (uint32_t)src, width, "shfl.idx", [](int, uint32_t s) { return (int)s & 31; });
}
// Lane l takes lane l - delta's value, its own where that is below 0.
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::shuffle(mask, v, delta, width, "shfl.up", [](int l, uint32_t d) { return l >= (int)d ? l - (int)d : l; });
}
inline int __any_sync(unsigned mask, int pred) {
    uint32_t in[1] = {(uint32_t)(pred != 0)};
    const uint32_t* out = emu::warp_op(mask, "vote.any", in, 1, [](auto& i, auto& o) {
        uint32_t any = 0;
        for (int l = 0; l < 32; ++l) any |= i[l][0];
        for (int l = 0; l < 32; ++l) o[l][0] = any;
    });
    return (int)out[0];
}
namespace emu {
// A vector access of global memory (16 bytes, or 8 for a float2 atomic) traps on a GPU when its
// address is not a multiple of its size; host code would read it anyway.
inline void require_global_aligned(const void* p, size_t bytes, const char* what) {
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
        fail(std::string(what) + ": global address " + std::to_string(reinterpret_cast<uintptr_t>(p)) +
             " not " + std::to_string(bytes) + "-byte aligned");
}
}  // namespace emu

// Threads run one at a time, so a read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* p, T v) {
    emu::stats().atomic_bytes += sizeof(T);
    const T old = *p;
    *p = old + v;
    return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
    const T old = *p;
    *p = v < old ? v : old;
    return old;
}
template <typename T>
inline T atomicMax(T* p, T v) {
    const T old = *p;
    *p = v > old ? v : old;
    return old;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float x, float y) { return x / y; }
template <typename T>
inline T __ldg(const T* p) {
    return *p;
}
inline float __expf(float x) { return expf(x); }
inline size_t __cvta_generic_to_shared(const void* p) { return emu::shared_address(p); }
[[noreturn]] inline void __trap() { emu::fail("__trap()"); }
