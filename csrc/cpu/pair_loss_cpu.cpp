// CPU kernels of ms_fused::pair_forward / ms_fused::pair_backward (schemas in csrc/ms_fused_ops.cpp): SupCon,
// NT-Xent and Circle loss. Self mode runs the upper triangle of the symmetric S (pair_self_mode.h); against a
// reference set, the row blocks of blocks.h: each block's similarities come from one ATen product into a
// per-thread (rows x M) buffer; the loss's row pass (pair_rows.h) gives each anchor's loss and statistics, and in
// the backward turns the recomputed row into g_i d l_i / d S_ij in place, which two products multiply back (G R
// for the anchors, G^T Q for the reference rows). Scratch memory is O(rows x M); nothing N x M is ever allocated.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "blocks.h"
#include "openmp.h"
#include "pair_rows.h"
#include "pair_self_mode.h"

namespace ms_fused::cpu {
namespace {

template <typename T>
PairParams<T> params(int64_t loss, double p0, double p1) {
  TORCH_CHECK(loss >= 0 && loss <= static_cast<int64_t>(PairLoss::kCircle), "ms_fused: unknown pair loss ", loss);
  return {static_cast<PairLoss>(loss), static_cast<T>(p0), static_cast<T>(p1)};
}

// the column of anchor i's own copy against a reference set: ref_self_index[i], or -1
int32_t own_column(const Inputs& in, int64_t i) {
  return in.ref_self_index ? static_cast<int32_t>(in.ref_self_index->data_ptr<int64_t>()[i]) : -1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_forward_cpu(
    const at::Tensor& q_hat, const std::optional<at::Tensor>& r_hat, const at::Tensor& labels,
    const std::optional<at::Tensor>& ref_labels, const std::optional<at::Tensor>& ref_self_index, int64_t loss_id,
    double p0, double p1) {
  match_torch_threads();
  const Inputs in = prepare(q_hat, r_hat, labels, ref_labels, ref_self_index);
  const int64_t n = in.q.size(0), m = in.r.size(0);
  at::Tensor loss = at::empty({n}, in.q.options());
  at::Tensor stats = at::empty({kPairStats, n}, in.q.options());
  at::Tensor counts = at::empty({2, n}, in.q.options().dtype(at::kLong));  // |P_i|, |N_i|
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "pair_forward_cpu", [&] {
    const PairParams<scalar_t> p = params<scalar_t>(loss_id, p0, p1);
    const int32_t* q_ids = in.q_ids.data_ptr<int32_t>();
    const int32_t* r_ids = in.r_ids.data_ptr<int32_t>();
    scalar_t* loss_out = loss.data_ptr<scalar_t>();
    scalar_t* st = stats.data_ptr<scalar_t>();
    int64_t* pairs = counts.data_ptr<int64_t>();
    if (in.self_mode) return pair_self_forward<scalar_t>(in.q, in.q_ids, p, loss_out, st, pairs);
    for_each_block(row_blocks(n, m, sizeof(scalar_t)), m, in.q.options(), /*spread=*/true,
                   [&](int64_t start, int64_t count, at::Tensor sim) {
      scores(sim, in.q.narrow(0, start, count), in.r);
      const scalar_t* s = sim.data_ptr<scalar_t>();
      at::parallel_for(0, count, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          const int64_t i = start + k;
          const PairRow<scalar_t> row = pair_forward_row(s + k * m, r_ids, m, q_ids[i], own_column(in, i), p);
          loss_out[i] = row.loss;
          st[i] = row.stat0;
          st[n + i] = row.stat1;
          pairs[i] = row.n_pos;
          pairs[n + i] = row.n_neg;
        }
      });
    });
  });
  return {loss, stats, counts};
}

// Self mode: the triangle's backward. Else dq = G R and dr = G^T Q, recomputing the forward's similarities.
// Blocks that add to a shared dR run in turn (parallel inside); with dq alone they are spread over the threads.
std::tuple<at::Tensor, at::Tensor> pair_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q_hat, const std::optional<at::Tensor>& r_hat, const at::Tensor& labels,
    const std::optional<at::Tensor>& ref_labels, const std::optional<at::Tensor>& ref_self_index,
    const at::Tensor& stats, int64_t loss_id, double p0, double p1, bool need_q, bool need_r) {
  match_torch_threads();
  const Inputs in = prepare(q_hat, r_hat, labels, ref_labels, ref_self_index);
  const int64_t n = in.q.size(0), m = in.r.size(0);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == n, "ms_fused: grad must have shape (", n, ",)");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == kPairStats && stats.size(1) == n,
              "ms_fused: stats must have shape (", kPairStats, ", ", n, ")");
  const at::Tensor g = grad.to(in.q.scalar_type()).contiguous();
  const at::Tensor st = stats.to(in.q.scalar_type()).contiguous();
  need_r = need_r && !in.self_mode;  // in self mode the one input gets the whole gradient through q
  TORCH_CHECK(!need_r || in.r.scalar_type() == in.q.scalar_type(),
              "ms_fused: a gradient for r_hat needs r_hat in the dtype of q_hat");
  at::Tensor dq = need_q ? at::empty_like(in.q) : at::empty({0}, in.q.options());
  at::Tensor dr = need_r ? at::zeros_like(in.r) : at::empty({0}, in.q.options());
  if (!need_q && !need_r) return {dq, dr};
  if (in.self_mode) {
    AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "pair_self_backward_cpu", [&] {
      pair_self_backward<scalar_t>(in.q, in.q_ids, params<scalar_t>(loss_id, p0, p1), g.data_ptr<scalar_t>(),
                                   st.data_ptr<scalar_t>(), dq);
    });
    return {dq, dr};
  }
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "pair_backward_cpu", [&] {
    const PairParams<scalar_t> p = params<scalar_t>(loss_id, p0, p1);
    const int32_t* q_ids = in.q_ids.data_ptr<int32_t>();
    const int32_t* r_ids = in.r_ids.data_ptr<int32_t>();
    const scalar_t* gv = g.data_ptr<scalar_t>();
    const scalar_t* sv = st.data_ptr<scalar_t>();
    for_each_block(row_blocks(n, m, sizeof(scalar_t)), m, in.q.options(), /*spread=*/!need_r,
                   [&](int64_t start, int64_t count, at::Tensor sim) {
      const at::Tensor q_block = in.q.narrow(0, start, count);
      scores(sim, q_block, in.r);  // the forward's product again
      scalar_t* s = sim.data_ptr<scalar_t>();
      at::parallel_for(0, count, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
          const int64_t i = start + k;
          pair_weight_row(s + k * m, r_ids, m, q_ids[i], own_column(in, i), sv[i], sv[n + i], gv[i], p);
        }
      });
      if (need_q) {
        at::Tensor dq_block = dq.narrow(0, start, count);
        times(dq_block, sim, in.r);
      }
      if (need_r) dr.addmm_(sim.t(), q_block);
    });
  });
  return {dq, dr};
}

}  // namespace

TORCH_LIBRARY_IMPL(ms_fused, CPU, m) {
  m.impl("pair_forward", &pair_forward_cpu);
  m.impl("pair_backward", &pair_backward_cpu);
}

}  // namespace ms_fused::cpu
