// Schemas of the ms_fused torch ops. Kernels: csrc/cpu/ms_loss_cpu.cpp. Fake (meta) kernels and the
// autograd formula are registered from Python, in ms_fused/engine/cpp/backend.py.
//
// ms_forward takes the already normalised embeddings (normalisation stays in the autograd graph) and returns
// the per-anchor losses (N,), the row statistics (4, N) = (min_pos, max_neg, A, B) the backward rebuilds
// each block of G from (rows: StatRow in csrc/cpu/row_kernels.h; A = B = NaN for a non-finite row), and the int64 counts (2, N) of each anchor's mined positives and negatives.
// r_hat may have another floating dtype than q_hat when it needs no gradient (a memory bank); it is then
// converted block by block, never as a whole. Self mode is r_hat = ref_labels = None (R = Q, own pair removed by index);
// ref_self_index optionally names each anchor's own row in r_hat (-1: none).
// With unit_q_grad (reference mode; ignored in self mode) the forward also returns dL/dq_hat for grad = 1, an
// (N, D) tensor U: anchor i's gradient row is then grad_i U_i, and ms_backward is needed for dr only. Else, and in
// self mode, that output is an empty (0,) tensor.
#include <torch/library.h>

TORCH_LIBRARY(ms_fused, m) {
  m.set_python_module("ms_fused.engine.cpp.backend");
  m.def(
      "ms_forward(Tensor q_hat, Tensor? r_hat, Tensor labels, Tensor? ref_labels, Tensor? ref_self_index, "
      "float alpha, float beta, float base, float epsilon, bool mining, bool unit_q_grad=False) -> "
      "(Tensor loss, Tensor stats, Tensor counts, Tensor unit_grad)");
  // dq, dr: gradients w.r.t. q_hat and r_hat; an empty (0,) tensor where not asked for (need_q / need_r false,
  // and dr always in self mode, where dq already holds the whole gradient of the shared input)
  m.def(
      "ms_backward(Tensor grad, Tensor q_hat, Tensor? r_hat, Tensor labels, Tensor? ref_labels, "
      "Tensor? ref_self_index, Tensor stats, float alpha, float beta, float base, float epsilon, bool mining, "
      "bool need_q, bool need_r) -> (Tensor dq, Tensor dr)");
  // The pair-weighting losses (csrc/cpu/pair_loss_cpu.cpp): `loss` 0 SupCon, 1 NT-Xent, 2 Circle (PairLoss in
  // csrc/cpu/pair_rows.h), p0 = temperature (SupCon, NT-Xent) or m (Circle), p1 = gamma (Circle). The forward
  // returns the per-anchor losses (N,), the statistics (2, N) the backward rebuilds each block of G from, and the
  // int64 (2, N) counts |P_i|, |N_i|; same modes and dtypes as ms_forward (no unit_q_grad).
  m.def(
      "pair_forward(Tensor q_hat, Tensor? r_hat, Tensor labels, Tensor? ref_labels, Tensor? ref_self_index, "
      "int loss, float p0, float p1) -> (Tensor loss, Tensor stats, Tensor counts)");
  m.def(
      "pair_backward(Tensor grad, Tensor q_hat, Tensor? r_hat, Tensor labels, Tensor? ref_labels, "
      "Tensor? ref_self_index, Tensor stats, int loss, float p0, float p1, bool need_q, bool need_r) -> "
      "(Tensor dq, Tensor dr)");
  // the instruction-set variant of the row passes: "avx512", "avx2" or "default" (see csrc/cpu/row_kernels.h)
  m.def("cpu_capability() -> str");
  // whether the extension was compiled with OpenMP (without it, and with torch's OpenMP, the passes take one thread)
  m.def("built_with_openmp() -> bool");
  // one kernel of the self-mode backward, for its tests: with W (R, C), dx[row:row+R] += W x[col:col+C] and
  // dx[col:col+C] += W^T x[row:row+R], summing only W's nonzeros (csrc/cpu/sparse_update.h)
  m.def("sparse_tile_update_(Tensor w, Tensor x, int row, int col, Tensor(a!) dx) -> ()");
}
