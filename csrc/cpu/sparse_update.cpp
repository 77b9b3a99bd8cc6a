// sparse_update.h: row by row, the row's nonzeros W_ij are listed (with AVX-512 compresses where the CPU has
// them; on aarch64 with NEON or SVE, compact_aarch64.h), then each one adds W_ij x_cols[j] to row i's sum,
// kept in registers, and W_ij x_rows[i] to dx_cols[j]. The columns are taken a block at a time, and the
// embedding dimension a chunk at a time, so that the block's rows of x_cols and dx_cols stay in the L1 cache
// while every row visits them.
#include "sparse_update.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <vector>

#include "row_kernels.h"
#include "simd_math.h"
#include "vec.h"

#ifdef MS_FUSED_X86_VARIANTS
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include "compact_aarch64.h"
#endif

namespace ms_fused::cpu {
namespace {

using simd::load;
using simd::store;
using simd::Vec;

// Columns per block: a block's chunk of x_cols and of dx_cols (2 x 32 rows x 8 registers of 64 bytes) fills
// 32 KB of a 48 KB L1 cache
constexpr int64_t kBlockCols = kSparseBlockCols;
constexpr int kChunkRegisters = 8;
// Blocks per visit of a listed row when only dx_rows is updated (sparse_rows_update without dx_cols): 8 blocks
// of x_cols's rows, 128 KB at D >= 128, stay in a 1 MB L2 cache, and a visit sums 8 times the entries
constexpr int64_t kRowsGroup = 8;

// nonzero: any bit but the sign (so -0 is 0, and NaN or Inf is kept)
template <typename T>
MS_FUSED_INLINE bool nonzero(T v) {
  using Bits = simd::Count<T>;
  return (std::bit_cast<Bits>(v) & std::numeric_limits<Bits>::max()) != 0;
}

template <typename T>
MS_FUSED_INLINE int64_t count_nonzeros_impl(const T* w, int64_t len) {
  int64_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t k = 0; k < len; ++k) count += nonzero(w[k]) ? 1 : 0;
  return count;
}

// Appends the nonzeros of w[0..len) at `at`, with their positions plus `first` as index; may write up to 16
// entries past the last one kept. Returns the new end.
template <typename T>
MS_FUSED_INLINE int64_t append_nonzeros_scalar(const T* w, int64_t len, int32_t first, int32_t* index, T* value,
                                               int64_t at) {
  for (int64_t j = 0; j < len; ++j) {  // no branch: every element is written, the nonzeros are kept
    index[at] = first + static_cast<int32_t>(j);
    value[at] = w[j];
    at += nonzero(w[j]);
  }
  return at;
}

#ifdef MS_FUSED_X86_VARIANTS
// The same with AVX-512 compresses, 16 floats or 8 doubles at a time (len a multiple of 16)
__attribute__((target("arch=x86-64-v4"))) int64_t append_nonzeros_avx512(const float* w, int64_t len, int32_t first,
                                                                        int32_t* index, float* value, int64_t at) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i magnitude = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());
  for (int64_t j = 0; j < len; j += 16) {
    const __m512i v = _mm512_loadu_si512(w + j);
    const __mmask16 keep = _mm512_test_epi32_mask(v, magnitude);
    const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(first + static_cast<int32_t>(j)));
    _mm512_storeu_si512(value + at, _mm512_maskz_compress_epi32(keep, v));
    _mm512_storeu_si512(index + at, _mm512_maskz_compress_epi32(keep, idx));
    at += __builtin_popcount(keep);
  }
  return at;
}

__attribute__((target("arch=x86-64-v4"))) int64_t append_nonzeros_avx512(const double* w, int64_t len, int32_t first,
                                                                        int32_t* index, double* value, int64_t at) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i magnitude = _mm512_set1_epi64(std::numeric_limits<int64_t>::max());
  for (int64_t j = 0; j < len; j += 8) {
    const __m512i v = _mm512_loadu_si512(w + j);
    const __mmask8 keep = _mm512_test_epi64_mask(v, magnitude);
    const __m256i idx = _mm256_add_epi32(lane, _mm256_set1_epi32(first + static_cast<int32_t>(j)));
    _mm512_storeu_si512(value + at, _mm512_maskz_compress_epi64(keep, v));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(index + at), _mm256_maskz_compress_epi32(keep, idx));
    at += __builtin_popcount(keep);
  }
  return at;
}
#endif

template <typename T>
MS_FUSED_INLINE int64_t append_nonzeros(const T* w, int64_t len, int32_t first, int32_t* index, T* value, int64_t at) {
#ifdef MS_FUSED_X86_VARIANTS
  if (simd::active_isa() == simd::Isa::kAvx512) {
    const int64_t whole = len - len % 16;
    at = append_nonzeros_avx512(w, whole, first, index, value, at);
    return append_nonzeros_scalar(w + whole, len - whole, first + static_cast<int32_t>(whole), index, value, at);
  }
#endif
#if defined(__aarch64__)
#ifdef MS_FUSED_AARCH64_VARIANTS
  if (simd::active_isa() != simd::Isa::kDefault) return compact::append_nonzeros_sve(w, len, first, index, value, at);
#endif
  const int64_t whole = len - len % (16 / sizeof(T));
  at = compact::append_nonzeros_neon(w, whole, first, index, value, at);
  return append_nonzeros_scalar(w + whole, len - whole, first + static_cast<int32_t>(whole), index, value, at);
#else
  return append_nonzeros_scalar(w, len, first, index, value, at);
#endif
}

template <typename T>
struct RowLists {  // the nonzeros of each row i of W, by column block b: entries [bound[i][b], bound[i][b + 1])
  int64_t blocks;
  std::vector<int64_t> bound;  // rows x (blocks + 1)
  std::vector<int32_t> col;
  std::vector<T> value;
};

template <typename T>
MS_FUSED_INLINE void list_rows(const T* w, int64_t rows, int64_t cols, int64_t nnz, RowLists<T>& lists) {
  lists.blocks = divup(cols, kBlockCols);
  lists.bound.resize(rows * (lists.blocks + 1));
  lists.col.resize(nnz + 16);
  lists.value.resize(nnz + 16);
  int64_t at = 0;
  for (int64_t i = 0; i < rows; ++i) {
    int64_t* bound = lists.bound.data() + i * (lists.blocks + 1);
    for (int64_t b = 0; b < lists.blocks; ++b) {
      bound[b] = at;
      const int64_t j = b * kBlockCols;
      at = append_nonzeros(w + i * cols + j, std::min(kBlockCols, cols - j), static_cast<int32_t>(j),
                           lists.col.data(), lists.value.data(), at);
    }
    bound[lists.blocks] = at;
  }
}

// Where row j of x_cols and of dx_cols lies in a chunk: at (j - first) * stride, first the block's first column
struct ColumnRows {
  int64_t first, stride;
  MS_FUSED_INLINE int64_t operator()(int32_t j) const { return (j - first) * stride; }
};

// For R registers of row i's elements (x_row, dx_row): dx_row += sum over entries e of value[e] x_cols[col[e]]
// and, with Cols, dx_cols[col[e]] += value[e] x_row
template <int R, int Bytes, typename T, bool Cols = true>
MS_FUSED_INLINE void update_chunk(const int32_t* col, const T* value, int64_t first, int64_t last, const T* x_row,
                                  T* dx_row, const T* x_cols, T* dx_cols, ColumnRows at) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int L = Vec<T, Bytes>::lanes;
  V xi[R], acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if constexpr (Cols) xi[r] = load<V>(x_row + r * L);
    acc[r] = V{};
  }
  for (int64_t e = first; e < last; ++e) {
    const V v = V{} + value[e];
    const T* xj = x_cols + at(col[e]);
    T* dxj = dx_cols + at(col[e]);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      acc[r] += v * load<V>(xj + r * L);
      if constexpr (Cols) store(dxj + r * L, load<V>(dxj + r * L) + v * xi[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) store(dx_row + r * L, load<V>(dx_row + r * L) + acc[r]);
}

// The same for one element
template <typename T, bool Cols = true>
MS_FUSED_INLINE void update_element(const int32_t* col, const T* value, int64_t first, int64_t last, const T* x_row,
                                    T* dx_row, const T* x_cols, T* dx_cols, ColumnRows at) {
  T acc = 0;
  for (int64_t e = first; e < last; ++e) {
    acc += value[e] * x_cols[at(col[e])];
    if constexpr (Cols) dx_cols[at(col[e])] += value[e] * x_row[0];
  }
  dx_row[0] += acc;
}

// Every row's entries in every column block, for the `width` elements from c0 on that `chunk` updates. With
// `pack`, each block's chunk of x_cols is first copied to consecutive rows of `packed`, and its chunk of dx_cols
// summed there and then added: rows at a stride of a multiple of 1 KB would fall in a few sets of the cache.
template <typename T, typename Chunk>
MS_FUSED_INLINE void update_blocks(const RowLists<T>& lists, int64_t rows, int64_t cols, const T* x_rows,
                                   const T* x_cols, int64_t d, int64_t c0, int64_t width, T* dx_rows, T* dx_cols,
                                   bool pack, std::vector<T>& packed, const Chunk& chunk) {
  const int64_t dx_offset = kBlockCols * width;  // the block's dx_cols after its x_cols
  if (pack) packed.resize(2 * dx_offset);
  for (int64_t b = 0; b < lists.blocks; ++b) {
    const int64_t j0 = b * kBlockCols, block = std::min(kBlockCols, cols - j0);
    const T* x_block = x_cols + c0;
    T* dx_block = dx_cols + c0;
    ColumnRows at{0, d};
    if (pack) {
      T* x_packed = packed.data();
      for (int64_t j = 0; j < block; ++j) std::memcpy(x_packed + j * width, x_cols + (j0 + j) * d + c0, width * sizeof(T));
      std::fill(packed.begin() + dx_offset, packed.end(), T(0));
      x_block = x_packed, dx_block = x_packed + dx_offset, at = {j0, width};
    }
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t* bound = lists.bound.data() + i * (lists.blocks + 1) + b;
      if (bound[1] > bound[0]) {
        chunk(lists.col.data(), lists.value.data(), bound[0], bound[1], x_rows + i * d + c0, dx_rows + i * d + c0,
              x_block, dx_block, at);
      }
    }
    if (pack) {
      for (int64_t j = 0; j < block; ++j) {
        T* out = dx_cols + (j0 + j) * d + c0;
        const T* sum = dx_block + j * width;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) out[c] += sum[c];
      }
    }
  }
}

template <typename T>
struct Scratch {
  RowLists<T> lists;
  std::vector<T> packed;
};

template <int Bytes, typename T>
MS_FUSED_INLINE void sparse_tile_update_impl(const T* w, int64_t rows, int64_t cols, int64_t nnz, const T* x_rows,
                                             const T* x_cols, int64_t d, T* dx_rows, T* dx_cols, Scratch<T>& scratch) {
  RowLists<T>& lists = scratch.lists;
  std::vector<T>& packed = scratch.packed;
  list_rows(w, rows, cols, nnz, lists);
  // chunks of R registers (fewer where there are 16 registers: x_row's and the sums' must fit beside others)
  constexpr int R = Bytes == 64 ? kChunkRegisters : kChunkRegisters / 2, L = Vec<T, Bytes>::lanes;
  const bool pack = d > R * L;  // rows longer than a chunk: their stride may be a multiple of 1 KB
  int64_t c0 = 0;
  for (; c0 + R * L <= d; c0 += R * L) {
    update_blocks(lists, rows, cols, x_rows, x_cols, d, c0, R * L, dx_rows, dx_cols, pack, packed,
                  update_chunk<R, Bytes, T>);
  }
  for (; c0 + L <= d; c0 += L) {
    update_blocks(lists, rows, cols, x_rows, x_cols, d, c0, L, dx_rows, dx_cols, pack, packed,
                  update_chunk<1, Bytes, T>);
  }
  for (; c0 < d; ++c0) {
    update_blocks(lists, rows, cols, x_rows, x_cols, d, c0, 1, dx_rows, dx_cols, pack, packed, update_element<T>);
  }
}

template <typename T>
MS_FUSED_INLINE void list_row_impl(const T* w, int64_t cols, int64_t nnz, SparseRow<T>& row) {
  const int64_t blocks = divup(cols, kBlockCols);
  row.bound.resize(blocks + 1);
  row.col.resize(nnz + 16);
  row.value.resize(nnz + 16);
  int64_t at = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    row.bound[b] = at;
    const int64_t j = b * kBlockCols;
    at = append_nonzeros(w + j, std::min(kBlockCols, cols - j), static_cast<int32_t>(j), row.col.data(),
                         row.value.data(), at);
  }
  row.bound[blocks] = at;
}

// update_blocks for listed rows and the column blocks [b0, b1), taken `group` blocks at a time; without Cols,
// dx_cols is not touched
template <bool Cols, typename T, typename Chunk>
MS_FUSED_INLINE void update_listed_blocks(const SparseRow<T>* rows, int64_t count, int64_t b0, int64_t b1,
                                          int64_t group, int64_t cols, const T* x_rows, const T* x_cols, int64_t d,
                                          int64_t c0, int64_t width, T* dx_rows, T* dx_cols, bool pack,
                                          std::vector<T>& packed, const Chunk& chunk) {
  const int64_t span = group * kBlockCols, dx_offset = span * width;
  if (pack) packed.resize(2 * dx_offset);
  for (int64_t b = b0; b < b1; b += group) {
    const int64_t b_end = std::min(b + group, b1);
    const int64_t j0 = b * kBlockCols, block = std::min(b_end * kBlockCols, cols) - j0;
    const T* x_block = x_cols + c0;
    T* dx_block = Cols ? dx_cols + c0 : nullptr;
    ColumnRows at{0, d};
    if (pack) {
      T* x_packed = packed.data();
      for (int64_t j = 0; j < block; ++j) std::memcpy(x_packed + j * width, x_cols + (j0 + j) * d + c0, width * sizeof(T));
      if (Cols) std::fill(packed.begin() + dx_offset, packed.end(), T(0));
      x_block = x_packed, dx_block = Cols ? x_packed + dx_offset : nullptr, at = {j0, width};
    }
    for (int64_t k = 0; k < count; ++k) {
      const int64_t first = rows[k].bound[b], last = rows[k].bound[b_end];
      if (last > first) {
        chunk(rows[k].col.data(), rows[k].value.data(), first, last, x_rows + k * d + c0,
              dx_rows + k * d + c0, x_block, dx_block, at);
      }
    }
    if (pack && Cols) {
      for (int64_t j = 0; j < block; ++j) {
        T* out = dx_cols + (j0 + j) * d + c0;
        const T* sum = dx_block + j * width;
#pragma omp simd
        for (int64_t c = 0; c < width; ++c) out[c] += sum[c];
      }
    }
  }
}

template <int Bytes, bool Cols, typename T>
MS_FUSED_INLINE void sparse_rows_update_impl(const SparseRow<T>* rows, int64_t count, int64_t b0, int64_t b1,
                                             int64_t cols, const T* x_rows, const T* x_cols, int64_t d, T* dx_rows,
                                             T* dx_cols, std::vector<T>& packed) {
  constexpr int R = Bytes == 64 ? kChunkRegisters : kChunkRegisters / 2, L = Vec<T, Bytes>::lanes;
  const bool pack = d > R * L;
  // Without dx_cols only x_cols's block must stay cached: kRowsGroup blocks at a time (in the L2 cache), so
  // that a row's visit to a block sums more entries in its registers
  const int64_t group = Cols ? 1 : kRowsGroup;
  int64_t c0 = 0;
  for (; c0 + R * L <= d; c0 += R * L) {
    update_listed_blocks<Cols>(rows, count, b0, b1, group, cols, x_rows, x_cols, d, c0, R * L, dx_rows, dx_cols,
                               pack, packed, update_chunk<R, Bytes, T, Cols>);
  }
  for (; c0 + L <= d; c0 += L) {
    update_listed_blocks<Cols>(rows, count, b0, b1, group, cols, x_rows, x_cols, d, c0, L, dx_rows, dx_cols, pack,
                               packed, update_chunk<1, Bytes, T, Cols>);
  }
  for (; c0 < d; ++c0) {
    update_listed_blocks<Cols>(rows, count, b0, b1, group, cols, x_rows, x_cols, d, c0, 1, dx_rows, dx_cols, pack,
                               packed, update_element<T, Cols>);
  }
}

#define MS_FUSED_VARIANT(name, target, bytes)                                                                        \
  namespace name {                                                                                               \
  template <typename T>                                                                                          \
  target int64_t count_nonzeros(const T* w, int64_t len) {                                                       \
    return count_nonzeros_impl(w, len);                                                                          \
  }                                                                                                              \
  template <typename T>                                                                                          \
  target void sparse_tile_update(const T* w, int64_t rows, int64_t cols, int64_t nnz, const T* x_rows,          \
                                 const T* x_cols, int64_t d, T* dx_rows, T* dx_cols, Scratch<T>& scratch) {      \
    sparse_tile_update_impl<bytes>(w, rows, cols, nnz, x_rows, x_cols, d, dx_rows, dx_cols,                     \
                                                   scratch);                                                     \
  }                                                                                                              \
  template <typename T>                                                                                          \
  target void list_row(const T* w, int64_t cols, int64_t nnz, SparseRow<T>& row) {                               \
    list_row_impl(w, cols, nnz, row);                                                                            \
  }                                                                                                              \
  template <typename T>                                                                                          \
  target void sparse_rows_update(const SparseRow<T>* rows, int64_t count, int64_t b0, int64_t b1, int64_t cols,  \
                                 const T* x_rows, const T* x_cols, int64_t d, T* dx_rows, T* dx_cols,            \
                                 std::vector<T>& packed) {                                                       \
    if (dx_cols == nullptr) {                                                                                    \
      sparse_rows_update_impl<bytes, false>(rows, count, b0, b1, cols, x_rows, x_cols, d,                      \
                                                            dx_rows, dx_cols, packed);                           \
    } else {                                                                                                     \
      sparse_rows_update_impl<bytes, true>(rows, count, b0, b1, cols, x_rows, x_cols, d,                       \
                                                           dx_rows, dx_cols, packed);                            \
    }                                                                                                            \
  }                                                                                                              \
  }

MS_FUSED_ALL_VARIANTS(MS_FUSED_VARIANT)

}  // namespace

#define MS_FUSED_SPARSE_ENTRY_POINTS(T)                                                                          \
  int64_t count_nonzeros(const T* w, int64_t len) { MS_FUSED_DISPATCH(count_nonzeros, w, len) }                  \
  void sparse_tile_update(const T* w, int64_t rows, int64_t cols, int64_t nnz, const T* x_rows, const T* x_cols, \
                          int64_t d, T* dx_rows, T* dx_cols) {                                                   \
    /* the lists of one tile stay allocated for the thread's next tile (nnz + 16 <= rows x cols + 16 entries) */ \
    /* The address is hidden from the optimiser: propagated into the kernel, a thread_local's address is */      \
    /* looked up again at every use. */                                                                          \
    thread_local Scratch<T> scratch;                                                                             \
    Scratch<T>* own = &scratch;                                                                                  \
    asm("" : "+r"(own));                                                                                         \
    MS_FUSED_DISPATCH(sparse_tile_update, w, rows, cols, nnz, x_rows, x_cols, d, dx_rows, dx_cols, *own)         \
  }

MS_FUSED_SPARSE_ENTRY_POINTS(float)
MS_FUSED_SPARSE_ENTRY_POINTS(double)

#define MS_FUSED_SPARSE_ROWS_ENTRY_POINTS(T)                                                                     \
  void list_row(const T* w, int64_t cols, int64_t nnz, SparseRow<T>& row) {                                      \
    MS_FUSED_DISPATCH(list_row, w, cols, nnz, row)                                                               \
  }                                                                                                              \
  void sparse_rows_update(const SparseRow<T>* rows, int64_t count, int64_t block_first, int64_t block_last,      \
                          int64_t cols, const T* x_rows, const T* x_cols, int64_t d, T* dx_rows, T* dx_cols) {   \
    thread_local std::vector<T> packed; /* a block's chunk of x_cols and dx_cols, kept for the next call */      \
    std::vector<T>* own = &packed;                                                                               \
    asm("" : "+r"(own));                                                                                         \
    MS_FUSED_DISPATCH(sparse_rows_update, rows, count, block_first, block_last, cols, x_rows, x_cols, d,         \
                      dx_rows, dx_cols, *own)                                                                    \
  }

MS_FUSED_SPARSE_ROWS_ENTRY_POINTS(float)
MS_FUSED_SPARSE_ROWS_ENTRY_POINTS(double)

}  // namespace ms_fused::cpu
