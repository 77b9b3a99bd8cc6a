// CPU kernels of ms_fused::ms_forward / ms_fused::ms_backward (schemas in csrc/ms_fused_ops.cpp). Self mode
// runs the symmetric kernels of self_mode.cpp; this file holds the reference mode (a separate R).
//
// Anchors are processed in row blocks: each block's similarities come from one ATen matrix product into a
// reused (rows x M) buffer, the row passes of row_kernels.cpp run over it in parallel, and the backward
// turns the same buffer into the block's weights G in place before multiplying it back: by dense products,
// or, when few of the block's pairs are mined, over G's nonzeros only (sparse_update.h). Scratch memory is
// O(rows x M); nothing N x M is ever allocated.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "blocks.h"
#include "openmp.h"
#include "row_kernels.h"
#include "self_mode.h"
#include "sparse_update.h"

namespace ms_fused::cpu {
namespace {

// A block's G is multiplied over its nonzeros (sparse_update.h) when at most this share of it is nonzero. G R
// alone (no gradient for R: a memory bank): about where a bank step takes as long either way (AVX-512, D = 128,
// M = 30000: the sparse step 0.8x the dense one at 19% nonzeros, 1.0x at 50%, 1.4x at 82%). G R and G^T Q: the
// self-mode tiles' share, the same two products.
constexpr double kSparseShareRows = 0.5, kSparseShareBoth = 0.25;


template <typename T>
Hyper<T> hyper(double alpha, double beta, double base, double epsilon, bool mining) {
  return {static_cast<T>(alpha), static_cast<T>(beta), static_cast<T>(base), static_cast<T>(epsilon), mining};
}

// Anchor i's entry of ref_self_index (reference mode; self mode runs self_mode.cpp): the column of its own copy
// (removed from P_i), or -1.
int32_t anchor_ref_self_index(const int64_t* ref_self_index, int64_t i) {
  return ref_self_index == nullptr ? -1 : static_cast<int32_t>(ref_self_index[i]);
}

// The calling thread's lists of a block's rows of G, kept for its next block
template <typename T>
std::vector<SparseRow<T>>& thread_rows() {
  thread_local std::vector<SparseRow<T>> rows;
  return rows;
}

// How a block of anchors turns its similarities into G and multiplies it out: row by row, weights() overwrites
// the row with G_i (while it is in the cache, right after the row pass that needs its similarities) and lists
// its nonzeros when the row alone is sparse enough; then multiply() takes the whole block over its nonzeros
// (sparse_update.h), listing the rows left, when at most `share` of the block is nonzero, else by dense
// products. Which path a block takes depends only on its values, so the repeat guarantee holds either way.
template <typename T>
struct BlockGradient {
  const Inputs& in;
  const Hyper<T>& hp;
  double share;  // sparse_share(...), or -1 where the sparse products cannot serve (R of another dtype)
  int64_t start, count, m;
  T* s;  // the block's (count x M) similarities, then its G
  std::vector<SparseRow<T>>& rows;
  std::vector<int64_t> nnz;

  BlockGradient(const Inputs& in, const Hyper<T>& hp, double share, int64_t start, int64_t count, at::Tensor& sim)
      : in(in), hp(hp), share(share), start(start), count(count), m(in.r.size(0)), s(sim.data_ptr<T>()),
        rows(thread_rows<T>()), nnz(count) {
    if (static_cast<int64_t>(rows.size()) < count) rows.resize(count);
  }

  double row_limit() const { return share * static_cast<double>(m); }

  // row k of the block (anchor start + k) from its statistics and g_i
  void weights(int64_t k, const RowStats<T>& stats, T g) {
    const int64_t i = start + k;
    const int64_t* ref_self_index = in.ref_self_index ? in.ref_self_index->data_ptr<int64_t>() : nullptr;
    T* row = s + k * m;
    weight_row(row, in.r_ids.data_ptr<int32_t>(), m, in.q_ids.data_ptr<int32_t>()[i],
               anchor_ref_self_index(ref_self_index, i), pair_weights(stats, hp, g), hp);
    nnz[k] = count_nonzeros(row, m);
    if (nnz[k] <= row_limit()) list_row(row, m, nnz[k], rows[k]);
  }

  // dq_block = G R and, with need_r, dR += G^T Q_block. With need_r the sparse products cut the column blocks
  // in one range per thread (a fixed cut for a given thread count), each range adding to its own rows of dR
  // and to its own partial dq_block, the partials summed in range order.
  void multiply(const at::Tensor& sim, at::Tensor& dq_block, at::Tensor& dr, bool need_q, bool need_r) {
    const at::Tensor q_block = in.q.narrow(0, start, count);
    int64_t total = 0;
    for (int64_t k = 0; k < count; ++k) total += nnz[k];
    if (!(static_cast<double>(total) <= row_limit() * static_cast<double>(count))) {
      if (need_q) times(dq_block, sim, in.r);
      if (need_r) dr.addmm_(sim.t(), q_block);
      return;
    }
    at::parallel_for(0, count, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        if (nnz[k] > row_limit()) list_row(s + k * m, m, nnz[k], rows[k]);
      }
    });
    const int64_t d = in.q.size(1), blocks = divup(m, kSparseBlockCols);
    const T* x_rows = q_block.data_ptr<T>();
    const T* x_cols = in.r.data_ptr<T>();
    if (!need_r) {
      dq_block.zero_();
      sparse_rows_update(rows.data(), count, 0, blocks, m, x_rows, x_cols, d, dq_block.data_ptr<T>(),
                         static_cast<T*>(nullptr));
      return;
    }
    const int64_t ranges = std::min(blocks, std::max<int64_t>(1, at::get_num_threads()));
    at::Tensor partial = at::zeros({ranges, count, d}, in.q.options());
    T* dr_v = dr.data_ptr<T>();
    at::parallel_for(0, ranges, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        sparse_rows_update(rows.data(), count, t * blocks / ranges, (t + 1) * blocks / ranges, m, x_rows, x_cols,
                           d, partial[t].data_ptr<T>(), dr_v);
      }
    });
    if (!need_q) return;
    dq_block.copy_(partial[0]);
    for (int64_t t = 1; t < ranges; ++t) dq_block.add_(partial[t]);
  }
};

// the share of nonzeros up to which a block of G is multiplied sparsely (-1: never)
double block_share(const Inputs& in, bool need_r) {
  // the sparse products read R's rows as they are: a reference set of another dtype takes the dense ones
  if (in.r.scalar_type() != in.q.scalar_type()) return -1.0;
  return sparse_share(need_r ? kSparseShareBoth : kSparseShareRows);
}

// Reference mode. With `unit_grad` (an (N, D) tensor, else undefined) the forward also turns each block into its
// G for g_i = 1 and writes G R there: dL/dQ for g = 1, which the backward only scales by g_i (U below).
template <typename T>
void forward_blocks(const Inputs& in, const Hyper<T>& hp, at::Tensor& loss, at::Tensor& stats, at::Tensor& counts,
                    at::Tensor& unit_grad) {
  const int64_t n = in.q.size(0), m = in.r.size(0);
  const int32_t* q_ids = in.q_ids.data_ptr<int32_t>();
  const int32_t* r_ids = in.r_ids.data_ptr<int32_t>();
  const int64_t* ref_self_index = in.ref_self_index ? in.ref_self_index->data_ptr<int64_t>() : nullptr;
  T* loss_out = loss.data_ptr<T>();
  T* st = stats.data_ptr<T>();
  int64_t* pairs = counts.data_ptr<int64_t>();  // (2, N): mined positives, mined negatives
  const bool with_grad = unit_grad.defined();
  const double share = with_grad ? block_share(in, false) : -1.0;
  at::Tensor no_dr;
  for_each_block(row_blocks(n, m, sizeof(T)), m, in.q.options(), /*spread=*/true,
                 [&](int64_t start, int64_t count, at::Tensor sim) {
    scores(sim, in.q.narrow(0, start, count), in.r);
    const T* s = sim.data_ptr<T>();
    std::optional<BlockGradient<T>> grad;
    if (with_grad) grad.emplace(in, hp, share, start, count, sim);
    at::parallel_for(0, count, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t i = start + k;
        const RowStats<T> rs =
            forward_row(s + k * m, r_ids, m, q_ids[i], anchor_ref_self_index(ref_self_index, i), hp);
        st[kMinPos * n + i] = rs.min_pos;
        st[kMaxNeg * n + i] = rs.max_neg;
        st[kLsePos * n + i] = rs.A;
        st[kLseNeg * n + i] = rs.B;
        pairs[i] = rs.n_pos;
        pairs[n + i] = rs.n_neg;
        loss_out[i] = rs.A / hp.alpha + rs.B / hp.beta;  // docs/semantics.md "Loss"; NaN for a non-finite row
        if (with_grad) grad->weights(k, rs, T(1));
      }
    });
    if (with_grad) {
      at::Tensor u_block = unit_grad.narrow(0, start, count);
      grad->multiply(sim, u_block, no_dr, /*need_q=*/true, /*need_r=*/false);
    }
  });
}

// Reference mode: dQ_block = G_block R and dR += G_block^T Q_block, recomputing the forward's similarities. The
// blocks share dR, so with need_r they run in turn (parallel inside); without, they are spread over the threads
// like the forward's.
template <typename T>
void backward_blocks(const Inputs& in, const Hyper<T>& hp, const T* g, const T* st, at::Tensor& dq,
                     at::Tensor& dr, bool need_q, bool need_r) {
  const int64_t n = in.q.size(0), m = in.r.size(0);
  const double share = block_share(in, need_r);
  for_each_block(row_blocks(n, m, sizeof(T)), m, in.q.options(), /*spread=*/!need_r,
                 [&](int64_t start, int64_t count, at::Tensor sim) {
    scores(sim, in.q.narrow(0, start, count), in.r);  // the forward's product again
    BlockGradient<T> grad(in, hp, share, start, count, sim);
    at::parallel_for(0, count, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) grad.weights(k, row_stats(st, n, start + k), g[start + k]);
    });
    at::Tensor dq_block = need_q ? dq.narrow(0, start, count) : at::Tensor();
    grad.multiply(sim, dq_block, dr, need_q, need_r);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ms_forward_cpu(
    const at::Tensor& q_hat, const std::optional<at::Tensor>& r_hat, const at::Tensor& labels,
    const std::optional<at::Tensor>& ref_labels, const std::optional<at::Tensor>& ref_self_index, double alpha,
    double beta, double base, double epsilon, bool mining, bool unit_q_grad) {
  match_torch_threads();
  const Inputs in = prepare(q_hat, r_hat, labels, ref_labels, ref_self_index);
  const int64_t n = in.q.size(0);
  at::Tensor loss = at::empty({n}, in.q.options());
  at::Tensor stats = at::empty({kNumStats, n}, in.q.options());
  at::Tensor counts = at::empty({2, n}, in.q.options().dtype(at::kLong));
  at::Tensor unit_grad = unit_q_grad && !in.self_mode ? at::empty_like(in.q) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "ms_forward_cpu", [&] {
    const Hyper<scalar_t> hp = hyper<scalar_t>(alpha, beta, base, epsilon, mining);
    if (in.self_mode) {
      self_forward<scalar_t>(in.q, in.q_ids, hp, loss.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>(),
                             counts.data_ptr<int64_t>());
    } else {
      forward_blocks<scalar_t>(in, hp, loss, stats, counts, unit_grad);
    }
  });
  return {loss, stats, counts, unit_grad.defined() ? unit_grad : at::empty({0}, in.q.options())};
}

std::tuple<at::Tensor, at::Tensor> ms_backward_cpu(const at::Tensor& grad, const at::Tensor& q_hat,
                                                   const std::optional<at::Tensor>& r_hat, const at::Tensor& labels,
                                                   const std::optional<at::Tensor>& ref_labels,
                                                   const std::optional<at::Tensor>& ref_self_index,
                                                   const at::Tensor& stats, double alpha, double beta, double base,
                                                   double epsilon, bool mining, bool need_q, bool need_r) {
  match_torch_threads();
  const Inputs in = prepare(q_hat, r_hat, labels, ref_labels, ref_self_index);
  const int64_t n = in.q.size(0);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == n, "ms_fused: grad must have shape (", n, ",)");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == kNumStats && stats.size(1) == n,
              "ms_fused: stats must have shape (", static_cast<int64_t>(kNumStats), ", ", n, ")");
  const at::Tensor g = grad.to(in.q.scalar_type()).contiguous();
  const at::Tensor st = stats.to(in.q.scalar_type()).contiguous();
  need_r = need_r && !in.self_mode;  // in self mode the one input gets the whole gradient through q
  TORCH_CHECK(!need_r || in.r.scalar_type() == in.q.scalar_type(),
              "ms_fused: a gradient for r_hat needs r_hat in the dtype of q_hat");
  at::Tensor dq = need_q ? at::empty_like(in.q) : at::empty({0}, in.q.options());
  at::Tensor dr = need_r ? at::zeros_like(in.r) : at::empty({0}, in.q.options());
  if (!need_q && !need_r) return {dq, dr};
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "ms_backward_cpu", [&] {
    const Hyper<scalar_t> hp = hyper<scalar_t>(alpha, beta, base, epsilon, mining);
    if (in.self_mode) {
      self_backward<scalar_t>(in.q, in.q_ids, hp, g.data_ptr<scalar_t>(), st.data_ptr<scalar_t>(), dq);
    } else {
      backward_blocks<scalar_t>(in, hp, g.data_ptr<scalar_t>(), st.data_ptr<scalar_t>(), dq, dr, need_q, need_r);
    }
  });
  return {dq, dr};
}

std::string cpu_capability_name() { return cpu_capability(); }

bool built_with_openmp() { return kOpenMP; }

void sparse_tile_update_cpu(const at::Tensor& w, const at::Tensor& x, int64_t row, int64_t col, at::Tensor& dx) {
  TORCH_CHECK(w.dim() == 2 && x.dim() == 2 && dx.sizes() == x.sizes(), "ms_fused: w and x must be matrices, dx x's shape");
  TORCH_CHECK(w.is_contiguous() && x.is_contiguous() && dx.is_contiguous(), "ms_fused: w, x and dx must be contiguous");
  TORCH_CHECK(w.scalar_type() == x.scalar_type() && dx.scalar_type() == x.scalar_type(), "ms_fused: w, x and dx: one dtype");
  const int64_t rows = w.size(0), cols = w.size(1), d = x.size(1);
  TORCH_CHECK(row >= 0 && col >= 0 && row + rows <= x.size(0) && col + cols <= x.size(0),
              "ms_fused: the tile must lie within x's rows");
  TORCH_CHECK(row + rows <= col || col + cols <= row || (row == col && rows == cols),
              "ms_fused: row and column blocks must be disjoint or the same");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_tile_update_cpu", [&] {
    const scalar_t* wv = w.data_ptr<scalar_t>();
    const scalar_t* xv = x.data_ptr<scalar_t>();
    scalar_t* dxv = dx.data_ptr<scalar_t>();
    sparse_tile_update(wv, rows, cols, count_nonzeros(wv, rows * cols), xv + row * d, xv + col * d, d, dxv + row * d,
                       dxv + col * d);
  });
}

}  // namespace

double sparse_share(double fallback) {
  const char* text = std::getenv("MS_FUSED_CPP_SPARSE_SHARE");
  if (text == nullptr || *text == '\0') return fallback;
  char* end = nullptr;
  const double share = std::strtod(text, &end);
  TORCH_CHECK(*end == '\0' && share >= 0 && share <= 1, "ms_fused: MS_FUSED_CPP_SPARSE_SHARE must be a number in "
              "[0, 1] (the share of nonzeros up to which a tile is multiplied sparsely), got '", text, "'");
  return share;
}

TORCH_LIBRARY_IMPL(ms_fused, CPU, m) {
  m.impl("ms_forward", &ms_forward_cpu);
  m.impl("ms_backward", &ms_backward_cpu);
  m.impl("sparse_tile_update_", &sparse_tile_update_cpu);
}

TORCH_LIBRARY_IMPL(ms_fused, CompositeExplicitAutograd, m) {
  m.impl("cpu_capability", &cpu_capability_name);
  m.impl("built_with_openmp", &built_with_openmp);
}

}  // namespace ms_fused::cpu
