// The row-block machinery of the reference-mode passes, shared by the MS kernels (ms_loss_cpu.cpp) and the
// pair-weighting losses' (pair_loss_cpu.cpp): the inputs as the passes take them (contiguous rows, labels as
// dense int32 ids), the cut of the anchors into row blocks, a per-thread (rows x M) buffer for each block's
// similarities, and the products that fill it and multiply it back.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "row_kernels.h"

namespace ms_fused::cpu {

// Rows per block: up to 256 (the products reach full speed well before that), fewer when M is so large that
// the (rows x M) buffer would pass this budget, but never below 32 (thin products run at half speed).
constexpr int64_t kBlockBytes = 32 << 20;
constexpr int64_t kMinBlockRows = 32, kMaxBlockRows = 256;

// The row blocks of every pass over the anchors; forward and backward cut them the same way, so the
// backward recomputes bit for bit the similarities the forward mined.
struct Blocks {
  int64_t n, rows, count;
  int64_t start(int64_t b) const { return b * rows; }
  int64_t size(int64_t b) const { return std::min(rows, n - b * rows); }
};

inline Blocks row_blocks(int64_t n, int64_t m, int64_t elem_size) {
  const int64_t widest = std::clamp(kBlockBytes / std::max<int64_t>(1, m * elem_size), kMinBlockRows, kMaxBlockRows);
  // a multiple of the thread count of equal blocks, so that every thread gets the same work
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t count = divup(divup(n, widest), threads) * threads;
  const int64_t rows = std::min(n, std::max(divup(n, count), std::min(n, kMinBlockRows)));
  return {n, rows, divup(n, rows)};
}

// Calls body(start, count, sim) for every block, `sim` a (count x M) view of a buffer of the calling thread.
// With `spread`, the blocks are shared out among the threads and each block's products and row passes run
// on its thread: one parallel region per call, so a thread that the OS preempts delays one barrier, not
// several per block. Without it, blocks run in turn and each is parallel inside (at::parallel_for nested in
// a parallel region runs inline, so the bodies can use it either way).
template <typename Body>
void for_each_block(const Blocks& blocks, int64_t m, const at::TensorOptions& options, bool spread,
                    const Body& body) {
  const at::ThreadLocalState caller_state;  // e.g. autograd already handled: worker threads must know it too
  auto run = [&](int64_t first, int64_t last) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    at::Tensor buffer = at::empty({blocks.rows, m}, options);
    for (int64_t b = first; b < last; ++b) body(blocks.start(b), blocks.size(b), buffer.narrow(0, 0, blocks.size(b)));
  };
  if (spread) {
    at::parallel_for(0, blocks.count, 1, run);
  } else {
    run(0, blocks.count);
  }
}

// Rows of a reference set of another dtype than the anchors (a bfloat16 memory bank) converted at a time
constexpr int64_t kCastRows = 4096;

struct Inputs {
  at::Tensor q, r;                  // contiguous; r is q in self mode, and may be narrower (see scores)
  at::Tensor q_ids, r_ids;          // labels as dense int32 ids (equal labels <=> equal ids)
  std::optional<at::Tensor> ref_self_index;  // reference mode: int64 (N,) column of each anchor's own copy or -1
  bool self_mode;
};

inline void check_labels(const at::Tensor& y, int64_t rows, const char* name) {
  TORCH_CHECK(y.dim() == 1 && y.size(0) == rows, "ms_fused: ", name, " must have shape (", rows, ",), got ",
              y.sizes());
  TORCH_CHECK(!y.is_floating_point() && !y.is_complex() && y.scalar_type() != at::kBool, "ms_fused: ", name,
              " must be an integer tensor, got ", y.scalar_type());
}

inline Inputs prepare(const at::Tensor& q_hat, const std::optional<at::Tensor>& r_hat, const at::Tensor& labels,
               const std::optional<at::Tensor>& ref_labels, const std::optional<at::Tensor>& ref_self_index) {
  TORCH_CHECK(q_hat.dim() == 2 && q_hat.size(0) > 0 && q_hat.size(1) > 0,
              "ms_fused: q_hat must be a non-empty (N, D) matrix, got ", q_hat.sizes());
  TORCH_CHECK(q_hat.scalar_type() == at::kFloat || q_hat.scalar_type() == at::kDouble,
              "ms_fused: q_hat must be float32 or float64, got ", q_hat.scalar_type());
  TORCH_CHECK(r_hat.has_value() == ref_labels.has_value(), "ms_fused: r_hat and ref_labels go together");
  TORCH_CHECK(r_hat.has_value() || !ref_self_index.has_value(), "ms_fused: ref_self_index needs r_hat");
  Inputs in;
  in.self_mode = !r_hat.has_value();
  in.q = q_hat.contiguous();
  const int64_t n = in.q.size(0);
  check_labels(labels, n, "labels");
  if (in.self_mode) {
    in.r = in.q;
  } else {
    const at::Tensor& r = *r_hat;
    TORCH_CHECK(r.dim() == 2 && r.size(0) > 0 && r.size(1) == q_hat.size(1),
                "ms_fused: r_hat must be a non-empty (M, D) matrix with D = ", q_hat.size(1), ", got ", r.sizes());
    TORCH_CHECK(at::isFloatingType(r.scalar_type()), "ms_fused: r_hat must be a floating-point tensor, got ",
                r.scalar_type());
    in.r = r.contiguous();
    check_labels(*ref_labels, in.r.size(0), "ref_labels");
  }
  const int64_t m = in.r.size(0);
  TORCH_CHECK(m < std::numeric_limits<int32_t>::max() && n < std::numeric_limits<int32_t>::max(),
              "ms_fused: the cpp backend supports fewer than 2^31 rows");

  const at::Tensor all = in.self_mode ? labels : at::cat({labels.to(at::kLong), ref_labels->to(at::kLong)});
  const at::Tensor ids = std::get<1>(at::_unique(all, /*sorted=*/true, /*return_inverse=*/true)).to(at::kInt);
  in.q_ids = ids.narrow(0, 0, n).contiguous();
  in.r_ids = in.self_mode ? in.q_ids : ids.narrow(0, n, m).contiguous();

  if (ref_self_index.has_value()) {
    check_labels(*ref_self_index, n, "ref_self_index");
    in.ref_self_index = ref_self_index->to(at::kLong).contiguous();
  }
  return in;
}

// sim = q_block r^T. A reference set of another dtype is converted to q's kCastRows rows at a time, so
// that no converted copy of the whole set is made.
inline void scores(at::Tensor& sim, const at::Tensor& q_block, const at::Tensor& r) {
  if (r.scalar_type() == q_block.scalar_type()) {
    at::mm_out(sim, q_block, r.t());
    return;
  }
  for (int64_t c0 = 0; c0 < r.size(0); c0 += kCastRows) {
    const int64_t c = std::min(kCastRows, r.size(0) - c0);
    at::Tensor out = sim.narrow(1, c0, c);
    at::mm_out(out, q_block, r.narrow(0, c0, c).to(q_block.scalar_type()).t());
  }
}

// out = g r, r converted block by block like scores() when its dtype differs.
inline void times(at::Tensor& out, const at::Tensor& g, const at::Tensor& r) {
  if (r.scalar_type() == g.scalar_type()) {
    at::mm_out(out, g, r);
    return;
  }
  out.zero_();
  for (int64_t c0 = 0; c0 < r.size(0); c0 += kCastRows) {
    const int64_t c = std::min(kCastRows, r.size(0) - c0);
    out.addmm_(g.narrow(1, c0, c), r.narrow(0, c0, c).to(g.scalar_type()));
  }
}

}  // namespace ms_fused::cpu
