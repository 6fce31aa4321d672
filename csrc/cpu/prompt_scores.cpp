// Prompt Condensation's score reduction on the CPU: the per-(sequence, prompt) terms and the
// gate, from per-sequence prompt gradients (the standalone op), and the reduction the fused
// attention backward shares with it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "blas.h"
#include "common.h"
#include "fastprompt/arith.h"
#include "vec_utils.h"

namespace fastprompt::cpu {

// terms[s, b, i] = sum_{h, d} dK_seq[b, h, i] . u_k[s, t_b, h, i] + dV_seq . u_v; gate[b, i] =
// sum over heads of the per-head gate parts. Fixed summation order.
void score_terms(const float* dpk_seq, const float* dpv_seq, const float* gate_part,
                 const at::Tensor& u_k, const at::Tensor& u_v, int64_t S, const Sets& sets,
                 const AttnShape& s, at::Tensor& terms, at::Tensor& gate) {
  const float* uk = u_k.const_data_ptr<float>();  // contiguous (S, T, H, P, d)
  const float* uv = u_v.const_data_ptr<float>();
  float* terms_p = terms.data_ptr<float>();  // (S, B, P)
  float* gate_p = gate.data_ptr<float>();    // (B, P)
  const int64_t P = s.P, d = s.d, H = s.H;
  at::parallel_for(0, s.B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t t = sets.set_of(b);
      for (int64_t i = 0; i < P; ++i) {
        float g = 0.0f;
        for (int64_t h = 0; h < H; ++h) g += gate_part[(b * H + h) * P + i];
        gate_p[b * P + i] = g;
        for (int64_t si = 0; si < S; ++si) {
          float acc = 0.0f;
          for (int64_t h = 0; h < H; ++h) {
            const float* gk = dpk_seq + ((b * H + h) * P + i) * d;
            const float* gv = dpv_seq + ((b * H + h) * P + i) * d;
            const int64_t u0 = (((si * s.T + t) * H + h) * P + i) * d;
            for (int64_t j = 0; j < d; ++j) {
              acc = score_term_fma(acc, gk[j], uk[u0 + j], gv[j], uv[u0 + j]);
            }
          }
          terms_p[(si * s.B + b) * P + i] = acc;
        }
      }
    }
  });
}

namespace {

// gate_part[b, h, i] = v_i . dV_i - sum_n P[n, i] delta_n for one head, P from q, the prompt keys
// and the forward lse (masked past the set's length).
template <typename T>
void gate_parts(const at::Tensor& q, const at::Tensor& pk, const at::Tensor& pv, const float* lse,
                const float* delta, const float* dpv_seq, const Sets& sets, const AttnShape& s,
                float scale, float* gate_part) {
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    BlasThreadGuard blas_threads;
    Scratch<float> probs(s.Nq * s.P), pdelta(s.P), vrow(s.d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.H, h = task % s.H;
      const int64_t t = sets.set_of(b), np = sets.length_of(t, s.P);
      const Mat<T> Q = mat<T>(q, b, h), PK = mat<T>(pk, t, h), PV = mat<T>(pv, t, h);
      const float* lrow = lse + task * s.Nq;
      const float* drow = delta + task * s.Nq;
      std::fill(pdelta.begin(), pdelta.end(), 0.0f);
      if (np > 0 && s.Nq > 0) {
        gemm(false, true, s.Nq, np, s.d, scale, Q.row(0), Q.ld, PK.row(0), PK.ld, 0.0f,
             probs.data(), np);
        for (int64_t n = 0; n < s.Nq; ++n) exp_sub(probs.data() + n * np, np, lrow[n]);
        // pdelta = P^T delta, summed over queries in order.
        for (int64_t n = 0; n < s.Nq; ++n)
          axpy_row(pdelta.data(), probs.data() + n * np, drow[n], np);
      }
      float* g = gate_part + task * s.P;
      const float* gv = dpv_seq + task * s.P * s.d;
      for (int64_t i = 0; i < s.P; ++i) {
        for (int64_t j = 0; j < s.d; ++j) vrow[j] = static_cast<float>(PV.row(i)[j]);
        g[i] = gate_from_parts(dot_row(vrow.data(), gv + i * s.d, s.d), pdelta[i]);
      }
    }
  });
}

}  // namespace
}  // namespace fastprompt::cpu

namespace fastprompt {
using namespace fastprompt::cpu;

std::tuple<Tensor, Tensor> prompt_scores_cpu(const Tensor& q_, const Tensor& pk_, const Tensor& pv_,
                                             const Tensor& lse, const Tensor& delta,
                                             const Tensor& dprompt_k, const Tensor& dprompt_v,
                                             const Tensor& u_k, const Tensor& u_v, double scale,
                                             const OptTensor& prompt_index,
                                             const OptTensor& prompt_lengths) {
  constexpr const char* op = "fastprompt_ext::prompt_scores";
  const AttnShape s = check_attention(q_, q_, q_, pk_, pv_, prompt_index, prompt_lengths, op);
  check_exact(lse, {s.B, s.H, s.Nq}, "lse", op);
  check_exact(delta, {s.B, s.H, s.Nq}, "delta", op);
  check_exact(dprompt_k, {s.B, s.H, s.P, s.d}, "dprompt_k", op);
  check_exact(dprompt_v, {s.B, s.H, s.P, s.d}, "dprompt_v", op);
  TORCH_CHECK(u_k.dim() == 5, op, ": u_k must be (S, T, H, P, d), got ", u_k.sizes());
  const int64_t S = u_k.size(0);
  check_exact(u_k, {S, s.T, s.H, s.P, s.d}, "u_k", op);
  check_exact(u_v, {S, s.T, s.H, s.P, s.d}, "u_v", op);
  for (const auto* t : {&lse, &delta, &dprompt_k, &dprompt_v, &u_k, &u_v}) {
    TORCH_CHECK(t->device() == q_.device(), op, ": every tensor must be on ", q_.device(),
                ", got one on ", t->device());
  }
  const Sets sets = read_sets(prompt_index, prompt_lengths, s, op);
  const at::Tensor q = rows_readable(q_), pk = rows_readable(pk_), pv = rows_readable(pv_);
  const auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const at::Tensor lse32 = f32(lse), delta32 = f32(delta), dpk = f32(dprompt_k),
                   dpv = f32(dprompt_v), uk = f32(u_k), uv = f32(u_v);
  const auto opts = q.options().dtype(at::kFloat);
  at::Tensor gate_part = at::zeros({s.B, s.H, s.P}, opts);
  if (s.B * s.H * s.P > 0) {
    FP_DISPATCH_FLOATS(q.scalar_type(), "prompt_scores", [&] {
      gate_parts<scalar_t>(q, pk, pv, lse32.const_data_ptr<float>(),
                           delta32.const_data_ptr<float>(), dpv.const_data_ptr<float>(), sets, s,
                           static_cast<float>(scale), gate_part.data_ptr<float>());
    });
  }
  at::Tensor terms = at::empty({S, s.B, s.P}, opts);
  at::Tensor gate = at::empty({s.B, s.P}, opts);
  score_terms(dpk.const_data_ptr<float>(), dpv.const_data_ptr<float>(),
              gate_part.const_data_ptr<float>(), uk, uv, S, sets, s, terms, gate);
  return {terms, gate};
}

}  // namespace fastprompt
