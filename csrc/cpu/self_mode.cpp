// Self mode of the CPU kernels (docs/semantics.md), using the symmetry of S = X X^T.
//
// The rows are put in label order, so that each anchor's positives are one contiguous segment. Every pair
// (i, j), i < j, then gets its similarity from exactly one product element, which serves both anchor i
// (row side) and anchor j (column side):
// - a positive pair from the *band*: products of a few whole label segments (or pieces of a large one)
//   against the rest of their segments; min_pos and the hard positives cost a band, not a pass;
// - a negative pair from the *sweep*: for each row block, one product against all later rows (the upper
//   trapezoid), so one pass of S is half a full product.
// The forward runs: band (min_pos), sweep (max_neg and the hard negatives' sums, with min_pos known), band
// again (the hard positives' sums, with max_neg known). The backward recomputes the same products, turns each
// into G_ij + G_ji in place and multiplies it both ways: rows += W X_cols, cols += W^T X_rows.
//
// Determinism: the blocks and band chunks are shared out among a fixed number of groups (the thread count at
// the call), each with its own column accumulators; the groups' accumulators are added in group order. So
// the result depends on the thread count, never on timing. Backward and forward cut the same products, so
// each pair's similarity is bit for bit the one the forward mined.
#include "self_mode.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "self_passes.h"
#include "simd_math.h"

namespace ms_fused::cpu {
namespace {

// Sweep rows per block as in the reference-mode kernel: up to 256, fewer when the (rows x N) buffer would
// pass this budget, never below 32.
constexpr int64_t kBlockBytes = 32 << 20;
constexpr int64_t kMinBlockRows = 32, kMaxBlockRows = 256;
// Small label segments are gathered into band products of about this many rows (a product of r rows
// computes r x r similarities for segments of k rows each: r / k times the pairs it needs, and r = 64
// keeps it a small share of a pass while the products stay efficient)
constexpr int64_t kBandRows = 64;

int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Span {  // rows [row, row + rows) against columns [row, col_end)
  int64_t row, rows, col_end;
  int64_t width() const { return col_end - row; }
};

struct Plan {
  int64_t n = 0, groups = 1, buffer = 0;  // buffer: the largest rows x width
  std::vector<Span> sweep, band;
  std::vector<std::vector<int64_t>> sweep_of, band_of;  // each group's spans, in the order it runs them
};

struct Sorted {
  at::Tensor order;         // int64 (N,): the original row at each sorted position
  at::Tensor x;             // (N, D) the rows in label order
  std::vector<int32_t> y;   // their classes, numbered by first row
  std::vector<int64_t> seg_end;  // end of each row's label segment
};

// Classes are ordered by their first row, not by label value, so that labels changed in a way that keeps
// equal labels equal give the same order, and the same bits (docs/semantics.md "Reproducibility").
Sorted sort_by_label(const at::Tensor& x, const at::Tensor& ids) {
  const int64_t n = x.size(0);
  const int32_t* id = ids.data_ptr<int32_t>();
  const int32_t labels = n == 0 ? 0 : *std::max_element(id, id + n) + 1;
  std::vector<int32_t> rank(labels, -1);
  int32_t classes = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (rank[id[i]] < 0) rank[id[i]] = classes++;
  }
  std::vector<int64_t> start(classes + 1, 0);
  for (int64_t i = 0; i < n; ++i) ++start[rank[id[i]] + 1];
  for (int32_t c = 0; c < classes; ++c) start[c + 1] += start[c];
  Sorted so;
  so.order = at::empty({n}, at::kLong);
  int64_t* order = so.order.data_ptr<int64_t>();
  so.y.resize(n);
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n; ++i) {  // stable: a class keeps its rows' order
    const int32_t c = rank[id[i]];
    const int64_t k = next[c]++;
    order[k] = i;
    so.y[k] = c;
  }
  so.seg_end.resize(n);
  for (int64_t k = 0; k < n; ++k) so.seg_end[k] = start[so.y[k] + 1];
  so.x = x.index_select(0, so.order);
  return so;
}

// The group that runs each span: the sweep's blocks in pairs (b, count - 1 - b), whose trapezoids add up to
// the same area; the band's chunks to the group with the least work so far.
Plan make_plan(const Sorted& so, int64_t elem_size) {
  Plan plan;
  const int64_t n = static_cast<int64_t>(so.y.size());
  plan.n = n;
  plan.groups = std::max<int64_t>(1, at::get_num_threads());
  const int64_t groups = plan.groups;
  const int64_t widest = std::clamp(kBlockBytes / std::max<int64_t>(1, n * elem_size), kMinBlockRows, kMaxBlockRows);
  int64_t count = divup(divup(n, widest), 2 * groups) * 2 * groups;
  const int64_t rows = std::max(divup(n, count), std::min(n, kMinBlockRows));
  count = divup(n, rows);
  plan.sweep_of.resize(groups);
  plan.band_of.resize(groups);
  for (int64_t b = 0; b < count; ++b) plan.sweep.push_back({b * rows, std::min(rows, n - b * rows), n});
  for (int64_t p = 0; p < count / 2; ++p) {
    plan.sweep_of[p % groups].push_back(p);
    plan.sweep_of[p % groups].push_back(count - 1 - p);
  }
  if (count % 2 == 1) plan.sweep_of[(count / 2) % groups].push_back(count / 2);

  for (int64_t a = 0; a < n;) {
    int64_t hi = so.seg_end[a];
    int64_t take = hi - a;
    if (take > kBandRows) {
      take = std::min(rows, take);  // a piece of a large segment, against the rest of the segment
    } else {
      while (hi < n && so.seg_end[hi] - a <= kBandRows) hi = so.seg_end[hi];
      take = hi - a;
    }
    plan.band.push_back({a, take, hi});
    a += take;
  }
  std::vector<int64_t> load(groups, 0);
  for (int64_t c = 0; c < static_cast<int64_t>(plan.band.size()); ++c) {
    const int64_t g = std::min_element(load.begin(), load.end()) - load.begin();
    plan.band_of[g].push_back(c);
    load[g] += plan.band[c].rows * plan.band[c].width();
  }
  for (const Span& s : plan.sweep) plan.buffer = std::max(plan.buffer, s.rows * s.width());
  for (const Span& s : plan.band) plan.buffer = std::max(plan.buffer, s.rows * s.width());
  return plan;
}

// body(g) for every group, the groups shared out among the threads (each group's products and passes run
// on one thread; at::mm inside a parallel region runs on that thread)
template <typename Body>
void for_each_group(int64_t groups, const Body& body) {
  const at::ThreadLocalState caller_state;  // e.g. autograd already handled: worker threads must know it too
  at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t g = first; g < last; ++g) body(g);
  });
}

// S of a span into the front of `buffer`, as a contiguous (rows x width) matrix: the forward and the backward
// make the same call for the same span, so they get the same bits.
at::Tensor product(const at::Tensor& buffer, const Span& s, const at::Tensor& x) {
  at::Tensor out = buffer.narrow(0, 0, s.rows * s.width()).view({s.rows, s.width()});
  at::mm_out(out, x.narrow(0, s.row, s.rows), x.narrow(0, s.row, s.width()).t());
  return out;
}

// Per-group column accumulators of the forward, rows of a (groups, kColRows, N) tensor
enum ColRow : int64_t { kColMin, kColMax, kColShift, kColNegSum, kColPosSum, kColBad, kColRows };
enum CountRow : int64_t { kColNegCount, kColPosCount, kCountRows };

}  // namespace

template <typename T>
void self_forward(const at::Tensor& x, const at::Tensor& ids, const Hyper<T>& hp, T* loss, T* stats, int64_t* counts) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  const Sorted so = sort_by_label(x, ids);
  const Plan plan = make_plan(so, sizeof(T));
  const int64_t n = plan.n, groups = plan.groups;
  const int32_t* y = so.y.data();
  const at::TensorOptions options = x.options();
  const auto count_type = sizeof(T) == 4 ? at::kInt : at::kLong;

  at::Tensor cols = at::empty({groups, kColRows, n}, options);
  cols.select(1, kColMin).fill_(inf);
  cols.select(1, kColMax).fill_(-inf);
  cols.select(1, kColShift).fill_(-inf);
  cols.narrow(1, kColNegSum, kColRows - kColNegSum).zero_();
  at::Tensor col_counts = at::zeros({groups, kCountRows, n}, options.dtype(count_type));
  auto col = [&](int64_t g, ColRow r) { return cols.data_ptr<T>() + (g * kColRows + r) * n; };
  auto col_count = [&](int64_t g, CountRow r) {
    return col_counts.data_ptr<PairCount<T>>() + (g * kCountRows + r) * n;
  };
  at::Tensor buffers = at::empty({groups, std::max<int64_t>(1, plan.buffer)}, options);

  // row-side values (sorted order), each written by the one span that holds the row
  std::vector<T> row_min(n, inf), row_max(n, -inf), row_shift(n, 0), row_bad(n, 0), neg_sum(n, 0), pos_sum(n, 0);
  std::vector<int64_t> neg_count(n, 0), pos_count(n, 0);
  std::vector<T> min_pos(n), max_neg(n), neg_limit(n), pos_limit(n), pos_offset(n), pos_shift(n), lse_neg(n);
  std::vector<char> bad(n);  // not vector<bool>: threads write neighbouring entries

  auto band_pass = [&](bool sums) {
    for_each_group(groups, [&](int64_t g) {
      for (int64_t c : plan.band_of[g]) {
        const Span& sp = plan.band[c];
        const at::Tensor s = product(buffers[g], sp, so.x);
        const T* sv = s.data_ptr<T>();
        const int64_t w = sp.width();
        for (int64_t k = 0; k < sp.rows; ++k) {
          const int64_t i = sp.row + k, len = w - k - 1;
          if (len <= 0) continue;
          const T* row = sv + k * w + k + 1;
          if (!sums) {
            const UpperScan<T> r = scan_positives(row, y + i + 1, len, y[i], col(g, kColMin) + i + 1,
                                                  col(g, kColBad) + i + 1);
            row_min[i] = r.extreme;
            row_bad[i] += r.bad;
          } else {
            const UpperSums<T> r = sum_positives(row, y + i + 1, len, y[i], pos_limit[i], pos_offset[i],
                                                 pos_limit.data() + i + 1, pos_offset.data() + i + 1,
                                                 col(g, kColPosSum) + i + 1, col_count(g, kColPosCount) + i + 1, hp);
            pos_sum[i] = r.sum;
            pos_count[i] = r.count;
          }
        }
      }
    });
  };

  // 1. min_pos from the band: docs/semantics.md "Mining"
  band_pass(false);
  at::parallel_for(0, n, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T m = row_min[i];
      for (int64_t g = 0; g < groups; ++g) m = std::min(m, col(g, kColMin)[i]);
      min_pos[i] = m;
      neg_limit[i] = hp.mining ? m : -inf;
    }
  });

  // 2. the sweep: max_neg and the hard negatives' sums. A sum's terms are exp(z - shift) for the shift of its
  // side: the row's own largest negative in this block, or the group's largest so far for a column (a larger
  // one later rescales what the column has summed).
  const T beta_base = hp.beta * hp.base;
  for_each_group(groups, [&](int64_t g) {
    std::vector<T> tile_max(n), col_offset(n);
    T* cmax = col(g, kColMax);
    T* cshift = col(g, kColShift);
    T* csum = col(g, kColNegSum);
    for (int64_t b : plan.sweep_of[g]) {
      const Span& sp = plan.sweep[b];
      const at::Tensor s = product(buffers[g], sp, so.x);
      const T* sv = s.data_ptr<T>();
      const int64_t w = sp.width();
      std::fill(tile_max.begin(), tile_max.begin() + w, -inf);
      for (int64_t k = 0; k < sp.rows; ++k) {
        const int64_t i = sp.row + k;
        const T self = sv[k * w + k];  // S_ii: no pair, but part of row i of S (docs/semantics.md "Non-finite inputs")
        const UpperScan<T> r = scan_negatives(sv + k * w + k + 1, y + i + 1, w - k - 1, y[i], tile_max.data() + k + 1,
                                              col(g, kColBad) + i + 1);
        row_max[i] = r.extreme;
        row_shift[i] = r.extreme > -inf ? hp.beta * (r.extreme - hp.base) : T(0);
        row_bad[i] += r.bad + (self - self);
      }
      for (int64_t k = 0; k < w; ++k) {
        const int64_t j = sp.row + k;
        const T m = tile_max[k];
        if (m > -inf) {
          const T z = hp.beta * (m - hp.base);
          if (z > cshift[j]) {
            csum[j] = cshift[j] > -inf ? csum[j] * std::exp(cshift[j] - z) : T(0);
            cshift[j] = z;
          }
          cmax[j] = std::max(cmax[j], m);
        }
        col_offset[k] = cshift[j] > -inf ? -beta_base - cshift[j] : T(0);
      }
      for (int64_t k = 0; k < sp.rows; ++k) {
        const int64_t i = sp.row + k;
        const UpperSums<T> r = sum_negatives(sv + k * w + k + 1, y + i + 1, w - k - 1, y[i], neg_limit[i],
                                             -beta_base - row_shift[i], neg_limit.data() + i + 1,
                                             col_offset.data() + k + 1, csum + i + 1,
                                             col_count(g, kColNegCount) + i + 1, hp);
        neg_sum[i] = r.sum;
        neg_count[i] = r.count;
      }
    }
  });

  // 3. combine each anchor's negatives (groups in order): max_neg, B, and the positives' limit and shift
  at::parallel_for(0, n, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T m = row_max[i], b = row_bad[i];
      int64_t count = neg_count[i];
      for (int64_t g = 0; g < groups; ++g) {
        m = std::max(m, col(g, kColMax)[i]);
        b += col(g, kColBad)[i];
        count += col_count(g, kColNegCount)[i];
      }
      const T shift = count > 0 ? std::max(T(0), hp.beta * (m - hp.base)) : T(0);
      T sum = neg_count[i] > 0 ? neg_sum[i] * std::exp(row_shift[i] - shift) : T(0);
      for (int64_t g = 0; g < groups; ++g) {
        if (col_count(g, kColNegCount)[i] > 0) sum += col(g, kColNegSum)[i] * std::exp(col(g, kColShift)[i] - shift);
      }
      max_neg[i] = m;
      neg_count[i] = count;
      lse_neg[i] = simd::log1p_shifted(shift, sum);
      bad[i] = !(b == 0);
      pos_limit[i] = hp.mining ? m : inf;
      const bool any_pos = min_pos[i] < inf && min_pos[i] - hp.epsilon < pos_limit[i];
      pos_shift[i] = any_pos ? std::max(T(0), -hp.alpha * (min_pos[i] - hp.base)) : T(0);
      pos_offset[i] = hp.alpha * hp.base - pos_shift[i];
    }
  });

  // 4. the hard positives' sums from the band again, with max_neg known
  band_pass(true);

  // 5. per anchor, in the caller's row order: docs/semantics.md "Loss"
  const int64_t* order = so.order.data_ptr<int64_t>();
  constexpr T nan = std::numeric_limits<T>::quiet_NaN();
  at::parallel_for(0, n, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T sum = pos_sum[i];
      int64_t count = pos_count[i];
      for (int64_t g = 0; g < groups; ++g) {
        sum += col(g, kColPosSum)[i];
        count += col_count(g, kColPosCount)[i];
      }
      const T A = bad[i] ? nan : simd::log1p_shifted(pos_shift[i], sum);
      const T B = bad[i] ? nan : lse_neg[i];
      const int64_t o = order[i];
      stats[kMinPos * n + o] = min_pos[i];
      stats[kMaxNeg * n + o] = max_neg[i];
      stats[kLsePos * n + o] = A;
      stats[kLseNeg * n + o] = B;
      counts[o] = bad[i] ? 0 : count;
      counts[n + o] = bad[i] ? 0 : neg_count[i];
      loss[o] = A / hp.alpha + B / hp.beta;
    }
  });
}

template <typename T>
void self_backward(const at::Tensor& x, const at::Tensor& ids, const Hyper<T>& hp, const T* g, const T* stats,
                   at::Tensor& dx) {
  const Sorted so = sort_by_label(x, ids);
  const Plan plan = make_plan(so, sizeof(T));
  const int64_t n = plan.n, groups = plan.groups, d = x.size(1);
  const int32_t* y = so.y.data();
  const int64_t* order = so.order.data_ptr<int64_t>();

  // each anchor's PairWeights, as arrays in sorted order (for G_ji on the column side)
  std::vector<T> weights(6 * n);
  bool any_bad = false;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = order[i];
    const RowStats<T> rs{stats[kMinPos * n + o], stats[kMaxNeg * n + o], stats[kLsePos * n + o],
                         stats[kLseNeg * n + o]};
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

  at::Tensor partial = at::zeros({groups, n, d}, x.options());
  at::Tensor buffers = at::empty({groups, std::max<int64_t>(1, plan.buffer)}, x.options());
  for_each_group(groups, [&](int64_t grp) {
    at::Tensor part = partial[grp];
    auto run = [&](const Span& sp, bool positives) {
      at::Tensor s = product(buffers[grp], sp, so.x);
      T* sv = s.data_ptr<T>();
      const int64_t w = sp.width();
      for (int64_t k = 0; k < sp.rows; ++k) {
        const int64_t i = sp.row + k;
        T* row = sv + k * w;
        std::fill(row, row + k + 1, T(0));  // (i, j <= i): the pair's element is (j, i), or no pair
        upper_weights(row + k + 1, y + i + 1, w - k - 1, y[i], row_weights(i), cols.offset(i + 1), hp, positives);
      }
      part.narrow(0, sp.row, sp.rows).addmm_(s, so.x.narrow(0, sp.row, w));        // dX_i += W_ij X_j
      part.narrow(0, sp.row, w).addmm_(s.t(), so.x.narrow(0, sp.row, sp.rows));    // dX_j += W_ij X_i
    };
    for (int64_t b : plan.sweep_of[grp]) run(plan.sweep[b], false);
    for (int64_t c : plan.band_of[grp]) run(plan.band[c], true);
  });
  at::Tensor sorted_dx = partial[0];
  for (int64_t grp = 1; grp < groups; ++grp) sorted_dx.add_(partial[grp]);
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
