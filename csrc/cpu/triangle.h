// The upper triangle of the symmetric S = X X^T in self mode, cut into tiles: the machinery of the MS loss's
// self mode (self_mode.cpp) and the pair-weighting losses' (pair_self_mode.cpp).
//
// The rows are put in label order, so that each anchor's positives are one contiguous segment. Every pair
// (i, j), i < j, gets its similarity from exactly one element of one tile: the *sweep* is the tiles (I, J),
// I <= J, of the row blocks; the *band* covers only the pairs within label segments (a few whole small
// segments per tile, a large segment tiled like the sweep). Tiles run in rounds in which no two tiles touch
// the same rows (the circle method of round-robin tournaments pairs every two blocks once), so a tile updates
// its rows' accumulators, and adds to their rows of dX, with no other tile at the same time: no atomics, no
// per-thread copies, and every row's sums run in round order, whatever the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "row_kernels.h"
#include "self_passes.h"

namespace ms_fused::cpu::triangle {

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
inline Sorted sort_by_label(const at::Tensor& x, const at::Tensor& ids) {
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
inline void add_block_rounds(Rounds& rounds, size_t first, int64_t start, int64_t end, int64_t size) {
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

inline int64_t block_rows(int64_t n, int64_t d, int64_t element_bytes) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t large = kLargeBlockRows;
  const int64_t most = (large * large + 2 * large * d) * element_bytes <= kTileBytes ? large : kBlockRows;
  const int64_t count = divup(divup(n, most), 2 * threads) * 2 * threads;
  return std::max(divup(n, count), std::min(n, kMinBlockRows));
}

struct Plan {
  Rounds band, sweep;
};

inline Plan make_plan(const Sorted& so) {
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

}  // namespace ms_fused::cpu::triangle
