// The per-row passes of the pair-weighting losses (see pair_rows.h). One generic forward pass finds, for
// the row's positives P and negatives N, the log-sum-exps of the loss's logits over each set, the sum of the
// positive logits and the pair counts; a loss (one struct of pair_losses.h) turns them into its per-anchor loss and
// statistics, and gives the weight of each pair for the backward. The loops are `#pragma omp simd` loops of
// selects, but for the scan of maxima, in explicit vectors (vec.h); the entry points are compiled once per ISA
// variant (isa_variants.h).
#include "pair_rows.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "pair_losses.h"
#include "simd_math.h"
#include "vec.h"

namespace ms_fused::cpu {
namespace {

using namespace simd;

using namespace pair_losses;

// The maxima of the positive and of the negative logits, the positive logits' sum and |P|, |N| of a row, in
// vectors of `Bytes` (clang leaves a max reduction under `#pragma omp simd` scalar)
template <int Bytes, typename T, typename Loss>
MS_FUSED_INLINE void scan_sets(const T* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                               const Loss& loss, T& max_pos, T& max_neg, T& sum_pos, int64_t& n_pos,
                               int64_t& n_neg) {
  using W = Vec<T, Bytes>;
  using V = typename W::type;
  using Mask = typename W::mask;
  constexpr int L = W::lanes;
  const V none = V{} - kInf<T>;
  V hi_pos = none, hi_neg = none, sum = V{};
  Mask count_pos{}, count_neg{}, index = lane_index<T, Bytes>();
  int64_t j = 0;
  for (; j + L <= m; j += L, index += L) {
    const V v = load<V>(s + j);
    const Mask same = same_label<T, Bytes>(yr + j, yq);
    const Mask pos = same & (index != ref_self_index), neg = ~same;
    const V zp = loss.pos_logit(v), zn = loss.neg_logit(v);
    const V cand_pos = pos ? zp : none, cand_neg = neg ? zn : none;
    hi_pos = cand_pos > hi_pos ? cand_pos : hi_pos;
    hi_neg = cand_neg > hi_neg ? cand_neg : hi_neg;
    sum += pos ? zp : V{};
    count_pos -= pos;  // a true lane is -1
    count_neg -= neg;
  }
  max_pos = max_of<T, Bytes>(hi_pos, -kInf<T>), max_neg = max_of<T, Bytes>(hi_neg, -kInf<T>);
  sum_pos = sum_of<T, Bytes>(sum, T(0));
  n_pos = n_neg = 0;
  for (int l = 0; l < L; ++l) n_pos += count_pos[l], n_neg += count_neg[l];
  for (; j < m; ++j) {
    const bool same = yr[j] == yq;
    const bool pos = same & (static_cast<int32_t>(j) != ref_self_index), neg = !same;
    const T zp = loss.pos_logit(s[j]), zn = loss.neg_logit(s[j]);
    const T cand_pos = pos ? zp : -kInf<T>, cand_neg = neg ? zn : -kInf<T>;
    max_pos = cand_pos > max_pos ? cand_pos : max_pos;
    max_neg = cand_neg > max_neg ? cand_neg : max_neg;
    sum_pos += pos ? zp : T(0);
    n_pos += pos, n_neg += neg;
  }
}

template <int Bytes, typename T, typename Loss>
MS_FUSED_INLINE PairRow<T> forward_impl(const T* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                                        const Loss& loss) {
  T max_pos, max_neg, sum_pos;
  int64_t n_pos, n_neg;
  scan_sets<Bytes>(s, yr, m, yq, ref_self_index, loss, max_pos, max_neg, sum_pos, n_pos, n_neg);
  // a NaN logit never wins a max, but e^{NaN - max} makes its set's sum NaN
  T sum_exp_pos = 0, sum_exp_neg = 0;
#pragma omp simd reduction(+ : sum_exp_pos, sum_exp_neg)
  for (int64_t j = 0; j < m; ++j) {
    const bool same = yr[j] == yq;
    const bool pos = same & (static_cast<int32_t>(j) != ref_self_index), neg = !same;
    sum_exp_pos += vec_exp(pos ? loss.pos_logit(s[j]) - max_pos : -kInf<T>);
    sum_exp_neg += vec_exp(neg ? loss.neg_logit(s[j]) - max_neg : -kInf<T>);
  }
  const T lse_pos = n_pos > 0 ? max_pos + std::log(sum_exp_pos) : -kInf<T>;
  const T lse_neg = n_neg > 0 ? max_neg + std::log(sum_exp_neg) : -kInf<T>;
  return loss.finish({lse_pos, lse_neg, sum_pos, n_pos, n_neg}, s, yr, m, yq, ref_self_index);
}

template <typename T, typename Loss>
MS_FUSED_INLINE void weight_impl(T* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index, T stat0,
                                 T stat1, T g, const Loss& loss) {
  const typename Loss::Weights w = loss.weights(stat0, stat1, g);  // a local copy: through a reference it might alias s
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) {
    const bool same = yr[j] == yq;
    const bool pos = same & (static_cast<int32_t>(j) != ref_self_index);
    s[j] = w(s[j], pos, !same);
  }
}

#define MS_FUSED_PAIR_VARIANT(name, target, bytes)                                                                  \
  namespace name {                                                                                                \
  template <typename T>                                                                                           \
  target PairRow<T> pair_forward_row(const T* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index, \
                                     const PairParams<T>& p) {                                                   \
    MS_FUSED_WITH_LOSS(p, return forward_impl<bytes>(s, yr, m, yq, ref_self_index, loss))                                \
  }                                                                                                               \
  template <typename T>                                                                                           \
  target void pair_weight_row(T* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index, T stat0,    \
                              T stat1, T g, const PairParams<T>& p) {                                             \
    MS_FUSED_WITH_LOSS(p, return weight_impl(s, yr, m, yq, ref_self_index, stat0, stat1, g, loss))               \
  }                                                                                                               \
  }

MS_FUSED_ALL_VARIANTS(MS_FUSED_PAIR_VARIANT)

}  // namespace

PairRow<float> pair_forward_row(const float* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                                const PairParams<float>& p) {
  MS_FUSED_DISPATCH(pair_forward_row, s, yr, m, yq, ref_self_index, p)
}

PairRow<double> pair_forward_row(const double* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                                 const PairParams<double>& p) {
  MS_FUSED_DISPATCH(pair_forward_row, s, yr, m, yq, ref_self_index, p)
}

void pair_weight_row(float* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index, float stat0,
                     float stat1, float g, const PairParams<float>& p) {
  MS_FUSED_DISPATCH(pair_weight_row, s, yr, m, yq, ref_self_index, stat0, stat1, g, p)
}

void pair_weight_row(double* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index, double stat0,
                     double stat1, double g, const PairParams<double>& p) {
  MS_FUSED_DISPATCH(pair_weight_row, s, yr, m, yq, ref_self_index, stat0, stat1, g, p)
}

}  // namespace ms_fused::cpu
