// Passes of the pair-weighting losses over the upper triangle of the symmetric S in self mode (driven by
// pair_self_mode.cpp). Each takes one anchor i's elements s[0..len) right of the diagonal in a range of
// columns of one kind, all positives (pos: same label) or all negatives (the rows are in label order, so a
// row's positives are one range), and serves both sides of every pair: anchor i (the row values) and the
// column anchors (arrays indexed like s). Compiled per ISA variant like pair_rows.cpp.
#pragma once

#include <cstdint>

#include "pair_rows.h"

namespace ms_fused::cpu {

#define MS_FUSED_PAIR_UPPER_PASSES(T)                                                                           \
  /* the largest logit of the kind, returned for the row, col_max[k] raised to column k's */                    \
  T upper_scan(const T* s, int64_t len, bool pos, const PairParams<T>& p, T* col_max);                          \
  /* sums of e^{z - shift}: the row's into row_sums[0], column k's into col_sum[k]; shared: one exp per pair */  \
  /* with the shift row_shift for both sides, else column k's shift is col_shift[k]; with pos, also the logits' */ \
  /* sums (row_sums[1], col_zsum[k]) */                                                                          \
  void upper_sums(const T* s, int64_t len, bool pos, const PairParams<T>& p, T row_shift, const T* col_shift,   \
                  T* row_sums, T* col_sum, T* col_zsum);                                                        \
  /* overwrites s[k] with G_ij + G_ji from both anchors' shift, coef and extra (pair_losses.h KindWeights); */  \
  /* col_shift nullptr: one exp per pair with row_shift, the coefs already scaled to it */                      \
  void upper_weights(T* s, int64_t len, bool pos, const PairParams<T>& p, T row_shift, T row_coef, T row_extra, \
                     const T* col_shift, const T* col_coef, const T* col_extra);                                \
  /* whether a loss's pair weights of this kind can share one exp between the pair's two anchors */             \
  bool upper_shareable(bool pos, const PairParams<T>& p);

MS_FUSED_PAIR_UPPER_PASSES(float)
MS_FUSED_PAIR_UPPER_PASSES(double)
#undef MS_FUSED_PAIR_UPPER_PASSES

}  // namespace ms_fused::cpu
