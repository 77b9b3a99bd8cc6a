// Self mode of the CPU kernels (docs/semantics.md), using the symmetry of S = X X^T over the tiles of
// triangle.h. Each pair (i, j), i < j, gets its similarity from exactly one product element, which serves
// both anchor i (row side) and anchor j (column side): a positive pair from the band (min_pos and the hard
// positives cost a band, not a pass), a negative pair from the sweep (half a product of S).
// The forward runs: band (min_pos), sweep (max_neg and the hard negatives' sums, with min_pos known), band
// again (the hard positives' sums, with max_neg known). The backward recomputes the same tiles, turns each
// into G_ij + G_ji in place and multiplies it both ways: dX_I += W X_J, dX_J += W^T X_I (over its nonzeros only
// where they are few: sparse_update.h). Forward and backward cut the same tiles, so each pair's similarity is
// bit for bit the one the forward mined.
#include "self_mode.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "self_passes.h"
#include "simd_math.h"
#include "sparse_update.h"
#include "triangle.h"

namespace ms_fused::cpu {
namespace {

using namespace triangle;

// A tile's negatives share one exp per pair between its two anchors when their shifts differ by at most this:
// exp(z - s_max) times exp(s_max - s_i) <= e^kSharedRange. A term then lost to underflow is below
// exp(-(min exponent - kSharedRange)) of its anchor's largest term: e^-37 in float, e^-208 in double.
template <typename T>
constexpr T kSharedRange = sizeof(T) == 4 ? T(50) : T(500);

// A tile's W = G + G^T goes to sparse_update.h when at most this share of it is nonzero (mining keeps few
// negatives; a band tile of small segments holds only their pairs): measured on AVX-512 at D = 128 and 512,
// the sparse update costs what the two dense products cost at about 0.35 and 0.25 of nonzeros
constexpr double kSparseShare = 0.25;

// A one-pass sweep tile (self_forward) sums terms with its anchors' shifts from earlier tiles, so a term may
// exceed 1; it keeps its sums when none exceeds exp(kGuard): with N < 2^40 terms their sum stays finite.
template <typename T>
constexpr T kGuard = sizeof(T) == 4 ? T(60) : T(600);

}  // namespace

template <typename T>
void self_forward(const at::Tensor& x, const at::Tensor& ids, const Hyper<T>& hp, T* loss, T* stats, int64_t* counts) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  const Sorted so = sort_by_label(x, ids);
  const Plan plan = make_plan(so);
  const int64_t n = x.size(0);
  const int32_t* y = so.y.data();

  // per anchor (sorted order); a round's tiles touch disjoint anchors, so each tile updates its own
  std::vector<T> min_pos(n, inf), bad(n, 0), max_neg(n, -inf), neg_shift(n, -inf), neg_sum(n, 0), pos_sum(n, 0);
  std::vector<PairCount<T>> neg_count(n, 0), pos_count(n, 0);
  std::vector<T> neg_limit(n), pos_limit(n), pos_shift(n), pos_offset(n);

  // 1. min_pos from the band: docs/semantics.md "Mining"
  for_each_tile<T>(plan.band, so, [&](const Tile& t, const at::Tensor& s) {
    const T* sv = s.data_ptr<T>();
    for (int64_t k = 0; k < t.rows; ++k) {
      const int64_t i = t.row + k, b = t.first_pair(k);
      const UpperScan<T> r = scan_positives(sv + k * t.cols + b, y + t.col + b, t.cols - b, y[i],
                                            min_pos.data() + t.col + b, bad.data() + t.col + b);
      min_pos[i] = std::min(min_pos[i], r.extreme);
      bad[i] += r.bad;
    }
  });
  for (int64_t i = 0; i < n; ++i) neg_limit[i] = hp.mining ? min_pos[i] : -inf;

  // 2. the sweep: max_neg and the hard negatives' sums. An anchor's terms are exp(z - shift) for its largest
  // negative so far; a larger one in a later tile rescales what it has summed.
  const T beta_base = hp.beta * hp.base;
  auto raise_shift = [&](int64_t i, T m) {
    if (!(m > -inf)) return;
    max_neg[i] = std::max(max_neg[i], m);
    const T z = hp.beta * (m - hp.base);
    if (z > neg_shift[i]) {
      neg_sum[i] = neg_shift[i] > -inf ? neg_sum[i] * std::exp(neg_shift[i] - z) : T(0);
      neg_shift[i] = z;
    }
  };
  auto offset = [&](int64_t i) { return neg_shift[i] > -inf ? -beta_base - neg_shift[i] : T(0); };
  // How a tile's terms are scaled, with the shifts its anchors have now (lo, hi: their range): shared, one exp
  // per pair, exp(z - hi) times each anchor's factor exp(hi - shift) (0 for an anchor without negatives); else
  // each anchor's own exp(z - shift), by its offset. `row` and `col` hold the rows' and columns' factors or
  // offsets.
  struct Scales {
    bool shared;
    std::vector<T> row, col;
  };
  auto scales = [&](const Tile& t, T lo, T hi) {
    Scales sc{hi - lo <= kSharedRange<T>, std::vector<T>(t.rows), std::vector<T>(t.cols)};
    if (sc.shared) {
      scaled_exps(neg_shift.data() + t.col, static_cast<const T*>(nullptr), t.cols, hi, T(-1), sc.col.data());
      scaled_exps(neg_shift.data() + t.row, static_cast<const T*>(nullptr), t.rows, hi, T(-1), sc.row.data());
    } else {
      for (int64_t q = 0; q < t.cols; ++q) sc.col[q] = offset(t.col + q);
      for (int64_t k = 0; k < t.rows; ++k) sc.row[k] = offset(t.row + k);
    }
    return sc;
  };

  // One pass over a tile with its anchors' shifts as they are: max_neg and the sums together. A term may
  // exceed its anchor's largest so far; when some anchor's would exceed exp(kGuard), nothing is kept and
  // false returned. Every shift must be finite, or `unguarded` (each at least its anchor's largest term).
  auto sum_tile = [&](const Tile& t, const T* sv, bool unguarded) {
    const auto [lo, hi] = shift_range(neg_shift.data(), t);
    if (!(hi > -inf)) return true;  // no negative so far for any of the tile's anchors: nothing to sum
    const Scales sc = scales(t, lo, hi);
    std::vector<T> row_max(t.rows), row_sum(t.rows), col_max(t.cols, -inf), col_sum(t.cols, 0);
    std::vector<PairCount<T>> row_count(t.rows), col_count(t.cols, 0);
    for (int64_t k = 0; k < t.rows; ++k) {
      const int64_t i = t.row + k, b = t.first_pair(k);
      const T* row = sv + k * t.cols + b;
      const UpperScanSums<T> r =
          sc.shared ? scan_sum_negatives_shared(row, y + t.col + b, t.cols - b, y[i], neg_limit[i], -beta_base - hi,
                                                sc.row[k], neg_limit.data() + t.col + b, sc.col.data() + b,
                                                col_max.data() + b, bad.data() + t.col + b, col_sum.data() + b,
                                                col_count.data() + b, hp)
                    : scan_sum_negatives(row, y + t.col + b, t.cols - b, y[i], neg_limit[i], sc.row[k],
                                         neg_limit.data() + t.col + b, sc.col.data() + b, col_max.data() + b,
                                         bad.data() + t.col + b, col_sum.data() + b, col_count.data() + b, hp);
      row_max[k] = r.extreme, row_sum[k] = r.sum, row_count[k] = static_cast<PairCount<T>>(r.count);
      bad[i] += r.bad;
      // S_ii: no pair, but part of row i of S (docs/semantics.md "Non-finite inputs")
      if (t.diagonal()) bad[i] += sv[k * t.cols + k] - sv[k * t.cols + k];
    }
    if (!unguarded) {
      auto guarded = [&](int64_t i, T m) { return !(hp.beta * (m - hp.base) - neg_shift[i] > kGuard<T>); };
      for (int64_t k = 0; k < t.rows; ++k) {
        if (!guarded(t.row + k, row_max[k])) return false;
      }
      for (int64_t q = 0; q < t.cols; ++q) {
        if (!guarded(t.col + q, col_max[q])) return false;
      }
    }
    for (int64_t k = 0; k < t.rows; ++k) neg_sum[t.row + k] += row_sum[k], neg_count[t.row + k] += row_count[k];
    for (int64_t q = 0; q < t.cols; ++q) neg_sum[t.col + q] += col_sum[q], neg_count[t.col + q] += col_count[q];
    for (int64_t k = 0; k < t.rows; ++k) raise_shift(t.row + k, row_max[k]);
    for (int64_t q = 0; q < t.cols; ++q) raise_shift(t.col + q, col_max[q]);
    return true;
  };
  auto every_anchor_has_a_shift = [&](const Tile& t) {
    for (int64_t k = 0; k < t.rows; ++k) {
      if (!(neg_shift[t.row + k] > -inf)) return false;
    }
    for (int64_t q = 0; q < t.cols; ++q) {
      if (!(neg_shift[t.col + q] > -inf)) return false;
    }
    return true;
  };
  // A tile in one pass where its anchors have shifts from earlier tiles and no term grows too large; else a
  // scan for max_neg, raising the shifts, then the pass with terms of at most 1
  auto sweep_tile = [&](const Tile& t, const T* sv) {
    if (every_anchor_has_a_shift(t) && sum_tile(t, sv, false)) return;
    std::vector<T> row_max(t.rows), col_max(t.cols, -inf);
    for (int64_t k = 0; k < t.rows; ++k) {
      const int64_t i = t.row + k, b = t.first_pair(k);
      const UpperScan<T> r = scan_negatives(sv + k * t.cols + b, y + t.col + b, t.cols - b, y[i],
                                            col_max.data() + b, bad.data() + t.col + b);
      row_max[k] = r.extreme;
      bad[i] += r.bad;
      if (t.diagonal()) bad[i] += sv[k * t.cols + k] - sv[k * t.cols + k];
    }
    for (int64_t k = 0; k < t.rows; ++k) raise_shift(t.row + k, row_max[k]);
    for (int64_t q = 0; q < t.cols; ++q) raise_shift(t.col + q, col_max[q]);
    sum_tile(t, sv, true);
  };
  for_each_tile<T>(plan.sweep, so, [&](const Tile& t, const at::Tensor& s) { sweep_tile(t, s.data_ptr<T>()); });

  // 3. each anchor's B and the positives' limit and shift
  std::vector<T> lse_neg(n);
  for (int64_t i = 0; i < n; ++i) {
    const T shift = neg_count[i] > 0 ? std::max(T(0), hp.beta * (max_neg[i] - hp.base)) : T(0);
    const T sum = neg_count[i] > 0 ? neg_sum[i] * std::exp(neg_shift[i] - shift) : T(0);
    lse_neg[i] = simd::log1p_shifted(shift, sum);
    pos_limit[i] = hp.mining ? max_neg[i] : inf;
    const bool any_pos = min_pos[i] < inf && min_pos[i] - hp.epsilon < pos_limit[i];
    pos_shift[i] = any_pos ? std::max(T(0), -hp.alpha * (min_pos[i] - hp.base)) : T(0);
    pos_offset[i] = hp.alpha * hp.base - pos_shift[i];
  }

  // 4. the hard positives' sums from the band again, with max_neg known
  for_each_tile<T>(plan.band, so, [&](const Tile& t, const at::Tensor& s) {
    const T* sv = s.data_ptr<T>();
    for (int64_t k = 0; k < t.rows; ++k) {
      const int64_t i = t.row + k, b = t.first_pair(k);
      const UpperSums<T> r = sum_positives(sv + k * t.cols + b, y + t.col + b, t.cols - b, y[i], pos_limit[i],
                                           pos_offset[i], pos_limit.data() + t.col + b, pos_offset.data() + t.col + b,
                                           pos_sum.data() + t.col + b, pos_count.data() + t.col + b, hp);
      pos_sum[i] += r.sum;
      pos_count[i] += static_cast<PairCount<T>>(r.count);
    }
  });

  // 5. per anchor, in the caller's row order: docs/semantics.md "Loss"
  const int64_t* order = so.order.data_ptr<int64_t>();
  constexpr T nan = std::numeric_limits<T>::quiet_NaN();
  for (int64_t i = 0; i < n; ++i) {
    const bool is_bad = !(bad[i] == 0);
    const T A = is_bad ? nan : simd::log1p_shifted(pos_shift[i], pos_sum[i]);
    const T B = is_bad ? nan : lse_neg[i];
    const int64_t o = order[i];
    stats[kMinPos * n + o] = min_pos[i];
    stats[kMaxNeg * n + o] = max_neg[i];
    stats[kLsePos * n + o] = A;
    stats[kLseNeg * n + o] = B;
    counts[o] = is_bad ? 0 : pos_count[i];
    counts[n + o] = is_bad ? 0 : neg_count[i];
    loss[o] = A / hp.alpha + B / hp.beta;
  }
}

template <typename T>
void self_backward(const at::Tensor& x, const at::Tensor& ids, const Hyper<T>& hp, const T* g, const T* stats,
                   at::Tensor& dx) {
  const Sorted so = sort_by_label(x, ids);
  const Plan plan = make_plan(so);
  const int64_t n = x.size(0);
  const int32_t* y = so.y.data();
  const int64_t* order = so.order.data_ptr<int64_t>();

  // each anchor's PairWeights, as arrays in sorted order (for G_ji on the column side)
  std::vector<T> weights(6 * n);
  bool any_bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = order[i];
    const RowStats<T> rs = row_stats(stats, n, o);
    any_bad = any_bad || std::isnan(rs.A) || std::isnan(rs.B);
    const PairWeights<T> w = pair_weights(rs, hp, g[o]);
    const T values[6] = {w.pos_limit, w.neg_limit, w.pos_shift, w.neg_shift, w.pos_coef, w.neg_coef};
    for (int c = 0; c < 6; ++c) weights[c * n + i] = values[c];
  }
  if (any_bad) {  // docs/semantics.md "Non-finite inputs": G_ij = NaN for every j of a bad anchor i, so every
    dx.fill_(std::numeric_limits<T>::quiet_NaN());  // row of (G + G^T) X is NaN
    return;
  }
  const T* wv = weights.data();
  const ColumnWeights<T> cols{wv, wv + n, wv + 2 * n, wv + 3 * n, wv + 4 * n, wv + 5 * n};
  auto row_weights = [&](int64_t i) {
    return PairWeights<T>{cols.pos_limit[i], cols.neg_limit[i], cols.pos_shift[i],
                          cols.neg_shift[i], cols.pos_coef[i],  cols.neg_coef[i]};
  };

  at::Tensor sorted_dx = at::zeros_like(so.x);
  const int64_t d = x.size(1);
  const double share = sparse_share(kSparseShare);
  auto tile_gradient = [&](bool positives) {
    return [&, positives](const Tile& t, at::Tensor& s) {
      T* sv = s.data_ptr<T>();
      // negatives: one exp per pair when the tile's anchors' shifts (-beta base - B) are close, G = coef
      // exp(beta s + shift) = coef exp(shift - lo) * exp(beta s + lo), the last <= 1 for a mined pair (z <= B)
      const auto [lo, hi] = positives ? std::pair<T, T>(0, 0) : shift_range(cols.neg_shift, t);
      const bool shared = !positives && hi - lo <= kSharedRange<T>;
      std::vector<T> col_coef(shared ? t.cols : 0), row_coef(shared ? t.rows : 0);
      if (shared) {
        scaled_exps(cols.neg_shift + t.col, cols.neg_coef + t.col, t.cols, lo, T(1), col_coef.data());
        scaled_exps(cols.neg_shift + t.row, cols.neg_coef + t.row, t.rows, lo, T(1), row_coef.data());
      }
      for (int64_t k = 0; k < t.rows; ++k) {
        const int64_t i = t.row + k, b = t.first_pair(k);
        T* row = sv + k * t.cols;
        std::fill(row, row + b, T(0));  // (i, j <= i) on the diagonal: the pair's element is (j, i), or no pair
        if (shared) {
          upper_negative_weights_shared(row + b, y + t.col + b, t.cols - b, y[i], cols.neg_limit[i],
                                        row_coef[k], lo,
                                        cols.neg_limit + t.col + b, col_coef.data() + b, hp);
        } else {
          upper_weights(row + b, y + t.col + b, t.cols - b, y[i], row_weights(i), cols.offset(t.col + b), hp,
                        positives);
        }
      }
      const int64_t nnz = count_nonzeros(sv, t.rows * t.cols);
      if (nnz <= share * t.rows * t.cols) {
        const T* xv = so.x.data_ptr<T>();
        T* dxv = sorted_dx.data_ptr<T>();
        sparse_tile_update(sv, t.rows, t.cols, nnz, xv + t.row * d, xv + t.col * d, d, dxv + t.row * d,
                           dxv + t.col * d);
        return;
      }
      sorted_dx.narrow(0, t.row, t.rows).addmm_(s, so.x.narrow(0, t.col, t.cols));    // dX_i += W_ij X_j
      sorted_dx.narrow(0, t.col, t.cols).addmm_(s.t(), so.x.narrow(0, t.row, t.rows));  // dX_j += W_ij X_i
    };
  };
  for_each_tile<T>(plan.band, so, tile_gradient(true));
  for_each_tile<T>(plan.sweep, so, tile_gradient(false));
  dx.index_copy_(0, so.order, sorted_dx);
}

template void self_forward<float>(const at::Tensor&, const at::Tensor&, const Hyper<float>&, float*, float*,
                                  int64_t*);
template void self_forward<double>(const at::Tensor&, const at::Tensor&, const Hyper<double>&, double*, double*,
                                   int64_t*);
template void self_backward<float>(const at::Tensor&, const at::Tensor&, const Hyper<float>&, const float*,
                                   const float*, at::Tensor&);
template void self_backward<double>(const at::Tensor&, const at::Tensor&, const Hyper<double>&, const double*,
                                    const double*, at::Tensor&);

}  // namespace ms_fused::cpu
