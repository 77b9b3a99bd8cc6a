// The aarch64 block of isa_variants.h (see there what it defines): which variant of the passes the CPU
// runs, and the variants themselves.
//
// NEON is part of every aarch64 CPU, so the baseline variant is the NEON one. SVE code compiled for no
// vector length in particular runs on every SVE CPU; as PyTorch does for its own kernels, it is chosen on
// CPUs with 128- or 256-bit SVE vectors (Graviton 4, Graviton 3), named "sve128" and "sve256" as
// ATEN_CPU_CAPABILITY names them; on another length the NEON variant runs. GCC on Linux only: the
// target attribute and the run-time check (getauxval, prctl) are spelled for it.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MS_FUSED_AARCH64_VARIANTS 1
#include <sys/auxv.h>
#include <sys/prctl.h>
#endif

namespace ms_fused::cpu::simd {

enum class Isa { kDefault, kSve128, kSve256 };
inline constexpr const char* kIsaNames[] = {"default", "sve128", "sve256"};  // as ATEN_CPU_CAPABILITY spells them

inline Isa best_supported() {
#ifdef MS_FUSED_AARCH64_VARIANTS
  if (getauxval(AT_HWCAP) & HWCAP_SVE) {
    const int bytes = prctl(PR_SVE_GET_VL) & PR_SVE_VL_LEN_MASK;  // this thread's vector length
    if (bytes == 32) return Isa::kSve256;
    if (bytes == 16) return Isa::kSve128;
  }
#endif
  return Isa::kDefault;
}

}  // namespace ms_fused::cpu::simd

// One namespace per variant, as on x86: sve128 and sve256 run the same code, `sve`. Its register width is
// known at run time only: the explicit vectors of the passes are NEON's 16 bytes in both.
#ifdef MS_FUSED_AARCH64_VARIANTS
#define MS_FUSED_ALL_VARIANTS(V) \
  V(baseline, , 16)              \
  V(sve, __attribute__((target("+sve"))), 16)
#else
#define MS_FUSED_ALL_VARIANTS(V) \
  V(baseline, , 16)              \
  namespace sve = baseline;
#endif

#define MS_FUSED_DISPATCH(fn, ...)                                            \
  switch (::ms_fused::cpu::simd::active_isa()) {                              \
    case ::ms_fused::cpu::simd::Isa::kSve256:                                 \
    case ::ms_fused::cpu::simd::Isa::kSve128: return sve::fn(__VA_ARGS__);    \
    default: return baseline::fn(__VA_ARGS__);                                \
  }
