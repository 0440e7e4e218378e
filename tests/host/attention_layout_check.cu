// The Hopper attention kernels' shared-memory layouts on the CPU: where hopper_load_tile puts each
// row and 16-byte chunk, which rows ldmatrix gathers into Q's register fragments, and where wgmma
// reads each operand element through the descriptors the kernels build (hopper_desc_k,
// hopper_desc_mn), against the model of PTX's canonical 128-byte-swizzle layouts in wgmma_layout.h.
// It checks the index arithmetic only, not the instructions. tests/kernel_host.rs compiles and runs
// it; it prints one line per failure and exits non-zero if there was any.
#include <cstdint>
#include <cstdio>
#include <set>
#include <string>
#include <utility>

#include "../../kernels/attention.cu"
#include "tally.h"
#include "wgmma_layout.h"

namespace {

using tally::check;
using namespace wgmma_layout;

// Where the kernels store element (row, col) of a [64][D] tile at `tile`.
uint32_t stored(uint32_t tile, int row, int col) { return tile + hopper_swizzle(row, col / 8) + (col % 8) * 2; }

std::string at(const char* what, int dim, int kk, int mn, int k) {
    return std::string(what) + " D" + std::to_string(dim) + " kk " + std::to_string(kk) + " (" + std::to_string(mn) +
           ", " + std::to_string(k) + ")";
}

void check_descriptor_fields() {
    for (uint32_t addr : {0x0u, 0x400u, 0x12340u, 0x3FFF0u})
        for (uint32_t lead : {16u, 1024u, (uint32_t)HOPPER_BLOCK_BYTES})
            for (uint32_t stride : {1024u, 2048u}) {
                const Desc d = decode(hopper_desc(addr, lead, stride));
                check(d.start == addr && d.leading == lead && d.stride == stride && d.swizzle == 1,
                      "descriptor fields of addr " + std::to_string(addr));
            }
}

template <int D>
void check_operands(uint32_t base) {
    constexpr int TILE_BYTES = FLASH_TILE * D * 2;
    const uint32_t tile = base, other = base + TILE_BYTES;
    // K-major operands: Q as A and K as B of S = Q·Kᵀ (and K, V, Q, dO in the backward's S and dP):
    // 64 rows, the k-step's 16 columns of head_dim.
    for (int kk = 0; kk < D / 16; ++kk) {
        const Desc d = decode(hopper_desc_k(tile, kk));
        for (int mn = 0; mn < FLASH_TILE; ++mn)
            for (int k = 0; k < 16; ++k)
                check(read_k_major(d, mn, k) == stored(tile, mn, 16 * kk + k), at("K-major", D, kk, mn, k));
    }
    // MN-major B of P·V (and dO, Q, K in dV, dK, dQ): keys 16kk .. 16kk + 15 as k, all D columns as n.
    for (int kk = 0; kk < FLASH_TILE / 16; ++kk) {
        const Desc d = decode(hopper_desc_mn(other, kk));
        for (int n = 0; n < D; ++n)
            for (int k = 0; k < 16; ++k)
                check(read_mn_major(d, n, k) == stored(other, 16 * kk + k, n), at("MN-major", D, kk, n, k));
    }
    // dQ = dS·K: A is the [64 keys][64 queries] dSᵀ block read M-major, B one 64-column block of K.
    for (int kk = 0; kk < FLASH_TILE / 16; ++kk)
        for (int cb = 0; cb < D / 64; ++cb) {
            const Desc a = decode(hopper_desc_mn(other, kk));
            const Desc b = decode(hopper_desc_mn(tile + cb * HOPPER_BLOCK_BYTES, kk));
            for (int mn = 0; mn < 64; ++mn)
                for (int k = 0; k < 16; ++k) {
                    check(read_mn_major(a, mn, k) == stored(other, 16 * kk + k, mn), at("dS^T", D, kk, mn, k));
                    check(read_mn_major(b, mn, k) == stored(tile, 16 * kk + k, 64 * cb + mn),
                          at("K columns", D, kk, mn, k));
                }
        }
}

// Q's A fragments by ldmatrix.x4 (hopper_a_frag_offset): matrix m = lane / 8 of the four must be
// rows (m % 2) * 8 .. + 7 and columns (m / 2) * 8 .. + 7 of the warp's 16 rows and the k-step (the
// order of an m16n8k16 A fragment's registers), lane row lane % 8 of it.
template <int D>
void check_a_fragments() {
    for (int warp = 0; warp < 4; ++warp)
        for (int kk = 0; kk < D / 16; ++kk)
            for (int lane = 0; lane < 32; ++lane) {
                const int m = lane / 8, row = warp * 16 + (m % 2) * 8 + lane % 8, col = 16 * kk + (m / 2) * 8;
                check(hopper_a_frag_offset(warp, lane, kk) == stored(0, row, col), at("A fragment", D, kk, row, col));
            }
}

// hopper_load_tile: every (row, chunk) of ROWS rows written exactly once, where the tiles hold it.
template <int D, int THREADS, int ROWS>
void check_loads() {
    using L = HopperLoad<D, THREADS>;
    std::set<std::pair<int, int>> seen;
    const std::string name = "load D" + std::to_string(D) + " threads " + std::to_string(THREADS) + " rows " +
                             std::to_string(ROWS);
    for (int tid = 0; tid < THREADS; ++tid)
        for (int j = 0; j < ROWS / L::ROW_STEP; ++j) {
            const int row = tid / L::CHUNKS + j * L::ROW_STEP, chunk = tid % L::CHUNKS;
            const uint32_t want = (row / FLASH_TILE) * L::TILE_BYTES + hopper_swizzle(row % FLASH_TILE, chunk);
            check(L::first(tid) + L::step(j) == want,
                  name + " tid " + std::to_string(tid) + " copy " + std::to_string(j));
            check(seen.insert({row, chunk}).second, name + ": row " + std::to_string(row) + " written twice");
        }
    check((int)seen.size() == ROWS * L::CHUNKS, name + ": rows left unwritten");
}

}  // namespace

int main() {
    check_descriptor_fields();
    // Tile bases as the kernels place them: 1,024-byte aligned, tiles one after another.
    for (uint32_t base : {0x400u, 0x8000u, 0x1FC00u}) {
        check_operands<64>(base);
        check_operands<128>(base);
    }
    check_a_fragments<64>();
    check_a_fragments<128>();
    check_loads<64, 128, 64>();
    check_loads<64, 256, 64>();
    check_loads<64, 256, 128>();
    check_loads<128, 128, 64>();
    check_loads<128, 256, 64>();
    check_loads<128, 256, 128>();
    return tally::finish("attention layouts: ");
}
