// The per-row passes of the pair-weighting losses (see pair_rows.h). One generic forward pass finds, for
// the row's positives P and negatives N, the log-sum-exps of the loss's logits over each set, the sum of the
// positive logits and the pair counts; a loss (one struct below) turns them into its per-anchor loss and
// statistics, and gives the weight of each pair for the backward. The loops are `#pragma omp simd` loops of
// selects, but for the scan of maxima, in explicit vectors (vec.h); the entry points are compiled once per ISA
// variant (isa_variants.h).
#include "pair_rows.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "simd_math.h"
#include "vec.h"

namespace ms_fused::cpu {
namespace {

using namespace simd;

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// max(x, 0) for a scalar or a vector of `Vec` (the logits below are written once for both)
template <typename V>
MS_FUSED_INLINE V relu(V x) {
  return x > V{} ? x : V{};
}

template <typename T>
T log_add_exp(T a, T b) {  // log(e^a + e^b); -inf when both are, NaN when either is
  if (a != a || b != b) return a + b;
  const T hi = std::max(a, b);
  if (hi == -kInf<T>) return hi;
  return hi + std::log(std::exp(a - hi) + std::exp(b - hi));
}

template <typename T>
T softplus(T x) {  // log(1 + e^x), exact for every x
  return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
}

template <typename T>
T sigmoid(T x) {
  return x >= 0 ? T(1) / (T(1) + std::exp(-x)) : std::exp(x) / (T(1) + std::exp(x));
}

// What the generic forward pass gives a loss: LSE over P and over N of its logits (-inf for an empty set,
// NaN when a logit of the set is NaN), the sum of the positive logits, |P| and |N|
template <typename T>
struct SetSums {
  T lse_pos, lse_neg, sum_pos;
  int64_t n_pos, n_neg;
};

// The logits of SupCon and NT-Xent: z = S/t, positives and negatives alike
template <typename T>
struct Tempered {
  T inv_t;
  template <typename V>
  MS_FUSED_INLINE V pos_logit(V s) const { return s * inv_t; }
  template <typename V>
  MS_FUSED_INLINE V neg_logit(V s) const { return s * inv_t; }
};

// SupCon: L_i = LSE over P u N, l_i = L_i - mean_P z (P non-empty); stats L_i, |P_i|
template <typename T>
struct SupCon : Tempered<T> {
  using Tempered<T>::inv_t;
  PairRow<T> finish(const SetSums<T>& r, const T*, const int32_t*, int64_t, int32_t, int32_t) const {
    const T total = log_add_exp(r.lse_pos, r.lse_neg);
    const T loss = r.n_pos > 0 ? total - r.sum_pos / T(r.n_pos) : T(0);
    return {loss, total, T(r.n_pos), r.n_pos, r.n_neg};
  }
  // g d l / d S_ij = g (e^{z_ij - L_i} [j in P u N] - [j in P] / |P_i|) / t
  struct Weights {
    T inv_t, total, coef, mean_share;
    bool none;
    MS_FUSED_INLINE T operator()(T s, bool pos, bool neg) const {
      const T e = vec_exp((pos | neg) ? s * inv_t - total : -kInf<T>);
      return none ? T(0) : coef * (e - (pos ? mean_share : T(0)));
    }
  };
  Weights weights(T stat0, T stat1, T g) const {
    return {inv_t, stat0, g * inv_t, T(1) / std::max(stat1, T(1)), stat1 == 0};
  }
};

// NT-Xent: L_i = LSE over N; per positive pair l_ip = softplus(L_i - z_ip); the anchor's loss is their sum;
// stats L_i, W_i = sum_p sigmoid(L_i - z_ip)
template <typename T>
struct NTXent : Tempered<T> {
  using Tempered<T>::inv_t;
  PairRow<T> finish(const SetSums<T>& r, const T* s, const int32_t* yr, int64_t m, int32_t yq,
                    int32_t ref_self_index) const {
    const T negatives = r.lse_neg;
    T loss = 0, weight = 0;
    for (int64_t j = 0; j < m; ++j) {  // the few positives, one by one
      if (yr[j] != yq || j == ref_self_index) continue;
      const T gap = negatives - s[j] * inv_t;
      loss += softplus(gap);
      weight += sigmoid(gap);
    }
    return {loss, negatives, weight, r.n_pos, r.n_neg};
  }
  // g d l / d S_ip = -g sigmoid(L_i - z_ip) / t,  g d l / d S_in = g W_i e^{z_in - L_i} / t
  struct Weights {
    T inv_t, negatives, pos_coef, neg_coef;
    bool no_negatives;
    MS_FUSED_INLINE T operator()(T s, bool pos, bool neg) const {
      const T e = vec_exp((pos | neg) ? s * inv_t - negatives : -kInf<T>);  // e^{z - L}; sigmoid(L - z) = 1 / (1 + e)
      const T w_pos = no_negatives ? T(0) : pos_coef / (T(1) + e);
      return pos ? w_pos : (neg ? neg_coef * e : T(0));
    }
  };
  Weights weights(T stat0, T stat1, T g) const {
    return {inv_t, stat0, -g * inv_t, g * stat1 * inv_t, stat0 == -kInf<T>};
  }
};

// Circle: a_p = relu(1 + m - S), z_p = -gamma a_p (S - 1 + m); a_n = relu(S + m), z_n = gamma a_n (S - m), the
// a's held constant. A_i = LSE over P, B_i = LSE over N, l_i = softplus(A_i + B_i) (torch's: its argument above
// 20) for an anchor with positives and negatives; stats A_i, B_i
template <typename T>
struct Circle {
  T m, gamma;
  static constexpr T kThreshold = 20;
  template <typename V>
  MS_FUSED_INLINE V pos_logit(V s) const { return -gamma * relu(T(1) + m - s) * (s - (T(1) - m)); }
  template <typename V>
  MS_FUSED_INLINE V neg_logit(V s) const { return gamma * relu(s + m) * (s - m); }
  PairRow<T> finish(const SetSums<T>& r, const T*, const int32_t*, int64_t, int32_t, int32_t) const {
    const bool has = r.n_pos > 0 && r.n_neg > 0;
    const T x = r.lse_pos + r.lse_neg;
    const T loss = has ? (x > kThreshold ? x : std::log1p(std::exp(x))) : T(0);
    return {loss, r.lse_pos, r.lse_neg, r.n_pos, r.n_neg};
  }
  // with slope = softplus'(A_i + B_i): g d l / d S_ip = -g slope e^{z_ip - A_i} gamma a_ip,
  // g d l / d S_in = g slope e^{z_in - B_i} gamma a_in
  struct Weights {
    T m, gamma, lse_pos, lse_neg, coef;
    MS_FUSED_INLINE T operator()(T s, bool pos, bool neg) const {
      const T a_pos = std::max(T(1) + m - s, T(0)) * gamma, a_neg = std::max(s + m, T(0)) * gamma;
      const T z = pos ? -a_pos * (s - (T(1) - m)) - lse_pos : a_neg * (s - m) - lse_neg;
      const T e = vec_exp((pos | neg) ? z : -kInf<T>);
      return pos ? -coef * e * a_pos : (neg ? coef * e * a_neg : T(0));
    }
  };
  Weights weights(T stat0, T stat1, T g) const {
    const bool has = !(stat0 == -kInf<T>) && !(stat1 == -kInf<T>);  // NaN counts as having: it propagates
    const T x = stat0 + stat1;
    const T slope = !has ? T(0) : (x > kThreshold ? T(1) : sigmoid(x));
    return {m, gamma, stat0, stat1, g * slope};
  }
};

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

// `call` with `loss` the loss that `p` names (a switch written out in each variant: a lambda there would not be
// compiled for the variant's instruction set)
#define MS_FUSED_WITH_LOSS(p, call)                                           \
  switch (p.loss) {                                                          \
    case PairLoss::kSupCon: { const SupCon<T> loss{T(1) / p.p0}; call; }     \
    case PairLoss::kNTXent: { const NTXent<T> loss{T(1) / p.p0}; call; }     \
    default: { const Circle<T> loss{p.p0, p.p1}; call; }                    \
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
