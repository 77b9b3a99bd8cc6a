// The backward's products for a tile W whose elements are mostly 0 (docs/semantics.md "Gradient": with
// mining on, most pairs are not mined and their G is 0). A dense product multiplies every zero; these visit
// the nonzeros only, at several times a dense product's cost per element, so they pay below a share of
// nonzeros (self_mode.cpp chooses per tile, ms_loss_cpu.cpp per row block of reference mode).
#pragma once

#include <cstdint>
#include <vector>

namespace ms_fused::cpu {

// Columns per block of the sparse products: a block's rows of x stay in the L1 cache while every row of W
// visits them
constexpr int64_t kSparseBlockCols = 32;

// The share of nonzeros up to which a tile of W is multiplied over its nonzeros: `fallback`, or the value of
// MS_FUSED_CPP_SPARSE_SHARE (a number in [0, 1]: 1 sends every tile to the sparse products, 0 only those
// without a nonzero), which tests use to run either path on any data.
double sparse_share(double fallback);

// One row of a W (reference mode: a row of G, anchor against all of R): its nonzeros, column block by column
// block (block b's entries are [bound[b], bound[b + 1]); list_row may write up to 16 entries past the last)
template <typename T>
struct SparseRow {
  std::vector<int64_t> bound;
  std::vector<int32_t> col;
  std::vector<T> value;
};

#define MS_FUSED_SPARSE_UPDATE(T)                                                                                \
  /* the number of nonzero elements of w[0..len) */                                                             \
  int64_t count_nonzeros(const T* w, int64_t len);                                                               \
  /* dx_rows += W x_cols and dx_cols += W^T x_rows for W (rows x cols, row-major) with nnz nonzeros (as */   \
  /* count_nonzeros counts them); x_* and dx_* hold rows of d elements, row stride d. On a diagonal tile the */  \
  /* row and column arrays may be the same rows. */                                                              \
  void sparse_tile_update(const T* w, int64_t rows, int64_t cols, int64_t nnz, const T* x_rows, const T* x_cols, \
                          int64_t d, T* dx_rows, T* dx_cols);                                                \
  /* lists the nnz nonzeros of w[0..cols) (as count_nonzeros counts them) into `row` */                          \
  void list_row(const T* w, int64_t cols, int64_t nnz, SparseRow<T>& row);                                       \
  /* for the count listed rows k of W (cols columns) and their column blocks [block_first, block_last): */        \
  /* dx_rows[k] += sum_j W_kj x_cols[j] and, unless dx_cols is null, dx_cols[j] += W_kj x_rows[k] (rows of d */  \
  /* elements at stride d, j the column in W: x_cols and dx_cols point at W's column 0) */                      \
  void sparse_rows_update(const SparseRow<T>* rows, int64_t count, int64_t block_first, int64_t block_last,      \
                          int64_t cols, const T* x_rows, const T* x_cols, int64_t d, T* dx_rows, T* dx_cols);

MS_FUSED_SPARSE_UPDATE(float)
MS_FUSED_SPARSE_UPDATE(double)
#undef MS_FUSED_SPARSE_UPDATE

}  // namespace ms_fused::cpu
