// The pair-weighting losses (docs/semantics.md "Pair-weighting losses"), one struct each: its logits of a
// positive and of a negative pair, its per-anchor loss and statistics from the log-sum-exps over its positives
// and negatives (finish), and the weight g d l / d S of each pair (Weights for the row passes of pair_rows.cpp,
// anchor_weights and pair_weight for the triangle passes of pair_upper.cpp). Included by the files compiled
// once per ISA variant: everything here is inline, and takes the variant's instruction set where it is inlined.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "pair_rows.h"
#include "simd_math.h"

namespace ms_fused::cpu::pair_losses {

using simd::vec_exp;

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();

// max(x, 0) for a scalar or a vector of `Vec` (the logits below are written once for both)
template <typename V>
MS_FUSED_INLINE V relu(V x) {
  return x > V{} ? x : V{};
}

template <typename T>
inline T log_add_exp(T a, T b) {  // log(e^a + e^b); -inf when both are, NaN when either is
  if (a != a || b != b) return a + b;
  const T hi = std::max(a, b);
  if (hi == -kInf<T>) return hi;
  return hi + std::log(std::exp(a - hi) + std::exp(b - hi));
}

template <typename T>
inline T softplus(T x) {  // log(1 + e^x), exact for every x
  return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
}

template <typename T>
inline T sigmoid(T x) {
  return x >= 0 ? T(1) / (T(1) + std::exp(-x)) : std::exp(x) / (T(1) + std::exp(x));
}

// What the generic forward pass gives a loss: LSE over P and over N of its logits (-inf for an empty set,
// NaN when a logit of the set is NaN), the sum of the positive logits, |P| and |N|
template <typename T>
struct SetSums {
  T lse_pos, lse_neg, sum_pos;
  int64_t n_pos, n_neg;
};

// What the triangle passes of self mode (pair_upper.h) take per anchor and kind of pair: with z the pair's
// logit, g_i d l_i / d S_ij = a loss's pair_weight of e^{z - shift} times coef, and for SupCon's positives
// less `extra`. A loss's pair_weight gives G_ij + G_ji from both anchors' terms (e_row, c_row, x_row: anchor i's;
// e_col, c_col, x_col: anchor j's); kShareable<Pos>: it is linear in e, so both anchors can share one exp.
template <typename T>
struct KindWeights {
  T shift, coef, extra;
};

template <typename T>
struct AnchorWeights {
  KindWeights<T> pos, neg;
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
  // the same weights as the triangle passes take them: both kinds e^{z - L_i} g/t, positives less g/(t |P_i|)
  AnchorWeights<T> anchor_weights(T stat0, T stat1, T g) const {
    const bool none = stat1 == 0;
    const T shift = none ? T(0) : stat0, coef = none ? T(0) : g * inv_t;
    return {{shift, coef, none ? T(0) : coef / stat1}, {shift, coef, T(0)}};
  }
  template <bool Pos>
  static constexpr bool kShareable = true;
  template <bool Pos>
  MS_FUSED_INLINE T pair_weight(T, T e_row, T e_col, T c_row, T c_col, T x_row, T x_col) const {
    return Pos ? e_row * c_row + e_col * c_col - (x_row + x_col) : e_row * c_row + e_col * c_col;
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
  // positives: c sigmoid(L_i - z) = c / (1 + e^{z - L_i}), not linear in the exp: no shared exp
  AnchorWeights<T> anchor_weights(T stat0, T stat1, T g) const {
    const bool no_negatives = stat0 == -kInf<T>;
    const T shift = no_negatives ? T(0) : stat0;
    return {{shift, no_negatives ? T(0) : -g * inv_t, T(0)}, {shift, no_negatives ? T(0) : g * stat1 * inv_t, T(0)}};
  }
  template <bool Pos>
  static constexpr bool kShareable = !Pos;
  template <bool Pos>
  MS_FUSED_INLINE T pair_weight(T, T e_row, T e_col, T c_row, T c_col, T, T) const {
    return Pos ? c_row / (T(1) + e_row) + c_col / (T(1) + e_col) : e_row * c_row + e_col * c_col;
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
  AnchorWeights<T> anchor_weights(T stat0, T stat1, T g) const {
    const Weights w = weights(stat0, stat1, g);
    return {{stat0 == -kInf<T> ? T(0) : stat0, w.coef, T(0)}, {stat1 == -kInf<T> ? T(0) : stat1, w.coef, T(0)}};
  }
  template <bool Pos>
  static constexpr bool kShareable = true;
  template <bool Pos>
  MS_FUSED_INLINE T pair_weight(T s, T e_row, T e_col, T c_row, T c_col, T, T) const {
    const T sum = e_row * c_row + e_col * c_col;
    return Pos ? -gamma * relu(T(1) + m - s) * sum : gamma * relu(s + m) * sum;
  }
};


// `call` with `loss` the loss that `p` names, for the variant's T (a switch written out in each variant: a lambda
// there would not be compiled for the variant's instruction set)
#define MS_FUSED_WITH_LOSS(p, call)                                                       \
  switch (p.loss) {                                                                      \
    case PairLoss::kSupCon: { const pair_losses::SupCon<T> loss{T(1) / p.p0}; call; }     \
    case PairLoss::kNTXent: { const pair_losses::NTXent<T> loss{T(1) / p.p0}; call; }     \
    default: { const pair_losses::Circle<T> loss{p.p0, p.p1}; call; }                    \
  }

}  // namespace ms_fused::cpu::pair_losses
