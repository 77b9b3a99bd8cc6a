// Per-row passes of the fused Multi-Similarity kernel (docs/semantics.md "Mining", "Loss", "Gradient").
//
// Plain C++ over raw pointers, no torch headers: this file's .cpp compiles the passes once per x86 ISA
// level (AVX-512, AVX2+FMA, baseline) and runs the widest the CPU supports, so the passes use AVX-512 or
// AVX2 where available while the extension itself stays portable. ATEN_CPU_CAPABILITY=default|avx2|avx512
// (PyTorch's variable) forces a narrower one, e.g. to test every variant on one machine.
#pragma once

#include <cstdint>
#include <limits>

namespace ms_fused::cpu {

// The variant the passes run: "avx512", "avx2" or "default" (chosen on first use, then fixed).
const char* cpu_capability();

// a / b rounded up, for counts of blocks
inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
struct Hyper {  // the hyper-parameters, in the compute dtype
  T alpha, beta, base, epsilon;
  bool mining;
};

// Rows of the (kNumStats, N) statistics tensor that ms_forward returns and ms_backward takes, as
// ms_fused/engine/_autograd.py numbers them (MIN_POS .. LSE_NEG): min_pos, max_neg, A, B of each anchor.
// A = B = NaN marks an anchor whose row of S is not finite, and only such an anchor.
enum StatRow : int64_t { kMinPos = 0, kMaxNeg = 1, kLsePos = 2, kLseNeg = 3, kNumStats = 4 };

template <typename T>
struct RowStats {  // what the forward saves per anchor (see StatRow)
  T min_pos, max_neg, A, B;
  int64_t n_pos = 0, n_neg = 0;  // mined positives and negatives (0 for a non-finite row)
};

// How S_ij becomes G_ij for one anchor i (docs/semantics.md "Gradient"):
//   hard positive (same label, not i's own column, s - eps < pos_limit): G = pos_coef * exp(-alpha*s + pos_shift)
//   hard negative (other label, s + eps > neg_limit):                     G = neg_coef * exp( beta*s + neg_shift)
//   anything else: 0.
// Anchor i's statistics from the (kNumStats, N) tensor
template <typename T>
RowStats<T> row_stats(const T* stats, int64_t n, int64_t i) {
  return {stats[kMinPos * n + i], stats[kMaxNeg * n + i], stats[kLsePos * n + i], stats[kLseNeg * n + i]};
}

template <typename T>
struct PairWeights {
  T pos_limit, neg_limit, pos_shift, neg_shift, pos_coef, neg_coef;
};

template <typename T>
PairWeights<T> pair_weights(const RowStats<T>& st, const Hyper<T>& hp, T g) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  // without mining every pair in P_i / N_i counts: limits that every finite s passes
  return {hp.mining ? st.max_neg : inf, hp.mining ? st.min_pos : -inf, hp.alpha * hp.base - st.A,
          -hp.beta * hp.base - st.B, -g, g};
}

// Forward of one anchor row s[0..m): mining statistics, then both log-sum-exps. `ref_self_index` is the column of
// the anchor's own copy (removed from P_i), or -1.
RowStats<float> forward_row(const float* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                            const Hyper<float>& hp);
RowStats<double> forward_row(const double* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                             const Hyper<double>& hp);

// Overwrites s[0..m) (anchor i's similarities) with G_i.
void weight_row(float* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                const PairWeights<float>& w, const Hyper<float>& hp);
void weight_row(double* s, const int32_t* yr, int64_t m, int32_t yq, int32_t ref_self_index,
                const PairWeights<double>& w, const Hyper<double>& hp);

}  // namespace ms_fused::cpu
