// The nonzeros of a row of W and their positions, listed with aarch64 vector instructions (the job of
// sparse_update.cpp's append_nonzeros): NEON, which has no compress, by a table lookup that moves the kept
// lanes to the front; SVE by its COMPACT instruction. A nonzero is any bit but the sign (-0 is dropped,
// NaN and Inf are kept). Both write whole vectors at `at` (up to 16 entries past the last one kept) and
// return the new end.
#pragma once

#include <arm_neon.h>

#include <array>
#include <cstdint>

#include "simd_aarch64.h"

#ifdef MS_FUSED_AARCH64_VARIANTS
#include <arm_sve.h>
#endif

namespace ms_fused::cpu::compact {

// Byte shuffles that move the lanes named by each mask (bit k: lane k) to the front, in lane order
template <int Lanes>
constexpr std::array<std::array<uint8_t, 16>, (1 << Lanes)> front_shuffles() {
  constexpr int bytes = 16 / Lanes;
  std::array<std::array<uint8_t, 16>, (1 << Lanes)> table{};
  for (int mask = 0; mask < (1 << Lanes); ++mask) {
    int out = 0;
    for (int lane = 0; lane < Lanes; ++lane) {
      if (mask >> lane & 1) {
        for (int b = 0; b < bytes; ++b) table[mask][out * bytes + b] = static_cast<uint8_t>(lane * bytes + b);
        ++out;
      }
    }
    for (int b = out * bytes; b < 16; ++b) table[mask][b] = 0;
  }
  return table;
}

inline constexpr auto kFront4 = front_shuffles<4>();  // 32-bit lanes: floats, and the indices of floats
inline constexpr auto kFront2 = front_shuffles<2>();  // 64-bit lanes: doubles

// NEON, 4 floats at a time (len a multiple of 4)
inline int64_t append_nonzeros_neon(const float* w, int64_t len, int32_t first, int32_t* index, float* value,
                                    int64_t at) {
  const uint32x4_t magnitude = vdupq_n_u32(0x7fffffffu), bit = {1, 2, 4, 8};
  int32x4_t idx = vaddq_s32(int32x4_t{0, 1, 2, 3}, vdupq_n_s32(first));
  for (int64_t j = 0; j < len; j += 4) {
    const uint32x4_t v = vld1q_u32(reinterpret_cast<const uint32_t*>(w + j));
    const uint32_t mask = vaddvq_u32(vandq_u32(vtstq_u32(v, magnitude), bit));
    const uint8x16_t shuffle = vld1q_u8(kFront4[mask].data());
    vst1q_u8(reinterpret_cast<uint8_t*>(value + at), vqtbl1q_u8(vreinterpretq_u8_u32(v), shuffle));
    vst1q_u8(reinterpret_cast<uint8_t*>(index + at), vqtbl1q_u8(vreinterpretq_u8_s32(idx), shuffle));
    at += __builtin_popcount(mask);
    idx = vaddq_s32(idx, vdupq_n_s32(4));
  }
  return at;
}

// NEON, 2 doubles at a time (len a multiple of 2)
inline int64_t append_nonzeros_neon(const double* w, int64_t len, int32_t first, int32_t* index, double* value,
                                    int64_t at) {
  const uint64x2_t magnitude = vdupq_n_u64(0x7fffffffffffffffull), bit = {1, 2};
  for (int64_t j = 0; j < len; j += 2) {
    const uint64x2_t v = vld1q_u64(reinterpret_cast<const uint64_t*>(w + j));
    const uint32_t mask = static_cast<uint32_t>(vaddvq_u64(vandq_u64(vtstq_u64(v, magnitude), bit)));
    const uint8x16_t shuffle = vld1q_u8(kFront2[mask].data());
    vst1q_u8(reinterpret_cast<uint8_t*>(value + at), vqtbl1q_u8(vreinterpretq_u8_u64(v), shuffle));
    const int32_t pos = first + static_cast<int32_t>(j);
    index[at] = mask == 2 ? pos + 1 : pos;  // the first kept position (written whatever the mask)
    index[at + 1] = pos + 1;
    at += __builtin_popcount(mask);
  }
  return at;
}

#ifdef MS_FUSED_AARCH64_VARIANTS
// SVE, any len: one vector of the CPU's length at a time, the last one partial (predicated)
__attribute__((target("+sve"))) inline int64_t append_nonzeros_sve(const float* w, int64_t len, int32_t first,
                                                                  int32_t* index, float* value, int64_t at) {
  for (int64_t j = 0; j < len; j += static_cast<int64_t>(svcntw())) {
    const svbool_t in = svwhilelt_b32(j, len);
    const svuint32_t v = svld1(in, reinterpret_cast<const uint32_t*>(w + j));
    const svbool_t keep = svcmpne(in, svand_x(in, v, 0x7fffffffu), 0u);
    const svint32_t idx = svindex_s32(first + static_cast<int32_t>(j), 1);
    const int64_t kept = static_cast<int64_t>(svcntp_b32(in, keep));
    const svbool_t out = svwhilelt_b32(int64_t(0), kept);
    svst1(out, reinterpret_cast<uint32_t*>(value + at), svcompact(keep, v));
    svst1(out, index + at, svcompact(keep, idx));
    at += kept;
  }
  return at;
}

__attribute__((target("+sve"))) inline int64_t append_nonzeros_sve(const double* w, int64_t len, int32_t first,
                                                                  int32_t* index, double* value, int64_t at) {
  for (int64_t j = 0; j < len; j += static_cast<int64_t>(svcntd())) {
    const svbool_t in = svwhilelt_b64(j, len);
    const svuint64_t v = svld1(in, reinterpret_cast<const uint64_t*>(w + j));
    const svbool_t keep = svcmpne(in, svand_x(in, v, 0x7fffffffffffffffull), uint64_t(0));
    const svint64_t idx = svindex_s64(first + j, 1);
    const int64_t kept = static_cast<int64_t>(svcntp_b64(in, keep));
    const svbool_t out = svwhilelt_b64(int64_t(0), kept);
    svst1(out, reinterpret_cast<uint64_t*>(value + at), svcompact(keep, v));
    svst1w(out, index + at, svcompact(keep, idx));  // the positions as int32
    at += kept;
  }
  return at;
}
#endif

}  // namespace ms_fused::cpu::compact
