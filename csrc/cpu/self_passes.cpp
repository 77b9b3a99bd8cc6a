// The passes of self_passes.h: `#pragma omp simd` loops of selects (the min/max scans in explicit vectors,
// vec.h), compiled once per ISA variant.
#include "self_passes.h"

#include <algorithm>
#include <limits>

#include "simd_math.h"
#include "vec.h"

namespace ms_fused::cpu {
namespace {

using namespace simd;

// The row's extreme over one kind of pair, and each column's: negatives (Negatives: other label) raise
// row and col_ext[k] to their largest s, positives (same label) lower them to their smallest; `bad` and
// col_bad[k] become NaN as soon as one s is NaN or +-Inf. In vectors of `Bytes`, the rest one by one.
template <bool Negatives, int Bytes, typename T>
MS_FUSED_INLINE UpperScan<T> scan_extremes(const T* s, const int32_t* y, int64_t len, int32_t yi, T* col_ext,
                                           T* col_bad) {
  using W = Vec<T, Bytes>;
  using V = typename W::type;
  constexpr T none = Negatives ? -std::numeric_limits<T>::infinity() : std::numeric_limits<T>::infinity();
  const V none_v = V{} + none;
  V row = none_v, bad = V{};
  int64_t k = 0;
  for (; k + W::lanes <= len; k += W::lanes) {
    const V v = load<V>(s + k);
    const typename W::mask same = same_label<T, Bytes>(y + k, yi);
    const V kind = Negatives ? (same ? none_v : v) : (same ? v : none_v);
    const V col = load<V>(col_ext + k);
    if constexpr (Negatives) {
      row = kind > row ? kind : row;
      store(col_ext + k, kind > col ? kind : col);
    } else {
      row = kind < row ? kind : row;
      store(col_ext + k, kind < col ? kind : col);
    }
    bad += v - v;
    store(col_bad + k, load<V>(col_bad + k) + (v - v));
  }
  T row_ext = Negatives ? max_of<T, Bytes>(row, none) : min_of<T, Bytes>(row, none);
  T row_bad = sum_of<T, Bytes>(bad, 0);
  for (; k < len; ++k) {
    const T v = s[k];
    const bool kind = Negatives ? y[k] != yi : y[k] == yi;
    const T as_kind = kind ? v : none;
    if constexpr (Negatives) {
      row_ext = as_kind > row_ext ? as_kind : row_ext;
      col_ext[k] = as_kind > col_ext[k] ? as_kind : col_ext[k];
    } else {
      row_ext = as_kind < row_ext ? as_kind : row_ext;
      col_ext[k] = as_kind < col_ext[k] ? as_kind : col_ext[k];
    }
    row_bad += v - v;
    col_bad[k] += v - v;
  }
  return {row_ext, row_bad};
}

// Positives: z = -alpha s, mined iff s - eps < limit
template <typename T>
MS_FUSED_INLINE UpperSums<T> sum_positives_impl(const T* s, const int32_t* y, int64_t len, int32_t yi, T limit, T offset,
                                            const T* col_limit, const T* col_offset, T* col_sum, PairCount<T>* col_count,
                                            const Hyper<T>& hp) {
  const T slope = -hp.alpha, eps = hp.epsilon;
  T sum = 0;
  PairCount<T> count = 0;
#pragma omp simd reduction(+ : sum, count)
  for (int64_t k = 0; k < len; ++k) {
    const T v = s[k];
    const bool same = y[k] == yi;
    const bool row_mined = same & (v - eps < limit);
    const bool col_mined = same & (v - eps < col_limit[k]);
    const T row_e = vec_exp(slope * v + offset);
    const T col_e = vec_exp(slope * v + col_offset[k]);
    sum += row_mined ? row_e : T(0);
    count += row_mined ? PairCount<T>(1) : PairCount<T>(0);
    col_sum[k] += col_mined ? col_e : T(0);
    col_count[k] += col_mined ? PairCount<T>(1) : PairCount<T>(0);
  }
  return {sum, static_cast<int64_t>(count)};
}

// Elements of a row that scan_sum_negatives takes at a time: scanned, then summed while they are in the L1 cache
constexpr int64_t kScanBlock = 512;

// scan_negatives and the mined negatives' sums in one sweep (Shared: one exp per pair, `factor` and
// col_scale[k] the anchors' factors; else `offset` and col_scale[k] their offsets)
template <bool Shared, int Bytes, typename T>
MS_FUSED_INLINE UpperScanSums<T> scan_sum_negatives_impl(const T* s, const int32_t* y, int64_t len, int32_t yi,
                                                         T limit, T offset, T factor, const T* col_limit,
                                                         const T* col_scale, T* col_max, T* col_bad, T* col_sum,
                                                         PairCount<T>* col_count, const Hyper<T>& hp) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  const T beta = hp.beta, eps = hp.epsilon;
  T row_max = -inf, bad = 0, sum = 0;
  PairCount<T> count = 0;
  for (int64_t k0 = 0; k0 < len; k0 += kScanBlock) {
    const int64_t end = std::min(len, k0 + kScanBlock);
    const UpperScan<T> scan = scan_extremes<true, Bytes>(s + k0, y + k0, end - k0, yi, col_max + k0, col_bad + k0);
    row_max = scan.extreme > row_max ? scan.extreme : row_max;
    bad += scan.bad;
#pragma omp simd reduction(+ : sum, count)
    for (int64_t k = k0; k < end; ++k) {
      const T v = s[k];
      const bool other = y[k] != yi;
      const bool row_mined = other & (v + eps > limit);
      const bool col_mined = other & (v + eps > col_limit[k]);
      const T row_e = vec_exp(beta * v + offset);
      const T col_e = Shared ? row_e * col_scale[k] : vec_exp(beta * v + col_scale[k]);
      sum += row_mined ? row_e : T(0);
      count += row_mined ? PairCount<T>(1) : PairCount<T>(0);
      col_sum[k] += col_mined ? col_e : T(0);
      col_count[k] += col_mined ? PairCount<T>(1) : PairCount<T>(0);
    }
  }
  return {row_max, bad, Shared ? sum * factor : sum, static_cast<int64_t>(count)};
}

template <typename T>
MS_FUSED_INLINE void upper_negative_weights_shared_impl(T* s, const int32_t* y, int64_t len, int32_t yi, T limit,
                                                        T coef, T offset, const T* col_limit, const T* col_coef,
                                                        const Hyper<T>& hp) {
  const T beta = hp.beta, eps = hp.epsilon;
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const T v = s[k];
    const bool other = y[k] != yi;
    const T e = vec_exp(beta * v + offset);
    const T row_coef = (other & (v + eps > limit)) ? coef : T(0);
    const T col_k = col_coef[k];  // loaded whatever the select: a load under a condition needs masked loads
    const T col = (other & (v + eps > col_limit[k])) ? col_k : T(0);
    const T w = (row_coef + col) * e;
    s[k] = (row_coef + col) != T(0) ? w : T(0);  // e of an unmined pair may be +Inf: never 0 * Inf
  }
}

template <typename T>
MS_FUSED_INLINE void segment_similarities_impl(const T* x, int64_t d, const int64_t* seg_end, int64_t first,
                                               int64_t count, T* s) {
  std::fill(s, s + count * count, T(0));
  for (int64_t i = first; i < first + count; ++i) {
    const T* xi = x + i * d;
    for (int64_t j = i + 1; j < seg_end[i]; ++j) {
      const T* xj = x + j * d;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < d; ++c) dot += xi[c] * xj[c];
      s[(i - first) * count + (j - first)] = dot;
    }
  }
}

template <typename T>
MS_FUSED_INLINE void scaled_exps_impl(const T* shift, const T* scale, int64_t len, T base, T sign, T* out) {
  constexpr T inf = std::numeric_limits<T>::infinity();
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const T e = vec_exp(sign * (shift[k] - base));
    out[k] = shift[k] > -inf ? (scale == nullptr ? e : scale[k] * e) : T(0);
  }
}

template <typename T>
MS_FUSED_INLINE void upper_weights_impl(T* s, const int32_t* y, int64_t len, int32_t yi, const PairWeights<T>& row,
                                        const ColumnWeights<T>& cols, const Hyper<T>& hp, bool positives) {
  const PairWeights<T> w = row;  // local copies: through a reference they might alias s
  const ColumnWeights<T> c = cols;
  const T alpha = hp.alpha, beta = hp.beta, eps = hp.epsilon;
  if (positives) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      const T v = s[k];
      const bool same = y[k] == yi;
      const T g_ij = (same & (v - eps < w.pos_limit)) ? w.pos_coef * vec_exp(-alpha * v + w.pos_shift) : T(0);
      const T coef_k = c.pos_coef[k], shift_k = c.pos_shift[k];  // unconditional loads (see above)
      const T g_ji = (same & (v - eps < c.pos_limit[k])) ? coef_k * vec_exp(-alpha * v + shift_k) : T(0);
      s[k] = g_ij + g_ji;
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      const T v = s[k];
      const bool other = y[k] != yi;
      const T g_ij = (other & (v + eps > w.neg_limit)) ? w.neg_coef * vec_exp(beta * v + w.neg_shift) : T(0);
      const T coef_k = c.neg_coef[k], shift_k = c.neg_shift[k];
      const T g_ji = (other & (v + eps > c.neg_limit[k])) ? coef_k * vec_exp(beta * v + shift_k) : T(0);
      s[k] = g_ij + g_ji;
    }
  }
}

#define MS_FUSED_VARIANT(name, target, bytes)                                                                        \
  namespace name {                                                                                               \
  template <typename T>                                                                                          \
  target UpperScan<T> scan_negatives(const T* s, const int32_t* y, int64_t len, int32_t yi, T* col_max,          \
                                     T* col_bad) {                                                               \
    return scan_extremes<true, bytes>(s, y, len, yi, col_max, col_bad);                                            \
  }                                                                                                              \
  template <typename T>                                                                                          \
  target UpperScan<T> scan_positives(const T* s, const int32_t* y, int64_t len, int32_t yi, T* col_min,          \
                                     T* col_bad) {                                                               \
    return scan_extremes<false, bytes>(s, y, len, yi, col_min, col_bad);                                            \
  }                                                                                                              \
  template <typename T>                                                                                          \
  target UpperSums<T> sum_positives(const T* s, const int32_t* y, int64_t len, int32_t yi, T limit, T offset,    \
                                    const T* col_limit, const T* col_offset, T* col_sum, PairCount<T>* col_count, \
                                    const Hyper<T>& hp) {                                                        \
    return sum_positives_impl(s, y, len, yi, limit, offset, col_limit, col_offset, col_sum, col_count, hp);      \
  }                                                                                                              \
  template <bool Shared, typename T>                                                                             \
  target UpperScanSums<T> scan_sum_negatives(const T* s, const int32_t* y, int64_t len, int32_t yi, T limit,     \
                                             T offset, T factor, const T* col_limit, const T* col_scale,         \
                                             T* col_max, T* col_bad, T* col_sum, PairCount<T>* col_count,        \
                                             const Hyper<T>& hp) {                                               \
    return scan_sum_negatives_impl<Shared, bytes>(s, y, len, yi, limit, offset, factor, col_limit, col_scale,    \
                                                  col_max, col_bad, col_sum, col_count, hp);                     \
  }                                                                                                              \
  template <typename T>                                                                                          \
  target void upper_negative_weights_shared(T* s, const int32_t* y, int64_t len, int32_t yi, T limit, T coef,    \
                                            T offset, const T* col_limit, const T* col_coef,                     \
                                            const Hyper<T>& hp) {                                                \
    upper_negative_weights_shared_impl(s, y, len, yi, limit, coef, offset, col_limit, col_coef, hp);             \
  }                                                                                                              \
  template <typename T>                                                                                          \
  target void segment_similarities(const T* x, int64_t d, const int64_t* seg_end, int64_t first, int64_t count,  \
                                   T* s) {                                                                       \
    segment_similarities_impl(x, d, seg_end, first, count, s);                                                   \
  }                                                                                                              \
  template <typename T>                                                                                          \
  target void scaled_exps(const T* shift, const T* scale, int64_t len, T base, T sign, T* out) {                 \
    scaled_exps_impl(shift, scale, len, base, sign, out);                                                        \
  }                                                                                                              \
  template <typename T>                                                                                          \
  target void upper_weights(T* s, const int32_t* y, int64_t len, int32_t yi, const PairWeights<T>& row,          \
                            const ColumnWeights<T>& cols, const Hyper<T>& hp, bool positives) {                  \
    upper_weights_impl(s, y, len, yi, row, cols, hp, positives);                                                 \
  }                                                                                                              \
  }

MS_FUSED_ALL_VARIANTS(MS_FUSED_VARIANT)

}  // namespace

#define MS_FUSED_SELF_ENTRY_POINTS(T)                                                                            \
  UpperScan<T> scan_negatives(const T* s, const int32_t* y, int64_t len, int32_t yi, T* col_max, T* col_bad) {   \
    MS_FUSED_DISPATCH(scan_negatives, s, y, len, yi, col_max, col_bad)                                           \
  }                                                                                                              \
  UpperScan<T> scan_positives(const T* s, const int32_t* y, int64_t len, int32_t yi, T* col_min, T* col_bad) {   \
    MS_FUSED_DISPATCH(scan_positives, s, y, len, yi, col_min, col_bad)                                           \
  }                                                                                                              \
  UpperScanSums<T> scan_sum_negatives(const T* s, const int32_t* y, int64_t len, int32_t yi, T limit, T offset,  \
                                      const T* col_limit, const T* col_offset, T* col_max, T* col_bad,           \
                                      T* col_sum, PairCount<T>* col_count, const Hyper<T>& hp) {                 \
    MS_FUSED_DISPATCH(scan_sum_negatives<false>, s, y, len, yi, limit, offset, T(1), col_limit, col_offset,      \
                      col_max, col_bad, col_sum, col_count, hp)                                                  \
  }                                                                                                              \
  UpperScanSums<T> scan_sum_negatives_shared(const T* s, const int32_t* y, int64_t len, int32_t yi, T limit,     \
                                             T offset, T factor, const T* col_limit, const T* col_factor,        \
                                             T* col_max, T* col_bad, T* col_sum, PairCount<T>* col_count,        \
                                             const Hyper<T>& hp) {                                               \
    MS_FUSED_DISPATCH(scan_sum_negatives<true>, s, y, len, yi, limit, offset, factor, col_limit, col_factor,     \
                      col_max, col_bad, col_sum, col_count, hp)                                                  \
  }                                                                                                              \
  void upper_negative_weights_shared(T* s, const int32_t* y, int64_t len, int32_t yi, T limit, T coef, T offset, \
                                     const T* col_limit, const T* col_coef, const Hyper<T>& hp) {                \
    MS_FUSED_DISPATCH(upper_negative_weights_shared, s, y, len, yi, limit, coef, offset, col_limit, col_coef, hp) \
  }                                                                                                              \
  void segment_similarities(const T* x, int64_t d, const int64_t* seg_end, int64_t first, int64_t count, T* s) { \
    MS_FUSED_DISPATCH(segment_similarities, x, d, seg_end, first, count, s)                                      \
  }                                                                                                              \
  void scaled_exps(const T* shift, const T* scale, int64_t len, T base, T sign, T* out) {                        \
    MS_FUSED_DISPATCH(scaled_exps, shift, scale, len, base, sign, out)                                           \
  }                                                                                                              \
  UpperSums<T> sum_positives(const T* s, const int32_t* y, int64_t len, int32_t yi, T limit, T offset,           \
                             const T* col_limit, const T* col_offset, T* col_sum, PairCount<T>* col_count,            \
                             const Hyper<T>& hp) {                                                               \
    MS_FUSED_DISPATCH(sum_positives, s, y, len, yi, limit, offset, col_limit, col_offset, col_sum, col_count, hp) \
  }                                                                                                              \
  void upper_weights(T* s, const int32_t* y, int64_t len, int32_t yi, const PairWeights<T>& row,                 \
                     const ColumnWeights<T>& cols, const Hyper<T>& hp, bool positives) {                         \
    MS_FUSED_DISPATCH(upper_weights, s, y, len, yi, row, cols, hp, positives)                                    \
  }

MS_FUSED_SELF_ENTRY_POINTS(float)
MS_FUSED_SELF_ENTRY_POINTS(double)

}  // namespace ms_fused::cpu
