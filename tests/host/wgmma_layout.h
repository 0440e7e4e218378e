// PTX's wgmma shared-memory operand layouts with the 128-byte swizzle, written from the ISA's
// definitions: the model that attention_layout_check.cu checks the kernels' layouts against and
// that emulation.h reads wgmma operands through.
//   - a descriptor holds the start address, the leading and the stride byte offsets (16-byte units,
//     bits 0-13, 16-29, 32-45) and the swizzle mode (bits 62-63, 1 = 128 bytes);
//   - the 128-byte swizzle XORs address bits 4-6 (the 16-byte chunk) with bits 7-9 (the row within
//     eight 128-byte rows), on the absolute shared-memory address;
//   - K-major: element (mn, k) of a k16 step at start + (mn % 8) * 128 + (mn / 8) * SBO + 2k (the
//     leading offset unused);
//   - MN-major: element (mn, k) at start + (mn % 64) * 2 + (mn / 64) * LBO + (k % 8) * 128 +
//     (k / 8) * SBO.
#pragma once
#include <cstdint>

namespace wgmma_layout {

struct Desc {
    uint32_t start, leading, stride, swizzle;
};

inline Desc decode(uint64_t d) {
    return Desc{(uint32_t)(d & 0x3FFF) << 4, (uint32_t)((d >> 16) & 0x3FFF) << 4,
                (uint32_t)((d >> 32) & 0x3FFF) << 4, (uint32_t)(d >> 62)};
}

inline uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7) << 4); }

// Byte address wgmma reads for element (mn, k) of one k16 step.
inline uint32_t read_k_major(const Desc& d, int mn, int k) {
    return swizzle128(d.start + (mn % 8) * 128 + (mn / 8) * d.stride + 2 * k);
}
inline uint32_t read_mn_major(const Desc& d, int mn, int k) {
    return swizzle128(d.start + (mn % 64) * 2 + (mn / 64) * d.leading + (k % 8) * 128 + (k / 8) * d.stride);
}

}  // namespace wgmma_layout
