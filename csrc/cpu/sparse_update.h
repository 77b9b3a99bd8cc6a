// The self-mode backward's products for a tile W whose elements are mostly 0 (docs/semantics.md "Gradient":
// with mining on, most pairs are not mined and their G is 0). A dense product multiplies every zero; this
// one visits the nonzeros only, at several times a dense product's cost per element, so it pays below a
// share of nonzeros (self_mode.cpp chooses per tile).
#pragma once

#include <cstdint>

namespace ms_fused::cpu {

#define MS_FUSED_SPARSE_UPDATE(T)                                                                                \
  /* the number of nonzero elements of w[0..len) */                                                             \
  int64_t count_nonzeros(const T* w, int64_t len);                                                               \
  /* dx_rows += W x_cols and dx_cols += W^T x_rows for W (rows x cols, row-major) with nnz nonzeros (as */   \
  /* count_nonzeros counts them); x_* and dx_* hold rows of d elements, row stride d. On a diagonal tile the */  \
  /* row and column arrays may be the same rows. */                                                              \
  void sparse_tile_update(const T* w, int64_t rows, int64_t cols, int64_t nnz, const T* x_rows, const T* x_cols, \
                          int64_t d, T* dx_rows, T* dx_cols);

MS_FUSED_SPARSE_UPDATE(float)
MS_FUSED_SPARSE_UPDATE(double)
#undef MS_FUSED_SPARSE_UPDATE

}  // namespace ms_fused::cpu
