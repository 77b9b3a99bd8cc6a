// The per-row passes (see row_kernels.h). Every loop is a `#pragma omp simd` loop of selects, so the
// compiler vectorises it; the entry points are compiled once per ISA variant (isa_variants.h), and the
// variant to run is chosen once, at the first call (see row_kernels.h).
#include "row_kernels.h"

#include <algorithm>
#include <cmath>

#include "simd_math.h"

namespace ms_fused::cpu {
namespace {

using namespace simd;

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
    return forward_row_impl(s, yr, m, yq, ref_self_index, hp);                                                       \
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
