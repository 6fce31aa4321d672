// The fastprompt_ext operator library: schemas, and their CPU and CUDA implementations.
//
// These are low-level building blocks under their own namespace. The public op
// fastprompt::prompt_attention stays a Python custom op that picks a backend; this library is
// the "cpp" backend it can pick (fastprompt/kernels/cpp/__init__.py wraps it and registers the
// fake (meta) implementations used by torch.compile). Shapes:
//
//   prompt_attention_fwd(q, k, v, prompt_k, prompt_v, prompt_index?, prompt_lengths?, scale,
//                        key_bias?)
//       q (B, H, Nq, d), k/v (B, H, Nk, d), any strides; prompt_k/v (T, H, P, d); prompt_index
//       (B,) int: the set of each sequence (None: set 0); prompt_lengths (T,) int: valid keys per
//       set (None: P); key_bias: floating point, broadcastable to (B, H, Nq, Nk) or with a first
//       dimension G dividing B (sequence b reads row b mod G), added to the scores of the image
//       keys only (prompt keys get none), not differentiated. Returns out
//       (B, H, Nq, d) stored as (B, Nq, H, d), and lse (B, H, Nq) fp32 contiguous, natural log;
//       a query with no key gets out 0 and lse -inf.
//   prompt_attention_bwd(dout, q, k, v, prompt_k, prompt_v, prompt_index?, prompt_lengths?, out,
//                        lse, scale, u_k?, u_v?, key_bias?, image_grads=True)
//       Returns dq, dk, dv (shapes of q, k, v, dtype of q, any layout; with image_grads false
//       they are not computed and their values are unspecified), dprompt_k/v (T, H, P, d)
//       fp32 summed per set in a fixed order (deterministic), and, when u_k, u_v (S, T, H, P, d)
//       are given, Prompt Condensation's terms (S, B, P) and gate (B, P), fp32, from the
//       per-sequence prompt gradients before they are summed (fastprompt.ops.scores.
//       prompt_scores_ref defines them); without u_k, u_v: terms (0, B, P) and a zero gate.
//   cascade_attention_fwd / cascade_attention_bwd: the same contracts, computed as a cascade over
//       PyTorch's fused attention (csrc/cascade/). On CUDA the two prompt_attention_* schemas
//       are exactly these; on the CPU the prompt_attention_* schemas run the CPU kernels
//       (csrc/cpu/), faster there, and these run the CUDA path's orchestration on PyTorch's CPU
//       flash kernel, which is how the tests cover it without a GPU.
//   build_info() -> str: ISA, GEMM providers, CUDA archs of this build.
#include <torch/library.h>

#include "ops.h"

#define FP_FWD_SCHEMA                                                                      \
  "(Tensor q, Tensor k, Tensor v, Tensor prompt_k, Tensor prompt_v, Tensor? prompt_index, " \
  "Tensor? prompt_lengths, float scale, Tensor? key_bias=None) -> (Tensor, Tensor)"
#define FP_BWD_SCHEMA                                                                   \
  "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor prompt_k, Tensor prompt_v, "      \
  "Tensor? prompt_index, Tensor? prompt_lengths, Tensor out, Tensor lse, float scale, " \
  "Tensor? u_k, Tensor? u_v, Tensor? key_bias=None, bool image_grads=True) "              \
  "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

TORCH_LIBRARY(fastprompt_ext, m) {
  m.def("prompt_attention_fwd" FP_FWD_SCHEMA);
  m.def("prompt_attention_bwd" FP_BWD_SCHEMA);
  m.def("cascade_attention_fwd" FP_FWD_SCHEMA);
  m.def("cascade_attention_bwd" FP_BWD_SCHEMA);
  m.def("build_info() -> str", &fastprompt::build_info);
}

TORCH_LIBRARY_IMPL(fastprompt_ext, CPU, m) {
  m.impl("prompt_attention_fwd", &fastprompt::prompt_attention_fwd_cpu);
  m.impl("prompt_attention_bwd", &fastprompt::prompt_attention_bwd_cpu);
  m.impl("cascade_attention_fwd", &fastprompt::cascade_fwd);
  m.impl("cascade_attention_bwd", &fastprompt::cascade_bwd);
}

#ifdef FASTPROMPT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastprompt_ext, CUDA, m) {
  m.impl("prompt_attention_fwd", &fastprompt::cascade_fwd);
  m.impl("prompt_attention_bwd", &fastprompt::cascade_bwd);
  m.impl("cascade_attention_fwd", &fastprompt::cascade_fwd);
  m.impl("cascade_attention_bwd", &fastprompt::cascade_bwd);
}
#endif
