// Per-element arithmetic shared by the CPU and CUDA kernels.
//
// Everything here is a scalar inline function marked FP_HD (host and device), so the CPU kernels,
// which the test suite runs on every machine, exercise the exact expressions the CUDA kernels
// compile. The CPU kernels vectorise the long row loops (exponentials, maxima) themselves; these
// functions own the decisions that are easy to get wrong: the -inf cases of an online softmax,
// merging two partial results by log-sum-exp, and the per-(sequence, prompt) score terms.
//
// No torch, no CUDA headers: this file must compile as plain C++17 and under nvcc.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FP_HD __host__ __device__ __forceinline__
#else
#define FP_HD inline
#endif

namespace fastprompt {

// exp(x) for x <= 0 in the softmax; x = -inf gives 0 without a special case.
FP_HD float fp_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

FP_HD float fp_log(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  return std::log(x);
#endif
}

FP_HD float neg_inf() { return -INFINITY; }

// A running max that is safe to subtract: a row that has seen no key yet (max = -inf) would
// otherwise compute exp(-inf - (-inf)) = NaN.
FP_HD float safe_max(float m) { return m == -INFINITY ? 0.0f : m; }

// Online softmax state of one query row: running max m of the scaled scores seen so far and
// l = sum of exp(score - m) over them.
struct RowState {
  float m;
  float l;
};

FP_HD RowState row_init() { return RowState{-INFINITY, 0.0f}; }

// Folds in a block whose largest score is block_max. Returns the factor by which the row's
// accumulated output (and l) must be multiplied; st.m becomes the new max, which the caller uses
// (through safe_max) when it exponentiates the block's scores. The caller then adds the block's
// sum of exponentials with row_add.
FP_HD float row_rescale(RowState& st, float block_max) {
  const float m_new = st.m > block_max ? st.m : block_max;
  // m_old = -inf means nothing was accumulated: the factor is irrelevant, 0 keeps it finite.
  const float alpha = st.m == -INFINITY ? 0.0f : fp_exp(st.m - m_new);
  st.m = m_new;
  st.l *= alpha;
  return alpha;
}

FP_HD void row_add(RowState& st, float block_sum) { st.l += block_sum; }

// Natural-log log-sum-exp of the row; -inf for a row that attended to no key.
FP_HD float row_lse(const RowState& st) { return st.l > 0.0f ? st.m + fp_log(st.l) : -INFINITY; }

// Factor turning the accumulated (unnormalised) output into the attention output; 0 for a row
// with no key, so its output is 0 rather than NaN.
FP_HD float row_out_scale(const RowState& st) { return st.l > 0.0f ? 1.0f / st.l : 0.0f; }

// log(exp(a) + exp(b)) with -inf on either side handled (Hydragen's merge of two partial
// attentions over disjoint key sets).
FP_HD float lse_merge(float a, float b) {
  const float hi = a > b ? a : b;
  const float lo = a > b ? b : a;
  if (hi == -INFINITY) return -INFINITY;
  return hi + fp_log(1.0f + fp_exp(lo - hi));
}

// Weight of a partial attention with log-sum-exp lse_part in the merged one (lse_total).
FP_HD float merge_weight(float lse_part, float lse_total) {
  return lse_part == -INFINITY ? 0.0f : fp_exp(lse_part - lse_total);
}

// Attention probability from a scaled score and the row's final log-sum-exp (backward).
FP_HD float prob_from_lse(float score, float lse) {
  return lse == -INFINITY ? 0.0f : fp_exp(score - lse);
}

// Gradient with respect to the pre-softmax score: dS = P * (dP - Delta), Delta = sum(dO * O).
FP_HD float dscore(float p, float dp, float delta) { return p * (dp - delta); }

// One (sequence, prompt) score term accumulates dK . u_k + dV . u_v over heads and features.
FP_HD float score_term_fma(float acc, float dk, float uk, float dv, float uv) {
  return acc + dk * uk + dv * uv;
}

// Gate of prompt i for one sequence written from the per-sequence gradients, as the reference
// does: sum over heads of v_i . dV_i minus sum over queries of P[n, i] * Delta_n. (The fused
// backward sums dS over queries instead; the two agree.)
FP_HD float gate_from_parts(float v_dot_dv, float p_dot_delta) { return v_dot_dv - p_dot_delta; }

}  // namespace fastprompt
