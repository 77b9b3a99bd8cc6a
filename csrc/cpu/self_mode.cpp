// Self mode of the CPU kernels (docs/semantics.md), using the symmetry of S = X X^T.
//
// The rows are put in label order, so that each anchor's positives are one contiguous segment. Every pair
// (i, j), i < j, then gets its similarity from exactly one product element, which serves both anchor i
// (row side) and anchor j (column side):
// - a positive pair from the *band*: the dots within a few whole small label segments, or for a large
//   segment its tiles like the sweep's; min_pos and the hard positives cost a band, not a pass;
// - a negative pair from the *sweep*: the tiles (I, J), I <= J, of the row blocks, half a product of S.
// The forward runs: band (min_pos), sweep (max_neg and the hard negatives' sums, with min_pos known), band
// again (the hard positives' sums, with max_neg known). The backward recomputes the same tiles, turns each
// into G_ij + G_ji in place and multiplies it both ways: dX_I += W X_J, dX_J += W^T X_I (over its nonzeros only
// where they are few: sparse_update.h).
//
// Tiles run in rounds in which no two tiles touch the same rows (the circle method of round-robin
// tournaments pairs every two blocks once), so a tile updates its rows' accumulators, and adds to their
// rows of dX, with no other tile at the same time: no atomics, no per-thread copies, and every row's sums
// run in round order, whatever the thread count. Forward and backward cut the same tiles, so each pair's
// similarity is bit for bit the one the forward mined.
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

namespace ms_fused::cpu {
namespace {

// Rows per block: up to 512 where a tile's similarities and its two blocks of rows take at most kTileBytes
// (they stay in a core's L2 cache: float32 at D <= 128), else up to 256 (a 256 x 256 x D product already runs
// near full speed, a larger one amortises its packing better); fewer for a count of blocks that is a multiple
// of twice the thread count (every round then has whole tiles for every thread), never below 32.
constexpr int64_t kLargeBlockRows = 512, kBlockRows = 256, kMinBlockRows = 32;
constexpr int64_t kTileBytes = 1536 * 1024;
// Small label segments are gathered into band tiles of up to this many rows, whose similarities are only the
// dots within each segment (a tile of r rows still takes r x r elements in the passes: r = 64 keeps that a
// small share of a pass while a tile holds many segments)
constexpr int64_t kBandRows = 64;


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

struct Tile {  // rows [row, row + rows) against columns [col, col + cols); on the diagonal, only j > i counts
  int64_t row, rows, col, cols;
  bool segments = false;  // whole small label segments on the diagonal: only their pairs are computed
  bool diagonal() const { return row == col; }
  // the first column of row k that holds a pair (right of the diagonal on a diagonal tile)
  int64_t first_pair(int64_t k) const { return diagonal() ? k + 1 : 0; }
};
using Rounds = std::vector<std::vector<Tile>>;

struct Sorted {
  at::Tensor order;              // int64 (N,): the original row at each sorted position
  at::Tensor x;                  // (N, D) the rows in label order
  std::vector<int32_t> y;        // their classes, numbered by first row
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

// Adds the tiles of blocks [start, end) cut in blocks of `size` rows to `rounds` from round `first` on:
// the diagonal tiles in round `first`, then every pair of blocks once, each block once per round (with an
// odd count, a ghost block sits out one pair per round).
void add_block_rounds(Rounds& rounds, size_t first, int64_t start, int64_t end, int64_t size) {
  const int64_t count = divup(end - start, size);
  const int64_t m = count + count % 2;
  if (rounds.size() < first + m) rounds.resize(first + m);
  auto tile = [&](int64_t a, int64_t b) {
    const int64_t r = start + std::min(a, b) * size, c = start + std::max(a, b) * size;
    return Tile{r, std::min(size, end - r), c, std::min(size, end - c)};
  };
  for (int64_t b = 0; b < count; ++b) rounds[first].push_back(tile(b, b));
  for (int64_t r = 0; r < m - 1; ++r) {
    auto add = [&](int64_t a, int64_t b) {
      if (a < count && b < count) rounds[first + 1 + r].push_back(tile(a, b));
    };
    add(m - 1, r);
    for (int64_t k = 1; k < m / 2; ++k) add((r + k) % (m - 1), (r - k + m - 1) % (m - 1));
  }
}

int64_t block_rows(int64_t n, int64_t d, int64_t element_bytes) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t large = kLargeBlockRows;
  const int64_t most = (large * large + 2 * large * d) * element_bytes <= kTileBytes ? large : kBlockRows;
  const int64_t count = divup(divup(n, most), 2 * threads) * 2 * threads;
  return std::max(divup(n, count), std::min(n, kMinBlockRows));
}

struct Plan {
  Rounds band, sweep;
};

Plan make_plan(const Sorted& so) {
  Plan plan;
  const int64_t n = static_cast<int64_t>(so.y.size());
  const int64_t rows = block_rows(n, so.x.size(1), so.x.element_size());
  add_block_rounds(plan.sweep, 0, 0, n, rows);
  plan.band.resize(1);
  for (int64_t a = 0; a < n;) {
    int64_t hi = so.seg_end[a];
    if (hi - a > kBandRows) {  // a large segment: tiled like the sweep, its rounds beside the others'
      add_block_rounds(plan.band, 0, a, hi, rows);
    } else {  // whole small segments, one tile
      while (hi < n && so.seg_end[hi] - a <= kBandRows) hi = so.seg_end[hi];
      plan.band[0].push_back({a, hi - a, a, hi - a, true});
    }
    a = hi;
  }
  return plan;
}

// The smallest and largest finite shift of a tile's anchors, rows and columns ((inf, -inf) when none is finite:
// -inf marks an anchor without a negative so far)
template <typename T>
std::pair<T, T> shift_range(const T* shift, const Tile& t) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  T lo = inf, hi = -inf;
  auto widen = [&](int64_t i) {
    if (shift[i] > -inf) lo = std::min(lo, shift[i]), hi = std::max(hi, shift[i]);
  };
  for (int64_t k = 0; k < t.rows; ++k) widen(t.row + k);
  for (int64_t q = 0; q < t.cols; ++q) widen(t.col + q);
  return {lo, hi};
}

// A tile's similarities into s (rows x cols, contiguous). On the diagonal only j > i is read (and S_ii): the
// product of the top half of the rows with every column and of the bottom half with the bottom half leaves
// out a quarter of the tile; the elements left out are never read.
template <typename T>
void tile_similarities(const Tile& t, const Sorted& so, at::Tensor& s) {
  const at::Tensor& x = so.x;
  if (t.segments) {  // a few dots per row: a product would compute rows / segment as many
    segment_similarities(x.data_ptr<T>(), x.size(1), so.seg_end.data(), t.row, t.rows, s.data_ptr<T>());
  } else if (t.diagonal() && t.rows >= 2 * kMinBlockRows) {
    const int64_t h = t.rows / 2;
    at::Tensor top = s.narrow(0, 0, h), bottom = s.narrow(0, h, t.rows - h).narrow(1, h, t.rows - h);
    at::mm_out(top, x.narrow(0, t.row, h), x.narrow(0, t.col, t.cols).t());
    at::mm_out(bottom, x.narrow(0, t.row + h, t.rows - h), x.narrow(0, t.col + h, t.cols - h).t());
  } else {
    at::mm_out(s, x.narrow(0, t.row, t.rows), x.narrow(0, t.col, t.cols).t());
  }
}

// body(tile, S) for every tile, round after round, the tiles of a round taken by the threads one at a time
// (which thread computes a tile does not change its bits); S is the tile's similarities
// (tile_similarities): the forward and the backward make the same call for the same tile, so they get the
// same bits.
template <typename T, typename Body>
void for_each_tile(const Rounds& rounds, const Sorted& so, const Body& body) {
  const at::ThreadLocalState caller_state;  // e.g. autograd already handled: worker threads must know it too
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  for (const std::vector<Tile>& round : rounds) {
    int64_t most = 0;
    for (const Tile& t : round) most = std::max(most, t.rows * t.cols);
    std::atomic<size_t> next{0};
    at::parallel_for(0, std::min<int64_t>(threads, round.size()), 1, [&](int64_t, int64_t) {
      at::ThreadLocalStateGuard state_guard(caller_state);
      at::Tensor buffer = at::empty({most}, so.x.options());
      for (size_t k = next++; k < round.size(); k = next++) {
        const Tile& tile = round[k];
        at::Tensor s = buffer.narrow(0, 0, tile.rows * tile.cols).view({tile.rows, tile.cols});
        tile_similarities<T>(tile, so, s);
        body(tile, s);
      }
    });
  }
}

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
