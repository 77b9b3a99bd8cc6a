// Self mode of the pair-weighting losses over the tiles of triangle.h: every pair (i, j), i < j, gets its
// similarity from one element of a sweep tile, which serves anchor i (row side) and anchor j (column side).
//
// Forward: each tile is scanned for its anchors' largest logit of each kind (positives, negatives), which
// raises their shifts (a sum kept so far is rescaled), then summed: e^{z - shift} per anchor and kind, and the
// positive logits. Where the tile's anchors' shifts of a kind lie within kSharedRange, the pair's two anchors
// share one exp, e^{z - hi} (hi their largest shift), each anchor's sum scaled by e^{hi - shift} after the tile.
// The per-anchor log-sum-exps then give each loss its loss and statistics (pair_losses.h finish); NT-Xent sums
// its positive pairs' terms over the band once more, with its L_i known.
// Backward: each tile recomputed, turned into W = G_ij + G_ji in place (one exp per pair where the shifts
// allow it and the loss's weights are linear in the exp), and multiplied both ways: dX_I += W X_J,
// dX_J += W^T X_I. A step is about two products of the size of S.
#include "pair_self_mode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "pair_losses.h"
#include "pair_upper.h"
#include "triangle.h"

namespace ms_fused::cpu {
namespace {

using namespace triangle;

// Two anchors share one exp when their shifts differ by at most this: a term then lost to underflow is below
// e^-37 (float), e^-208 (double) of its anchor's largest term (as self_mode.cpp's negatives)
template <typename T>
constexpr T kSharedRange = sizeof(T) == 4 ? T(50) : T(500);

// Row k of a tile holds pairs in columns [first, cols); its positives (the rows are in label order) are
// [begin, end), the negatives [first, begin) and [end, cols)
struct RowRanges {
  int64_t first, begin, end;
};

struct Segments {  // each sorted row's label segment [begin, end)
  std::vector<int64_t> begin;
  const std::vector<int64_t>& end;
  RowRanges of(const Tile& t, int64_t k) const {
    const int64_t i = t.row + k, first = t.first_pair(k);
    const int64_t b = std::clamp(begin[i] - t.col, first, t.cols);
    return {first, b, std::clamp(end[i] - t.col, b, t.cols)};
  }
};

Segments segments(const Sorted& so) {
  const int64_t n = static_cast<int64_t>(so.y.size());
  Segments seg{std::vector<int64_t>(n), so.seg_end};
  for (int64_t i = 0; i < n; ++i) seg.begin[i] = i > 0 && so.y[i - 1] == so.y[i] ? seg.begin[i - 1] : i;
  return seg;
}

template <typename T>
PairRow<T> finish(const PairParams<T>& p, const pair_losses::SetSums<T>& sums) {
  MS_FUSED_WITH_LOSS(p, return loss.finish(sums, static_cast<const T*>(nullptr), nullptr, 0, 0, -1))
}

template <typename T>
pair_losses::AnchorWeights<T> anchor_weights(const PairParams<T>& p, T stat0, T stat1, T g) {
  MS_FUSED_WITH_LOSS(p, return loss.anchor_weights(stat0, stat1, g))
}

}  // namespace

template <typename T>
void pair_self_forward(const at::Tensor& x, const at::Tensor& ids, const PairParams<T>& p, T* loss, T* stats,
                       int64_t* counts) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  const Sorted so = sort_by_label(x, ids);
  const Plan plan = make_plan(so);
  const Segments seg = segments(so);
  const int64_t n = x.size(0);

  // per anchor (sorted order) and kind (0: positives, 1: negatives): the shift and the sum of e^{z - shift}
  std::vector<T> shift[2] = {std::vector<T>(n, -inf), std::vector<T>(n, -inf)};
  std::vector<T> sum[2] = {std::vector<T>(n, 0), std::vector<T>(n, 0)}, logit_sum(n, 0);
  auto raise = [&](int kind, int64_t i, T m) {
    if (m > shift[kind][i]) {
      sum[kind][i] *= std::exp(shift[kind][i] - m);  // 0 (or NaN) times e^-inf while there was no shift
      shift[kind][i] = m;
    }
  };

  for_each_tile<T>(plan.sweep, so, [&](const Tile& t, const at::Tensor& s) {
    const T* sv = s.data_ptr<T>();
    std::vector<T> row_max[2] = {std::vector<T>(t.rows), std::vector<T>(t.rows)};
    std::vector<T> col_max[2] = {std::vector<T>(t.cols, -inf), std::vector<T>(t.cols, -inf)};
    for (int64_t k = 0; k < t.rows; ++k) {
      const RowRanges r = seg.of(t, k);
      const T* row = sv + k * t.cols;
      row_max[0][k] = upper_scan(row + r.begin, r.end - r.begin, true, p, col_max[0].data() + r.begin);
      const T left = upper_scan(row + r.first, r.begin - r.first, false, p, col_max[1].data() + r.first);
      const T right = upper_scan(row + r.end, t.cols - r.end, false, p, col_max[1].data() + r.end);
      row_max[1][k] = std::max(left, right);
    }
    T hi[2];
    bool shared[2];
    for (int kind = 0; kind < 2; ++kind) {
      for (int64_t k = 0; k < t.rows; ++k) raise(kind, t.row + k, row_max[kind][k]);
      for (int64_t q = 0; q < t.cols; ++q) raise(kind, t.col + q, col_max[kind][q]);
      const auto [lo, top] = shift_range(shift[kind].data(), t);
      hi[kind] = top, shared[kind] = top - lo <= kSharedRange<T>;
    }
    std::vector<T> row_sum[2] = {std::vector<T>(t.rows), std::vector<T>(t.rows)}, row_logits(t.rows);
    std::vector<T> col_sum[2] = {std::vector<T>(t.cols, 0), std::vector<T>(t.cols, 0)}, col_logits(t.cols, 0);
    for (int64_t k = 0; k < t.rows; ++k) {
      const RowRanges r = seg.of(t, k);
      const T* row = sv + k * t.cols;
      const int64_t i = t.row + k;
      auto sums = [&](int kind, int64_t from, int64_t to, T* into) {
        const T row_shift = shared[kind] ? hi[kind] : shift[kind][i];
        const T* col_shift = shared[kind] ? nullptr : shift[kind].data() + t.col + from;
        upper_sums(row + from, to - from, kind == 0, p, row_shift, col_shift, into, col_sum[kind].data() + from,
                   col_logits.data() + from);
      };
      T pos[2] = {0, 0}, neg[2] = {0, 0};
      sums(0, r.begin, r.end, pos);
      sums(1, r.first, r.begin, neg);
      sums(1, r.end, t.cols, neg);
      row_sum[0][k] = pos[0], row_logits[k] = pos[1], row_sum[1][k] = neg[0];
    }
    for (int kind = 0; kind < 2; ++kind) {
      if (shared[kind]) {  // terms taken as e^{z - hi}: each anchor's times e^{hi - shift} (0 without a shift)
        std::vector<T> row_factor(t.rows), col_factor(t.cols);
        scaled_exps(shift[kind].data() + t.row, static_cast<const T*>(nullptr), t.rows, hi[kind], T(-1),
                    row_factor.data());
        scaled_exps(shift[kind].data() + t.col, static_cast<const T*>(nullptr), t.cols, hi[kind], T(-1),
                    col_factor.data());
        for (int64_t k = 0; k < t.rows; ++k) row_sum[kind][k] *= row_factor[k];
        for (int64_t q = 0; q < t.cols; ++q) col_sum[kind][q] *= col_factor[q];
      }
      for (int64_t k = 0; k < t.rows; ++k) sum[kind][t.row + k] += row_sum[kind][k];
      for (int64_t q = 0; q < t.cols; ++q) sum[kind][t.col + q] += col_sum[kind][q];
    }
    for (int64_t k = 0; k < t.rows; ++k) logit_sum[t.row + k] += row_logits[k];
    for (int64_t q = 0; q < t.cols; ++q) logit_sum[t.col + q] += col_logits[q];
  });

  std::vector<PairRow<T>> rows(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t size = seg.end[i] - seg.begin[i];
    const int64_t n_pos = size - 1, n_neg = n - size;
    const T lse_pos = n_pos > 0 ? shift[0][i] + std::log(sum[0][i]) : -inf;
    const T lse_neg = n_neg > 0 ? shift[1][i] + std::log(sum[1][i]) : -inf;
    rows[i] = finish(p, pair_losses::SetSums<T>{lse_pos, lse_neg, logit_sum[i], n_pos, n_neg});
  }

  if (p.loss == PairLoss::kNTXent) {  // per positive pair softplus(L_i - z) and its sigmoid, over the band
    const T inv_t = T(1) / p.p0;
    for_each_tile<T>(plan.band, so, [&](const Tile& t, const at::Tensor& s) {
      const T* sv = s.data_ptr<T>();
      for (int64_t k = 0; k < t.rows; ++k) {
        const RowRanges r = seg.of(t, k);
        PairRow<T>& a = rows[t.row + k];
        for (int64_t c = r.begin; c < r.end; ++c) {
          const T z = sv[k * t.cols + c] * inv_t;
          PairRow<T>& b = rows[t.col + c];
          a.loss += pair_losses::softplus(a.stat0 - z), a.stat1 += pair_losses::sigmoid(a.stat0 - z);
          b.loss += pair_losses::softplus(b.stat0 - z), b.stat1 += pair_losses::sigmoid(b.stat0 - z);
        }
      }
    });
  }

  const int64_t* order = so.order.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = order[i];
    loss[o] = rows[i].loss;
    stats[o] = rows[i].stat0;
    stats[n + o] = rows[i].stat1;
    counts[o] = rows[i].n_pos;
    counts[n + o] = rows[i].n_neg;
  }
}

template <typename T>
void pair_self_backward(const at::Tensor& x, const at::Tensor& ids, const PairParams<T>& p, const T* g,
                        const T* stats, at::Tensor& dx) {
  const Sorted so = sort_by_label(x, ids);
  const Plan plan = make_plan(so);
  const Segments seg = segments(so);
  const int64_t n = x.size(0);
  const int64_t* order = so.order.data_ptr<int64_t>();

  // per anchor (sorted order) and kind: shift, coef (and SupCon's positives' extra) of pair_losses.h
  std::vector<T> shift[2] = {std::vector<T>(n), std::vector<T>(n)}, coef[2] = {std::vector<T>(n), std::vector<T>(n)};
  std::vector<T> extra(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = order[i];
    const pair_losses::AnchorWeights<T> w = anchor_weights(p, stats[o], stats[n + o], g[o]);
    shift[0][i] = w.pos.shift, coef[0][i] = w.pos.coef, extra[i] = w.pos.extra;
    shift[1][i] = w.neg.shift, coef[1][i] = w.neg.coef;
  }
  const bool shareable[2] = {upper_shareable(true, p), upper_shareable(false, p)};

  at::Tensor sorted_dx = at::zeros_like(so.x);
  for_each_tile<T>(plan.sweep, so, [&](const Tile& t, at::Tensor& s) {
    T* sv = s.data_ptr<T>();
    T hi[2];
    bool shared[2];
    std::vector<T> row_coef[2], col_coef[2];  // shared: each anchor's coef times e^{hi - shift}
    for (int kind = 0; kind < 2; ++kind) {
      const auto [lo, top] = shift_range(shift[kind].data(), t);
      hi[kind] = top, shared[kind] = shareable[kind] && top - lo <= kSharedRange<T>;
      if (!shared[kind]) continue;
      auto scaled = [&](int64_t i) {
        return coef[kind][i] == 0 ? T(0) : coef[kind][i] * std::exp(hi[kind] - shift[kind][i]);
      };
      row_coef[kind].resize(t.rows), col_coef[kind].resize(t.cols);
      for (int64_t k = 0; k < t.rows; ++k) row_coef[kind][k] = scaled(t.row + k);
      for (int64_t q = 0; q < t.cols; ++q) col_coef[kind][q] = scaled(t.col + q);
    }
    for (int64_t k = 0; k < t.rows; ++k) {
      const RowRanges r = seg.of(t, k);
      T* row = sv + k * t.cols;
      const int64_t i = t.row + k;
      std::fill(row, row + r.first, T(0));  // (i, j <= i) on the diagonal: the pair's element is (j, i), or no pair
      auto weights = [&](int kind, int64_t from, int64_t to) {
        const T* col_extra = kind == 0 ? extra.data() + t.col + from : nullptr;
        const T row_extra = kind == 0 ? extra[i] : T(0);
        if (shared[kind]) {
          upper_weights(row + from, to - from, kind == 0, p, hi[kind], row_coef[kind][k], row_extra, nullptr,
                        col_coef[kind].data() + from, col_extra);
        } else {
          upper_weights(row + from, to - from, kind == 0, p, shift[kind][i], coef[kind][i], row_extra,
                        shift[kind].data() + t.col + from, coef[kind].data() + t.col + from, col_extra);
        }
      };
      weights(0, r.begin, r.end);
      weights(1, r.first, r.begin);
      weights(1, r.end, t.cols);
    }
    sorted_dx.narrow(0, t.row, t.rows).addmm_(s, so.x.narrow(0, t.col, t.cols));    // dX_i += W_ij X_j
    sorted_dx.narrow(0, t.col, t.cols).addmm_(s.t(), so.x.narrow(0, t.row, t.rows));  // dX_j += W_ij X_i
  });
  dx.index_copy_(0, so.order, sorted_dx);
}

template void pair_self_forward<float>(const at::Tensor&, const at::Tensor&, const PairParams<float>&, float*, float*,
                                       int64_t*);
template void pair_self_forward<double>(const at::Tensor&, const at::Tensor&, const PairParams<double>&, double*,
                                        double*, int64_t*);
template void pair_self_backward<float>(const at::Tensor&, const at::Tensor&, const PairParams<float>&, const float*,
                                        const float*, at::Tensor&);
template void pair_self_backward<double>(const at::Tensor&, const at::Tensor&, const PairParams<double>&,
                                         const double*, const double*, at::Tensor&);

}  // namespace ms_fused::cpu
