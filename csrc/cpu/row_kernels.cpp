// The per-row passes (see row_kernels.h). Every loop is a `#pragma omp simd` loop of selects, so the
// compiler vectorises it; the entry points are compiled once per ISA level where GCC supports it, and the
// variant to run is chosen once, at the first call (see row_kernels.h).
#include "row_kernels.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MS_FUSED_X86_VARIANTS 1
#endif

#define MS_FUSED_INLINE inline __attribute__((always_inline))

namespace ms_fused::cpu {
namespace {

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
  [&]<int... K>(std::integer_sequence<int, K...>) {
    ((p = p * r + kInverseFactorial<T, Degree - 1 - K>), ...);
  }(std::make_integer_sequence<int, Degree>{});
  return p;
}

// exp(x) with a branch-free body the vectoriser can map onto any SIMD width: x = n ln2 + r with
// |r| <= ln2/2, exp(r) by its Taylor polynomial (relative error below 1e-8 in float, 1e-15 in double),
// 2^n assembled in the exponent bits. exp(x) = 0 below `lo`; NaN stays NaN.
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
  const T scale = std::bit_cast<T>(static_cast<Bits>((k + C::bias) << C::mantissa_bits));
  const T y = p * scale;
  return x < C::lo ? T(0) : (x != x ? x : y);
}

// log(1 + sum) where the sum's terms were scaled by exp(-shift), shift >= 0 (docs/semantics.md "Loss": the "1" is exp(0))
template <typename T>
T log1p_shifted(T shift, T sum) {
  return shift > 0 ? shift + std::log(std::exp(-shift) + sum) : std::log1p(sum);
}

template <typename T>
MS_FUSED_INLINE RowStats<T> forward_row_impl(const T* s, const int32_t* yr, int64_t m, int32_t yq,
                                             int32_t ref_self_index, const Hyper<T>& hp) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  constexpr T nan = std::numeric_limits<T>::quiet_NaN();
  T min_pos = inf, max_neg = -inf, nonfinite = 0;
#pragma omp simd reduction(min : min_pos) reduction(max : max_neg) reduction(+ : nonfinite)
  for (int64_t j = 0; j < m; ++j) {
    const T v = s[j];
    const bool same = yr[j] == yq;
    const bool pos = same & (static_cast<int32_t>(j) != ref_self_index);
    const T as_pos = pos ? v : inf;
    const T as_neg = same ? -inf : v;
    min_pos = as_pos < min_pos ? as_pos : min_pos;
    max_neg = as_neg > max_neg ? as_neg : max_neg;
    nonfinite += v - v;  // NaN as soon as one v is NaN or +-Inf
  }
  if (!(nonfinite == 0)) return {min_pos, max_neg, nan, nan};

  const T eps = hp.epsilon;
  const T pos_limit = hp.mining ? max_neg : inf;  // docs/semantics.md "Mining": hard positive iff s - eps < max_neg
  const T neg_limit = hp.mining ? min_pos : -inf;  //               hard negative iff s + eps > min_pos
  // hardness is monotone in s, so a mined set is non-empty iff its extreme is mined, and the extreme
  // gives the log-sum-exp shift m = max(0, max z)
  const bool any_pos = min_pos < inf && min_pos - eps < pos_limit;
  const bool any_neg = max_neg > -inf && max_neg + eps > neg_limit;
  const T pos_max = any_pos ? std::max(T(0), -hp.alpha * (min_pos - hp.base)) : T(0);
  const T neg_max = any_neg ? std::max(T(0), hp.beta * (max_neg - hp.base)) : T(0);
  const T pos_shift = hp.alpha * hp.base - pos_max, neg_shift = -hp.beta * hp.base - neg_max;
  const T alpha = hp.alpha, beta = hp.beta;
  T sum_pos = 0, sum_neg = 0;
  // counters as wide as T, so that they share the vector lanes of the sums
  using Count = typename ExpConsts<T>::Bits;
  Count n_pos = 0, n_neg = 0;
  if (any_pos || any_neg) {
#pragma omp simd reduction(+ : sum_pos, sum_neg, n_pos, n_neg)
    for (int64_t j = 0; j < m; ++j) {
      const T v = s[j];
      const bool same = yr[j] == yq;
      const bool pos = same & (static_cast<int32_t>(j) != ref_self_index);
      const T e = vec_exp(same ? -alpha * v + pos_shift : beta * v + neg_shift);
      const bool hard_pos = pos & (v - eps < pos_limit), hard_neg = !same & (v + eps > neg_limit);
      sum_pos += hard_pos ? e : T(0);
      sum_neg += hard_neg ? e : T(0);
      n_pos += hard_pos ? Count(1) : Count(0);
      n_neg += hard_neg ? Count(1) : Count(0);
    }
  }
  return {min_pos, max_neg, log1p_shifted(pos_max, sum_pos), log1p_shifted(neg_max, sum_neg), n_pos, n_neg};
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

// The loops below read the weights and hyper-parameters from local copies: through a reference they
// might alias s (same type), which stops the vectoriser.
template <typename T>
MS_FUSED_INLINE void weight_row_impl(T* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                                     const PairWeights<T>& weights, const Hyper<T>& hp) {
  const PairWeights<T> w = weights;
  if (!(w.pos_shift == w.pos_shift && w.neg_shift == w.neg_shift)) return fill_nan(s, m);  // A or B NaN
  const T alpha = hp.alpha, beta = hp.beta, eps = hp.epsilon;
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    const bool same = yr[j] == yq;
    const bool pos = same & (static_cast<int32_t>(j) != ref_self_index);
    s[j] = pair_weight(s[j], same, pos, w.pos_limit, w.neg_limit, w.pos_shift, w.neg_shift, w.pos_coef,
                       w.neg_coef, alpha, beta, eps);
  }
}

template <typename T>
MS_FUSED_INLINE void symmetric_weight_row_impl(T* s, const int32_t* y, int64_t n, int32_t i,
                                               const PairWeights<T>& weights, const ColumnWeights<T>& c,
                                               const Hyper<T>& hp) {
  const PairWeights<T> w = weights;
  if (!(w.pos_shift == w.pos_shift && w.neg_shift == w.neg_shift)) return fill_nan(s, n);
  const int32_t yi = y[i];
  const T alpha = hp.alpha, beta = hp.beta, eps = hp.epsilon;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T v = s[j];
    const bool same = y[j] == yi;
    const bool pos = same & (static_cast<int32_t>(j) != i);  // (i, j) and (j, i) are positives together
    const T g_ij = pair_weight(v, same, pos, w.pos_limit, w.neg_limit, w.pos_shift, w.neg_shift, w.pos_coef,
                               w.neg_coef, alpha, beta, eps);
    const T g_ji = pair_weight(v, same, pos, c.pos_limit[j], c.neg_limit[j], c.pos_shift[j], c.neg_shift[j],
                               c.pos_coef[j], c.neg_coef[j], alpha, beta, eps);
    s[j] = g_ij + g_ji + c.nan_if_bad[j];
  }
}

// One copy of the entry points per variant, compiled for its instruction set (the always-inline passes
// above are vectorised for it where they are inlined).
#define MS_FUSED_VARIANT(name, target)                                                                               \
  namespace name {                                                                                                   \
  template <typename T>                                                                                              \
  target RowStats<T> forward_row(const T* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,       \
                                 const Hyper<T>& hp) {                                                               \
    return forward_row_impl(s, yr, m, yq, ref_self_index, hp);                                                       \
  }                                                                                                                  \
  template <typename T>                                                                                              \
  target void weight_row(T* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,                     \
                         const PairWeights<T>& w, const Hyper<T>& hp) {                                              \
    weight_row_impl(s, yr, m, yq, ref_self_index, w, hp);                                                            \
  }                                                                                                                  \
  template <typename T>                                                                                              \
  target void symmetric_weight_row(T* s, const int32_t* y, int64_t n, int32_t i, const PairWeights<T>& row,          \
                                   const ColumnWeights<T>& cols, const Hyper<T>& hp) {                               \
    symmetric_weight_row_impl(s, y, n, i, row, cols, hp);                                                            \
  }                                                                                                                  \
  }

MS_FUSED_VARIANT(baseline, )
#ifdef MS_FUSED_X86_VARIANTS
MS_FUSED_VARIANT(avx2, __attribute__((target("arch=x86-64-v3"))))
MS_FUSED_VARIANT(avx512, __attribute__((target("arch=x86-64-v4"))))
#else
namespace avx2 = baseline;
namespace avx512 = baseline;
#endif

enum class Isa { kDefault, kAvx2, kAvx512 };
constexpr const char* kIsaNames[] = {"default", "avx2", "avx512"};  // as ATEN_CPU_CAPABILITY spells them

Isa best_supported() {
#ifdef MS_FUSED_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

// The best variant the CPU runs, or a narrower one named by ATEN_CPU_CAPABILITY (PyTorch's variable, read
// once as PyTorch does; a wider one than the CPU runs, or a name without a variant here, is ignored).
Isa choose_isa() {
  const Isa best = best_supported();
  if (const char* wanted = std::getenv("ATEN_CPU_CAPABILITY")) {
    for (int k = 0; k <= static_cast<int>(best); ++k) {
      if (std::strcmp(wanted, kIsaNames[k]) == 0) return static_cast<Isa>(k);
    }
  }
  return best;
}

Isa active_isa() {
  static const Isa isa = choose_isa();
  return isa;
}

#define MS_FUSED_DISPATCH(fn, ...)                          \
  switch (active_isa()) {                                   \
    case Isa::kAvx512: return avx512::fn(__VA_ARGS__);      \
    case Isa::kAvx2: return avx2::fn(__VA_ARGS__);          \
    default: return baseline::fn(__VA_ARGS__);              \
  }

}  // namespace

const char* cpu_capability() { return kIsaNames[static_cast<int>(active_isa())]; }

RowStats<float> forward_row(const float* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                            const Hyper<float>& hp) {
  MS_FUSED_DISPATCH(forward_row, s, yr, m, yq, ref_self_index, hp)
}

RowStats<double> forward_row(const double* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                             const Hyper<double>& hp) {
  MS_FUSED_DISPATCH(forward_row, s, yr, m, yq, ref_self_index, hp)
}

void weight_row(float* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                const PairWeights<float>& w, const Hyper<float>& hp) {
  MS_FUSED_DISPATCH(weight_row, s, yr, m, yq, ref_self_index, w, hp)
}

void weight_row(double* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                const PairWeights<double>& w, const Hyper<double>& hp) {
  MS_FUSED_DISPATCH(weight_row, s, yr, m, yq, ref_self_index, w, hp)
}

void symmetric_weight_row(float* s, const int32_t* y, int64_t n, int32_t i, const PairWeights<float>& row,
                          const ColumnWeights<float>& cols, const Hyper<float>& hp) {
  MS_FUSED_DISPATCH(symmetric_weight_row, s, y, n, i, row, cols, hp)
}

void symmetric_weight_row(double* s, const int32_t* y, int64_t n, int32_t i, const PairWeights<double>& row,
                          const ColumnWeights<double>& cols, const Hyper<double>& hp) {
  MS_FUSED_DISPATCH(symmetric_weight_row, s, y, n, i, row, cols, hp)
}

}  // namespace ms_fused::cpu
