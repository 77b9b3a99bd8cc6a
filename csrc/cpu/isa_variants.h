// The instruction-set variants the per-row passes are compiled for, one block per architecture. Each block
// defines, in namespace ms_fused::cpu::simd:
//   Isa            the variants, kDefault (the baseline) first, each wider one after the one it extends;
//   kIsaNames      their names, as ATEN_CPU_CAPABILITY spells them;
//   best_supported the widest variant this CPU (and OS) runs;
// and the macros
//   MS_FUSED_ALL_VARIANTS(V)   V(name, target attribute, register bytes) once per variant: each use defines
//                              namespace `name` with the entry points compiled for that ISA;
//   MS_FUSED_DISPATCH(fn, ...) returns `name::fn(...)` of the active variant (simd::active_isa()).
// A block for another architecture (aarch64: NEON, SVE) slots in as one more #elif.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && (defined(__linux__) || defined(__APPLE__))
// ---- x86-64: baseline (SSE2), AVX2 + FMA (x86-64-v3), AVX-512 (x86-64-v4) ------------------------------
#define MS_FUSED_X86_VARIANTS 1
#include <cpuid.h>

namespace ms_fused::cpu::simd {

enum class Isa { kDefault, kAvx2, kAvx512 };
inline constexpr const char* kIsaNames[] = {"default", "avx2", "avx512"};

inline Isa best_supported() {
  __builtin_cpu_init();
#if defined(__clang__)
  // clang's __builtin_cpu_supports knows no "x86-64-vN" (clang 14): the levels' features one by one, those
  // it does not know from cpuid (leaf 1: MOVBE bit 22, F16C bit 29; leaf 0x80000001: LZCNT bit 5)
  unsigned a, b, c1 = 0, c8 = 0, d;
  __get_cpuid(1, &a, &b, &c1, &d);
  __get_cpuid(0x80000001, &a, &b, &c8, &d);
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
                  __builtin_cpu_supports("bmi2") && (c1 >> 22 & 1) && (c1 >> 29 & 1) && (c8 >> 5 & 1);
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl");
#else
  const bool v3 = __builtin_cpu_supports("x86-64-v3"), v4 = __builtin_cpu_supports("x86-64-v4");
#endif
  return v4 ? Isa::kAvx512 : v3 ? Isa::kAvx2 : Isa::kDefault;
}

}  // namespace ms_fused::cpu::simd

#define MS_FUSED_ALL_VARIANTS(V)                               \
  V(baseline, , 16)                                            \
  V(avx2, __attribute__((target("arch=x86-64-v3"))), 32)       \
  V(avx512, __attribute__((target("arch=x86-64-v4"))), 64)

#define MS_FUSED_DISPATCH(fn, ...)                                               \
  switch (::ms_fused::cpu::simd::active_isa()) {                                 \
    case ::ms_fused::cpu::simd::Isa::kAvx512: return avx512::fn(__VA_ARGS__);    \
    case ::ms_fused::cpu::simd::Isa::kAvx2: return avx2::fn(__VA_ARGS__);        \
    default: return baseline::fn(__VA_ARGS__);                                   \
  }

#elif defined(__aarch64__)
// ---- aarch64: baseline (NEON), SVE of any vector length (GCC on Linux) ----------------------------------
#include "simd_aarch64.h"

#else
// ---- any other CPU or compiler: the baseline only (16-byte vectors, whatever the compiler makes of them) ----
namespace ms_fused::cpu::simd {

enum class Isa { kDefault };
inline constexpr const char* kIsaNames[] = {"default"};

inline Isa best_supported() { return Isa::kDefault; }

}  // namespace ms_fused::cpu::simd

#define MS_FUSED_ALL_VARIANTS(V) V(baseline, , 16)
#define MS_FUSED_DISPATCH(fn, ...) return baseline::fn(__VA_ARGS__);
#endif
