// The fastprompt_ext operator library: schemas, and their CPU and CUDA kernels.
//
// These are low-level building blocks under their own namespace. The public op
// fastprompt::prompt_attention stays a Python custom op that picks a backend; this library is
// the "cpp" backend it can pick (fastprompt/kernels/cpp/__init__.py wraps it and registers the
// fake (meta) implementations used by torch.compile). Shapes:
//
//   prompt_attention_fwd(q, k, v, prompt_k, prompt_v, prompt_index?, prompt_lengths?, scale)
//       q (B, H, Nq, d), k/v (B, H, Nk, d), any strides; prompt_k/v (T, H, P, d); prompt_index
//       (B,) int: the set of each sequence (None: set 0); prompt_lengths (T,) int: valid keys per
//       set (None: P). Returns out (B, H, Nq, d) stored as (B, Nq, H, d), and lse (B, H, Nq)
//       fp32, natural log; a query with no key gets out 0 and lse -inf.
//   prompt_attention_bwd(dout, q, k, v, prompt_k, prompt_v, prompt_index?, prompt_lengths?, out,
//                        lse, scale, u_k?, u_v?)
//       Returns dq, dk, dv (contiguous, input dtype), dprompt_k/v (T, H, P, d) fp32 summed per
//       set in sequence order (deterministic), terms (S, B, P) fp32 (S = 0 without u_k/u_v; u_k,
//       u_v: (S, T, H, P, d)) and gate (B, P) fp32, Prompt Condensation's per-(sequence, prompt)
//       terms (see fastprompt/ops/prompt_scores.py).
//   prompt_scores(q, prompt_k, prompt_v, lse, delta, dprompt_k, dprompt_v, u_k, u_v, scale,
//                 prompt_index?, prompt_lengths?)
//       The same terms from per-sequence prompt gradients dprompt_k/v (B, H, P, d) and delta
//       (B, H, Nq) = sum(dout * out, -1): (terms (S, B, P), gate (B, P)), fp32.
//   gather_prompts(table, keep) -> (packed, counts)
//       table (L, P, D), keep (L, P) bool: the kept rows in (layer, index) order, packed (K, D),
//       and counts (L,) int64 on the CPU.
//   gather_prompts_backward(grad_packed, keep) -> grad_table (L, P, D), zero off the kept rows.
//   build_info() -> str: ISA, GEMM providers, CUDA archs of this build.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(fastprompt_ext, m) {
  m.def(
      "prompt_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor prompt_k, Tensor prompt_v, "
      "Tensor? prompt_index, Tensor? prompt_lengths, float scale) -> (Tensor, Tensor)");
  m.def(
      "prompt_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor prompt_k, "
      "Tensor prompt_v, Tensor? prompt_index, Tensor? prompt_lengths, Tensor out, Tensor lse, "
      "float scale, Tensor? u_k, Tensor? u_v) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "prompt_scores(Tensor q, Tensor prompt_k, Tensor prompt_v, Tensor lse, Tensor delta, "
      "Tensor dprompt_k, Tensor dprompt_v, Tensor u_k, Tensor u_v, float scale, "
      "Tensor? prompt_index, Tensor? prompt_lengths) -> (Tensor, Tensor)");
  m.def("gather_prompts(Tensor table, Tensor keep) -> (Tensor, Tensor)");
  m.def("gather_prompts_backward(Tensor grad_packed, Tensor keep) -> Tensor");
  m.def("build_info() -> str", &fastprompt::build_info);
}

TORCH_LIBRARY_IMPL(fastprompt_ext, CPU, m) {
  m.impl("prompt_attention_fwd", &fastprompt::prompt_attention_fwd_cpu);
  m.impl("prompt_attention_bwd", &fastprompt::prompt_attention_bwd_cpu);
  m.impl("prompt_scores", &fastprompt::prompt_scores_cpu);
  m.impl("gather_prompts", &fastprompt::gather_prompts_cpu);
  m.impl("gather_prompts_backward", &fastprompt::gather_prompts_backward_cpu);
}

#ifdef FASTPROMPT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastprompt_ext, CUDA, m) {
  m.impl("prompt_attention_fwd", &fastprompt::prompt_attention_fwd_cuda);
  m.impl("prompt_attention_bwd", &fastprompt::prompt_attention_bwd_cuda);
  m.impl("prompt_scores", &fastprompt::prompt_scores_cuda);
  m.impl("gather_prompts", &fastprompt::gather_prompts_cuda);
  m.impl("gather_prompts_backward", &fastprompt::gather_prompts_backward_cuda);
}
#endif
