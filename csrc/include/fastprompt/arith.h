// Per-element arithmetic shared by the CPU and CUDA kernels.
//
// Everything here is a scalar inline function marked FP_HD (host and device), so the CPU kernels,
// which the test suite runs on every machine, exercise the exact expressions the CUDA kernels
// compile. The CPU kernels vectorise the long row loops (exponentials, maxima) themselves; these
// functions own the decisions that are easy to get wrong: the -inf and +inf cases of an online
// softmax, merging two partial results by log-sum-exp, the validity of set indices and lengths,
// and the per-(sequence, prompt) score terms.
//
// No torch, no CUDA headers: this file must compile as plain C++17 and under nvcc.
#pragma once

#include <cmath>
#include <cstdint>

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

// A maximum (or log-sum-exp) that is +inf or NaN: the scores themselves are infinite, which only
// an infinite scale produces. No finite softmax exists; the fp32 reference then gives every key
// probability 0 (out 0) and lse +inf (NaN where a score is 0 * inf), and so do the kernels.
FP_HD bool saturated(float m) { return !(m < INFINITY); }

// A running max that is safe to subtract: a row that has seen no key yet (max = -inf) would
// otherwise compute exp(-inf - (-inf)) = NaN. Not called on saturated rows (see row_rescale).
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
// (through safe_max) when it exponentiates the block's scores, unless the row is saturated: then
// the caller gives the block's keys probability 0 and adds nothing (the factor is 0, so l and the
// accumulated output stay 0). The caller then adds the block's sum of exponentials with row_add.
FP_HD float row_rescale(RowState& st, float block_max) {
  if (saturated(st.m)) return 0.0f;
  // A NaN block max fails the comparison and is taken: the row saturates.
  const float m_new = st.m > block_max ? st.m : block_max;
  // m_old = -inf means nothing was accumulated: the factor is irrelevant, 0 keeps it finite.
  const float alpha = (st.m == -INFINITY || saturated(m_new)) ? 0.0f : fp_exp(st.m - m_new);
  st.m = m_new;
  st.l *= alpha;
  return alpha;
}

FP_HD void row_add(RowState& st, float block_sum) { st.l += block_sum; }

// Natural-log log-sum-exp of the row; -inf for a row that attended to no key; the max itself for
// a saturated row.
FP_HD float row_lse(const RowState& st) {
  if (saturated(st.m)) return st.m;
  return st.l > 0.0f ? st.m + fp_log(st.l) : -INFINITY;
}

// Factor turning the accumulated (unnormalised) output into the attention output; 0 for a row
// with no key (or a saturated one), so its output is 0 rather than NaN.
FP_HD float row_out_scale(const RowState& st) { return st.l > 0.0f ? 1.0f / st.l : 0.0f; }

// Whether a row's lse gives every key probability 0 in the backward: no key at all (-inf), or a
// saturated row.
FP_HD bool lse_gives_no_probability(float lse) { return lse == -INFINITY || saturated(lse); }

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

// The merge of a query row's two partial attentions: prompt keys (p) and image keys (i).
struct Merge {
  float wp, wi;  // weights of the partial outputs
  float lse;     // merged log-sum-exp
};

// lse_p / lse_i = -inf for a part with no key (then its output is never read). A saturated
// merged lse gives weights 0, as the reference does.
FP_HD Merge merge_rows(float lse_p, float lse_i) {
  const float lse = lse_merge(lse_p, lse_i);
  if (saturated(lse)) return Merge{0.0f, 0.0f, lse};
  return Merge{merge_weight(lse_p, lse), merge_weight(lse_i, lse), lse};
}

// One output element of the merge. A part with weight 0 is skipped rather than multiplied, so a
// part that had no valid key (whose output may hold anything, NaN included) never reaches it.
FP_HD float merge_value(const Merge& w, float o_p, float o_i) {
  return (w.wp > 0.0f ? w.wp * o_p : 0.0f) + (w.wi > 0.0f ? w.wi * o_i : 0.0f);
}

// Valid values of prompt_index (a set of T) and prompt_lengths (keys of a set of P slots).
FP_HD bool set_index_ok(int64_t t, int64_t T) { return t >= 0 && t < T; }
FP_HD bool set_length_ok(int64_t n, int64_t P) { return n >= 0 && n <= P; }

// One (sequence, prompt) score term accumulates dK . u_k + dV . u_v over heads and features.
FP_HD float score_term_fma(float acc, float dk, float uk, float dv, float uv) {
  return acc + dk * uk + dv * uv;
}

}  // namespace fastprompt
