// Self mode (R = Q) of the pair-weighting losses' CPU kernels: the forward and backward over the upper triangle
// of the symmetric S (triangle.h), each pair's similarity serving both its anchors.
#pragma once

#include <ATen/ATen.h>

#include "pair_rows.h"

namespace ms_fused::cpu {

// x: (N, D) contiguous unit rows; ids: (N,) int32 dense label ids. Writes loss (N), stats (kPairStats, N) and
// counts (2, N: |P_i|, |N_i|), all in x's row order, as pair_forward_row would row by row.
template <typename T>
void pair_self_forward(const at::Tensor& x, const at::Tensor& ids, const PairParams<T>& p, T* loss, T* stats,
                       int64_t* counts);

// dx (N, D): the gradient of x for incoming grad g (N) and the forward's stats (kPairStats, N).
template <typename T>
void pair_self_backward(const at::Tensor& x, const at::Tensor& ids, const PairParams<T>& p, const T* g,
                        const T* stats, at::Tensor& dx);

}  // namespace ms_fused::cpu
