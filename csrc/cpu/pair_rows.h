// Per-row passes of the pair-weighting losses (docs/semantics.md "Pair-weighting losses"): SupCon, NT-Xent and
// Circle loss, each one struct of pair_losses.h (its logits, its per-anchor loss and statistics, its pair weights)
// run by one generic row pass. Plain C++ over raw pointers like row_kernels.h, compiled once per ISA variant.
//
// A row is anchor i's similarities s[0..m) to the reference rows; column j is a positive when its label id
// equals the anchor's and j is not the anchor's own column (ref_self_index, -1: none), a negative when the
// ids differ.
#pragma once

#include <cstdint>

namespace ms_fused::cpu {

enum class PairLoss : int64_t { kSupCon = 0, kNTXent = 1, kCircle = 2 };

template <typename T>
struct PairParams {  // SupCon, NT-Xent: p0 = temperature; Circle: p0 = m, p1 = gamma
  PairLoss loss;
  T p0, p1;
};

// Rows of the (kPairStats, N) statistics of the pair-weighting losses (ms_fused/losses/pair_losses.py's order):
//   SupCon: L_i (LSE over P u N of S/t), |P_i|;  NT-Xent: L_i (LSE over N of S/t), W_i = sum_p sigmoid(L_i - z_ip);
//   Circle: A_i, B_i
inline constexpr int64_t kPairStats = 2;

template <typename T>
struct PairRow {  // what the forward pass of one anchor gives
  T loss, stat0, stat1;
  int64_t n_pos, n_neg;
};

PairRow<float> pair_forward_row(const float* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                                const PairParams<float>& p);
PairRow<double> pair_forward_row(const double* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                                 const PairParams<double>& p);

// Overwrites s[0..m) with g * d l_i / d S_ij from the anchor's statistics.
void pair_weight_row(float* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index, float stat0,
                     float stat1, float g, const PairParams<float>& p);
void pair_weight_row(double* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index, double stat0,
                     double stat1, double g, const PairParams<double>& p);

}  // namespace ms_fused::cpu
