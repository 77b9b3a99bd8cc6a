// Explicit vectors of one variant's register width (MS_FUSED_ALL_VARIANTS' bytes), in GCC's vector extension,
// which clang takes too: the sparse update's register blocks, and the row passes' min/max scans, which clang
// (14) leaves scalar under `#pragma omp simd` (a min/max reduction of floats would need no-NaN math there).
#pragma once

#include <cstdint>
#include <cstring>

#include "simd_math.h"

// the vectors never cross a call boundary (every function taking one is always-inline)
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ms_fused::cpu::simd {

template <typename T, int Bytes>
struct Vec {
  static constexpr int lanes = Bytes / sizeof(T);
  typedef T type __attribute__((vector_size(Bytes)));
  typedef Count<T> mask __attribute__((vector_size(Bytes)));  // comparisons of `type`: all bits set or none
  typedef int32_t labels __attribute__((vector_size(lanes * sizeof(int32_t))));
};

template <typename V, typename T>
MS_FUSED_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V, typename T>
MS_FUSED_INLINE void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// lanes of y[0..lanes) == label, as a mask of `Vec<T, Bytes>::type`
template <typename T, int Bytes>
MS_FUSED_INLINE typename Vec<T, Bytes>::mask same_label(const int32_t* y, int32_t label) {
  using W = Vec<T, Bytes>;
  return __builtin_convertvector(load<typename W::labels>(y) == label, typename W::mask);
}

// 0, 1, ..., lanes - 1
template <typename T, int Bytes>
MS_FUSED_INLINE typename Vec<T, Bytes>::mask lane_index() {
  typename Vec<T, Bytes>::mask k{};
  for (int l = 0; l < Vec<T, Bytes>::lanes; ++l) k[l] = l;
  return k;
}

template <typename T, int Bytes>
MS_FUSED_INLINE T min_of(typename Vec<T, Bytes>::type v, T init) {
  for (int l = 0; l < Vec<T, Bytes>::lanes; ++l) init = v[l] < init ? v[l] : init;
  return init;
}

template <typename T, int Bytes>
MS_FUSED_INLINE T max_of(typename Vec<T, Bytes>::type v, T init) {
  for (int l = 0; l < Vec<T, Bytes>::lanes; ++l) init = v[l] > init ? v[l] : init;
  return init;
}

template <typename T, int Bytes>
MS_FUSED_INLINE T sum_of(typename Vec<T, Bytes>::type v, T init) {
  for (int l = 0; l < Vec<T, Bytes>::lanes; ++l) init += v[l];
  return init;
}

}  // namespace ms_fused::cpu::simd
