// The triangle passes of pair_upper.h: `#pragma omp simd` loops (the max scan in explicit vectors, vec.h) over
// a range of one kind of pair, so without a label compare, compiled once per ISA variant.
#include "pair_upper.h"

#include <limits>

#include "pair_losses.h"
#include "simd_math.h"
#include "vec.h"

namespace ms_fused::cpu {
namespace {

using namespace simd;
using namespace pair_losses;

template <bool Pos, typename Loss, typename V>
MS_FUSED_INLINE V logit(const Loss& loss, V s) {
  if constexpr (Pos) {
    return loss.pos_logit(s);
  } else {
    return loss.neg_logit(s);
  }
}

// a NaN logit never raises a maximum; its exp makes the sums NaN later
template <bool Pos, int Bytes, typename T, typename Loss>
MS_FUSED_INLINE T scan_impl(const T* s, int64_t len, const Loss& loss, T* col_max) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int L = Vec<T, Bytes>::lanes;
  V row = V{} - kInf<T>;
  int64_t k = 0;
  for (; k + L <= len; k += L) {
    const V z = logit<Pos>(loss, load<V>(s + k));
    const V col = load<V>(col_max + k);
    row = z > row ? z : row;
    store(col_max + k, z > col ? z : col);
  }
  T row_max = max_of<T, Bytes>(row, -kInf<T>);
  for (; k < len; ++k) {
    const T z = logit<Pos>(loss, s[k]);
    row_max = z > row_max ? z : row_max;
    col_max[k] = z > col_max[k] ? z : col_max[k];
  }
  return row_max;
}

template <bool Pos, bool Shared, typename T, typename Loss>
MS_FUSED_INLINE void sums_impl(const T* s, int64_t len, const Loss& loss, T row_shift, const T* col_shift,
                               T* row_sums, T* col_sum, T* col_zsum) {
  T sum = 0, zsum = 0;
#pragma omp simd reduction(+ : sum, zsum)
  for (int64_t k = 0; k < len; ++k) {
    const T z = logit<Pos>(loss, s[k]);
    const T e_row = vec_exp(z - row_shift);
    const T e_col = Shared ? e_row : vec_exp(z - col_shift[k]);
    sum += e_row;
    col_sum[k] += e_col;
    if constexpr (Pos) {
      zsum += z;
      col_zsum[k] += z;
    }
  }
  row_sums[0] += sum;
  if constexpr (Pos) row_sums[1] += zsum;
}

template <bool Pos, bool Shared, typename T, typename Loss>
MS_FUSED_INLINE void weights_impl(T* s, int64_t len, const Loss& loss, T row_shift, T row_coef, T row_extra,
                                  const T* col_shift, const T* col_coef, const T* col_extra) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const T v = s[k];
    const T z = logit<Pos>(loss, v);
    const T e_row = vec_exp(z - row_shift);
    const T e_col = Shared ? e_row : vec_exp(z - col_shift[k]);
    s[k] = loss.template pair_weight<Pos>(v, e_row, e_col, row_coef, col_coef[k], row_extra,
                                          Pos ? col_extra[k] : T(0));
  }
}

// The passes for a kind and sharing chosen at run time (the variants' macros below take one template argument)
template <int Bytes, typename T, typename Loss>
MS_FUSED_INLINE T scan_of(const T* s, int64_t len, bool pos, const Loss& loss, T* col_max) {
  return pos ? scan_impl<true, Bytes>(s, len, loss, col_max) : scan_impl<false, Bytes>(s, len, loss, col_max);
}

template <typename T, typename Loss>
MS_FUSED_INLINE void sums_of(const T* s, int64_t len, bool pos, const Loss& loss, T row_shift, const T* col_shift,
                             T* row_sums, T* col_sum, T* col_zsum) {
  const bool shared = col_shift == nullptr;
  if (pos && shared) return sums_impl<true, true>(s, len, loss, row_shift, col_shift, row_sums, col_sum, col_zsum);
  if (pos) return sums_impl<true, false>(s, len, loss, row_shift, col_shift, row_sums, col_sum, col_zsum);
  if (shared) return sums_impl<false, true>(s, len, loss, row_shift, col_shift, row_sums, col_sum, col_zsum);
  return sums_impl<false, false>(s, len, loss, row_shift, col_shift, row_sums, col_sum, col_zsum);
}

// col_shift nullptr (shared) only where the loss's kShareable allows it (the driver asks upper_shareable)
template <bool Pos, typename T, typename Loss>
MS_FUSED_INLINE void weights_of_kind(T* s, int64_t len, const Loss& loss, T row_shift, T row_coef, T row_extra,
                                     const T* col_shift, const T* col_coef, const T* col_extra) {
  if constexpr (Loss::template kShareable<Pos>) {
    if (col_shift == nullptr) {
      return weights_impl<Pos, true>(s, len, loss, row_shift, row_coef, row_extra, col_shift, col_coef, col_extra);
    }
  }
  weights_impl<Pos, false>(s, len, loss, row_shift, row_coef, row_extra, col_shift, col_coef, col_extra);
}

template <typename T, typename Loss>
MS_FUSED_INLINE void weights_of(T* s, int64_t len, bool pos, const Loss& loss, T row_shift, T row_coef, T row_extra,
                                const T* col_shift, const T* col_coef, const T* col_extra) {
  if (pos) return weights_of_kind<true>(s, len, loss, row_shift, row_coef, row_extra, col_shift, col_coef, col_extra);
  weights_of_kind<false>(s, len, loss, row_shift, row_coef, row_extra, col_shift, col_coef, col_extra);
}

#define MS_FUSED_PAIR_UPPER_VARIANT(name, target, bytes)                                                             \
  namespace name {                                                                                                 \
  template <typename T>                                                                                            \
  target T upper_scan(const T* s, int64_t len, bool pos, const PairParams<T>& p, T* col_max) {                     \
    MS_FUSED_WITH_LOSS(p, return scan_of<bytes>(s, len, pos, loss, col_max))                                       \
  }                                                                                                                \
  template <typename T>                                                                                            \
  target void upper_sums(const T* s, int64_t len, bool pos, const PairParams<T>& p, T row_shift,                   \
                         const T* col_shift, T* row_sums, T* col_sum, T* col_zsum) {                               \
    MS_FUSED_WITH_LOSS(p, return sums_of(s, len, pos, loss, row_shift, col_shift, row_sums, col_sum, col_zsum))    \
  }                                                                                                                \
  template <typename T>                                                                                            \
  target void upper_weights(T* s, int64_t len, bool pos, const PairParams<T>& p, T row_shift, T row_coef,          \
                            T row_extra, const T* col_shift, const T* col_coef, const T* col_extra) {              \
    MS_FUSED_WITH_LOSS(p, return weights_of(s, len, pos, loss, row_shift, row_coef, row_extra, col_shift,          \
                                            col_coef, col_extra))                                                  \
  }                                                                                                                \
  }

MS_FUSED_ALL_VARIANTS(MS_FUSED_PAIR_UPPER_VARIANT)

template <typename Loss>
bool shareable_of(bool pos, const Loss&) {
  return pos ? Loss::template kShareable<true> : Loss::template kShareable<false>;
}

template <typename T>
bool shareable(bool pos, const PairParams<T>& p) {
  MS_FUSED_WITH_LOSS(p, return shareable_of(pos, loss))
}

}  // namespace

#define MS_FUSED_PAIR_UPPER_ENTRY_POINTS(T)                                                                         \
  T upper_scan(const T* s, int64_t len, bool pos, const PairParams<T>& p, T* col_max) {                            \
    MS_FUSED_DISPATCH(upper_scan, s, len, pos, p, col_max)                                                         \
  }                                                                                                                \
  void upper_sums(const T* s, int64_t len, bool pos, const PairParams<T>& p, T row_shift, const T* col_shift,      \
                  T* row_sums, T* col_sum, T* col_zsum) {                                                          \
    MS_FUSED_DISPATCH(upper_sums, s, len, pos, p, row_shift, col_shift, row_sums, col_sum, col_zsum)               \
  }                                                                                                                \
  void upper_weights(T* s, int64_t len, bool pos, const PairParams<T>& p, T row_shift, T row_coef, T row_extra,    \
                     const T* col_shift, const T* col_coef, const T* col_extra) {                                  \
    MS_FUSED_DISPATCH(upper_weights, s, len, pos, p, row_shift, row_coef, row_extra, col_shift, col_coef,          \
                      col_extra)                                                                                   \
  }                                                                                                                \
  bool upper_shareable(bool pos, const PairParams<T>& p) { return shareable(pos, p); }

MS_FUSED_PAIR_UPPER_ENTRY_POINTS(float)
MS_FUSED_PAIR_UPPER_ENTRY_POINTS(double)

}  // namespace ms_fused::cpu
