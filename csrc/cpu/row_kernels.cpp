// The per-row passes (see row_kernels.h). Every loop is a `#pragma omp simd` loop of selects, so the
// compiler vectorises it, but for the min/max scan, in explicit vectors (vec.h); the entry points are
// compiled once per ISA variant (isa_variants.h), and the variant to run is chosen once, at the first call.
#include "row_kernels.h"

#include <algorithm>
#include <cmath>

#include "simd_math.h"
#include "vec.h"

namespace ms_fused::cpu {
namespace {

using namespace simd;

// min_pos, max_neg and the non-finite flag of a row (see forward_row_impl), in vectors of `Bytes`
template <int Bytes, typename T>
MS_FUSED_INLINE void scan_row(const T* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                              T& min_pos, T& max_neg, T& nonfinite) {
  using W = Vec<T, Bytes>;
  using V = typename W::type;
  using Mask = typename W::mask;
  constexpr T inf = std::numeric_limits<T>::infinity();
  constexpr int L = W::lanes;
  const V pos_inf = V{} + inf, neg_inf = V{} - inf;
  V lo = pos_inf, hi = neg_inf, bad = V{};
  Mask index = lane_index<T, Bytes>();
  int64_t j = 0;
  for (; j + L <= m; j += L, index += L) {
    const V v = load<V>(s + j);
    const Mask same = same_label<T, Bytes>(yr + j, yq);
    const Mask pos = same & (index != ref_self_index);
    const V as_pos = pos ? v : pos_inf;
    const V as_neg = same ? neg_inf : v;
    lo = as_pos < lo ? as_pos : lo;
    hi = as_neg > hi ? as_neg : hi;
    bad += v - v;  // NaN as soon as one v is NaN or +-Inf
  }
  min_pos = min_of<T, Bytes>(lo, inf), max_neg = max_of<T, Bytes>(hi, -inf), nonfinite = sum_of<T, Bytes>(bad, 0);
  for (; j < m; ++j) {
    const T v = s[j];
    const bool same = yr[j] == yq;
    const bool pos = same & (static_cast<int32_t>(j) != ref_self_index);
    const T as_pos = pos ? v : inf;
    const T as_neg = same ? -inf : v;
    min_pos = as_pos < min_pos ? as_pos : min_pos;
    max_neg = as_neg > max_neg ? as_neg : max_neg;
    nonfinite += v - v;
  }
}

template <int Bytes, typename T>
MS_FUSED_INLINE RowStats<T> forward_row_impl(const T* s, const int32_t* yr, int64_t m, int32_t yq,
                                             int32_t ref_self_index, const Hyper<T>& hp) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  constexpr T nan = std::numeric_limits<T>::quiet_NaN();
  T min_pos, max_neg, nonfinite;
  scan_row<Bytes>(s, yr, m, yq, ref_self_index, min_pos, max_neg, nonfinite);
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
  using Count = simd::Count<T>;
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

// One copy of the entry points per variant, compiled for its instruction set (the always-inline passes
// above are vectorised for it where they are inlined).
#define MS_FUSED_VARIANT(name, target, bytes)                                                                            \
  namespace name {                                                                                                   \
  template <typename T>                                                                                              \
  target RowStats<T> forward_row(const T* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,       \
                                 const Hyper<T>& hp) {                                                               \
    return forward_row_impl<bytes>(s, yr, m, yq, ref_self_index, hp);                                                  \
  }                                                                                                                  \
  template <typename T>                                                                                              \
  target void weight_row(T* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,                     \
                         const PairWeights<T>& w, const Hyper<T>& hp) {                                              \
    weight_row_impl(s, yr, m, yq, ref_self_index, w, hp);                                                            \
  }                                                                                                                  \
  }

MS_FUSED_ALL_VARIANTS(MS_FUSED_VARIANT)

}  // namespace

const char* cpu_capability() { return simd::kIsaNames[static_cast<int>(simd::active_isa())]; }

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

}  // namespace ms_fused::cpu
