// Branch-free math shared by the per-row passes (row_kernels.cpp, self_passes.cpp), and the choice of
// the ISA variant those passes run (the variants themselves: isa_variants.h).
//
// Everything here is always-inline, so each variant of a pass gets it vectorised for its own instruction
// set where the pass is compiled (see MS_FUSED_ALL_VARIANTS).
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>

#define MS_FUSED_INLINE inline __attribute__((always_inline))

#include "isa_variants.h"

namespace ms_fused::cpu::simd {

template <typename T>
struct ExpConsts;

template <>
struct ExpConsts<float> {
  using Bits = int32_t;
  static constexpr float lo = -87.0f, hi = 88.0f;  // 2^n stays a normal number
  static constexpr float round_shift = 0x1.8p23f;  // adding it leaves round(x) in the low mantissa bits
  static constexpr float ln2_hi = 0x1.62e400p-1f, ln2_lo = 0x1.7f7d1cp-20f;
  static constexpr Bits bias = 127, mantissa_bits = 23;
  static constexpr int degree = 7;
};

template <>
struct ExpConsts<double> {
  using Bits = int64_t;
  static constexpr double lo = -708.0, hi = 709.0;
  static constexpr double round_shift = 0x1.8p52;
  static constexpr double ln2_hi = 0x1.62e42fee00000p-1, ln2_lo = 0x1.a39ef35793c76p-33;
  static constexpr Bits bias = 1023, mantissa_bits = 52;
  static constexpr int degree = 12;
};

// Pair counters as wide as T, so that they share the vector lanes of the sums
template <typename T>
using Count = typename ExpConsts<T>::Bits;

template <typename T>
constexpr T factorial(int k) {
  T f = 1;
  for (int i = 2; i <= k; ++i) f *= T(i);
  return f;
}

template <typename T, int K>
inline constexpr T kInverseFactorial = T(1) / factorial<T>(K);

// Taylor polynomial of exp(r) up to r^Degree / Degree!, by Horner, fully unrolled at compile time
template <typename T, int Degree>
MS_FUSED_INLINE T exp_taylor(T r) {
  T p = kInverseFactorial<T, Degree>;
  [&]<int... K>(std::integer_sequence<int, K...>) __attribute__((always_inline)) {  // else GCC may call it per lane
    ((p = p * r + kInverseFactorial<T, Degree - 1 - K>), ...);
  }(std::make_integer_sequence<int, Degree>{});
  return p;
}

// exp(x) with a branch-free body the vectoriser can map onto any SIMD width: x = n ln2 + r with
// |r| <= ln2/2, exp(r) by its Taylor polynomial (relative error below 1e-8 in float, 1e-15 in double),
// 2^n assembled in the exponent bits. exp(x) = 0 below `lo`; NaN stays NaN.
// Below `lo` the exponent bits are 0, so the product is an exact 0: a select of 0 after the product would
// let the compiler compute the product from the unclamped x, and that product can be subnormal, which
// x86 cores compute through a microcode assist about 10x slower (lanes of pairs far from the shift).
template <typename T>
MS_FUSED_INLINE T vec_exp(T x) {
  using C = ExpConsts<T>;
  using Bits = typename C::Bits;
  const T xc = x < C::lo ? C::lo : (x > C::hi ? C::hi : x);
  const T shifted = xc * T(1.4426950408889634) + C::round_shift;
  const T n = shifted - C::round_shift;
  const T r = (xc - n * C::ln2_hi) - n * C::ln2_lo;
  const T p = exp_taylor<T, C::degree>(r);
  const Bits k = std::bit_cast<Bits>(shifted) - std::bit_cast<Bits>(C::round_shift);
  const Bits biased = x < C::lo ? Bits(0) : k + C::bias;
  const T y = p * std::bit_cast<T>(static_cast<Bits>(biased << C::mantissa_bits));
  return x != x ? x : y;
}

// log(1 + sum) where the sum's terms were scaled by exp(-shift), shift >= 0 (docs/semantics.md "Loss": the "1" is exp(0))
template <typename T>
T log1p_shifted(T shift, T sum) {
  return shift > 0 ? shift + std::log(std::exp(-shift) + sum) : std::log1p(sum);
}

// G for pair (anchor, column) given its similarity v, whether the labels match and whether it is a positive
template <typename T>
MS_FUSED_INLINE T pair_weight(T v, bool same, bool pos, T pos_limit, T neg_limit, T pos_shift, T neg_shift,
                              T pos_coef, T neg_coef, T alpha, T beta, T eps) {
  const T e = vec_exp(same ? -alpha * v + pos_shift : beta * v + neg_shift);
  // flat selects only: nested ?: on booleans defeats GCC's if-conversion
  const bool hard = (pos & (v - eps < pos_limit)) | (!same & (v + eps > neg_limit));
  const T coef = same ? pos_coef : neg_coef;
  return hard ? coef * e : T(0);
}

template <typename T>
void fill_nan(T* s, int64_t m) {
  for (int64_t j = 0; j < m; ++j) s[j] = std::numeric_limits<T>::quiet_NaN();
}

// The best variant the CPU runs, or a narrower one named by ATEN_CPU_CAPABILITY (PyTorch's variable, read
// once as PyTorch does; a wider one than the CPU runs, or a name without a variant here, is ignored).
inline Isa choose_isa() {
  const Isa best = best_supported();
  if (const char* wanted = std::getenv("ATEN_CPU_CAPABILITY")) {
    for (int k = 0; k <= static_cast<int>(best); ++k) {
      if (std::strcmp(wanted, kIsaNames[k]) == 0) return static_cast<Isa>(k);
    }
  }
  return best;
}

// One choice per process, shared by every file of passes (an inline function's static is one object)
inline Isa active_isa() {
  static const Isa isa = choose_isa();
  return isa;
}

}  // namespace ms_fused::cpu::simd
