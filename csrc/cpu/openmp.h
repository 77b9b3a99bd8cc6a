// Whether the extension was compiled with OpenMP, and the team size of its parallel regions.
#pragma once

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ms_fused::cpu {

#ifdef _OPENMP
inline constexpr bool kOpenMP = true;
#else
inline constexpr bool kOpenMP = false;  // at::parallel_for runs inline: the row passes take one thread
#endif

// The parallel regions that at::parallel_for opens here belong to the OpenMP runtime this file was compiled
// with, which need not be torch's (clang's libomp beside torch's libgomp); torch.set_num_threads reaches
// torch's only. Each op gives its runtime torch's count (OpenMP keeps it per calling thread).
inline void match_torch_threads() {
#ifdef _OPENMP
  const int threads = at::get_num_threads();
  if (omp_get_max_threads() != threads) omp_set_num_threads(threads);
#endif
}

}  // namespace ms_fused::cpu
