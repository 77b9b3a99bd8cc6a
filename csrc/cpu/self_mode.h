// Self mode (R = Q) of the CPU kernels: the forward and backward over the upper triangle of the symmetric S.
#pragma once

#include <ATen/ATen.h>

#include "row_kernels.h"

namespace ms_fused::cpu {

// x: (N, D) contiguous q_hat; ids: (N,) int32 dense label ids. Writes loss (N), stats (kNumStats, N) and
// counts (2, N: mined positives, mined negatives), all in x's row order.
template <typename T>
void self_forward(const at::Tensor& x, const at::Tensor& ids, const Hyper<T>& hp, T* loss, T* stats, int64_t* counts);

// dx (N, D): the gradient of q_hat for incoming grad g (N) and the forward's stats (kNumStats, N).
template <typename T>
void self_backward(const at::Tensor& x, const at::Tensor& ids, const Hyper<T>& hp, const T* g, const T* stats,
                   at::Tensor& dx);

}  // namespace ms_fused::cpu
