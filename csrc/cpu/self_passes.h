// Passes over the upper triangle of the symmetric S in self mode (driven by self_mode.cpp).
//
// Each pass takes one anchor i's elements right of the diagonal, s[k] = S_i,i+1+k for k in [0, len), with
// y[k] the label id of row i+1+k, and serves both sides of every pair: anchor i (the returned row values)
// and anchor i+1+k (the column arrays col_*[k], accumulated in place). Negatives (other label) and
// positives (same label) are handled by separate passes, since they come from different products
// (self_mode.cpp: the sweep and the label band). Compiled per ISA variant like row_kernels.cpp.
#pragma once

#include <cstdint>
#include <type_traits>

#include "row_kernels.h"

namespace ms_fused::cpu {

// Per-column pair counters as wide as T, so that they share the vector lanes of the column sums
template <typename T>
using PairCount = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

template <typename T>
struct UpperScan {  // the row's extreme over one kind of pair (+-inf when none), NaN in `bad` if any s is not finite
  T extreme, bad;
};

template <typename T>
struct UpperSums {  // the row's sum of exp terms over the mined pairs of one kind, and how many
  T sum;
  int64_t count;
};

template <typename T>
struct UpperScanSums {  // scan_negatives' results and the row's sum and count of one pass
  T extreme, bad, sum;
  int64_t count;
};

// Per column j, the weights of anchor j (PairWeights of each row, as arrays), for G_ji
template <typename T>
struct ColumnWeights {
  const T *pos_limit, *neg_limit, *pos_shift, *neg_shift, *pos_coef, *neg_coef;
  ColumnWeights offset(int64_t k) const {
    return {pos_limit + k, neg_limit + k, pos_shift + k, neg_shift + k, pos_coef + k, neg_coef + k};
  }
};

#define MS_FUSED_SELF_PASSES(T)                                                                                  \
  /* max over the negatives (row side returned, column side col_max[k] = max(col_max[k], s[k])) */               \
  UpperScan<T> scan_negatives(const T* s, const int32_t* y, int64_t len, int32_t yi, T* col_max, T* col_bad);    \
  /* min over the positives, the same way */                                                                     \
  UpperScan<T> scan_positives(const T* s, const int32_t* y, int64_t len, int32_t yi, T* col_min, T* col_bad);    \
  /* scan_negatives, and in the same pass the mined negatives (s + eps > limit): exp(beta s + offset), the */  \
  /* row's with its limit and offset, column k's with col_limit[k], col_offset[k] into col_sum[k] and */         \
  /* col_count[k] */                                                                                             \
  UpperScanSums<T> scan_sum_negatives(const T* s, const int32_t* y, int64_t len, int32_t yi, T limit, T offset,  \
                                      const T* col_limit, const T* col_offset, T* col_max, T* col_bad,           \
                                      T* col_sum, PairCount<T>* col_count, const Hyper<T>& hp);                  \
  /* the same with one exp per pair, exp(beta s + offset) times the row's `factor` or col_factor[k] */          \
  UpperScanSums<T> scan_sum_negatives_shared(const T* s, const int32_t* y, int64_t len, int32_t yi, T limit,     \
                                             T offset, T factor, const T* col_limit, const T* col_factor,        \
                                             T* col_max, T* col_bad, T* col_sum, PairCount<T>* col_count,        \
                                             const Hyper<T>& hp);                                                \
  /* the similarities of rows [first, first + count) of x (row stride d) as a (count x count) tile s, but only */ \
  /* those of pairs i < j within one label segment (seg_end[i]: the end of row i's); every other element 0 */    \
  void segment_similarities(const T* x, int64_t d, const int64_t* seg_end, int64_t first, int64_t count, T* s);   \
  /* out[k] = scale[k] exp(sign (shift[k] - base)), 0 where shift[k] = -inf; scale nullptr: 1 */                \
  void scaled_exps(const T* shift, const T* scale, int64_t len, T base, T sign, T* out);                         \
  /* mined positives (s - eps < limit): exp(-alpha s + offset), the row's with its limit and offset, column */  \
  /* k's with col_limit[k], col_offset[k] into col_sum[k] and col_count[k] */                                    \
  UpperSums<T> sum_positives(const T* s, const int32_t* y, int64_t len, int32_t yi, T limit, T offset,           \
                             const T* col_limit, const T* col_offset, T* col_sum, PairCount<T>* col_count,            \
                             const Hyper<T>& hp);                                                                \
  /* overwrites s[k] with G_ij + G_ji for the pairs of one kind (0 for the other kind) */                        \
  void upper_weights(T* s, const int32_t* y, int64_t len, int32_t yi, const PairWeights<T>& row,                 \
                     const ColumnWeights<T>& cols, const Hyper<T>& hp, bool positives);                  \
  /* negatives with one exp per pair: G_ij + G_ji = exp(beta s + offset) (coef_i + col_coef[k]), each coef */     \
  /* taken where its side mines the pair (limit, col_limit[k]) */                                                \
  void upper_negative_weights_shared(T* s, const int32_t* y, int64_t len, int32_t yi, T limit, T coef, T offset, \
                                     const T* col_limit, const T* col_coef, const Hyper<T>& hp);

MS_FUSED_SELF_PASSES(float)
MS_FUSED_SELF_PASSES(double)
#undef MS_FUSED_SELF_PASSES

}  // namespace ms_fused::cpu
