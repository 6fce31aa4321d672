// The small kernels of the cascade, where PyTorch has no fused op: the set checks, the
// log-sum-exp merge of the two partial attentions, the per-set sum of per-sequence prompt
// gradients and Prompt Condensation's score epilogue.
//
// Each has a CPU twin (csrc/cpu/cascade_kernels.cpp, what the tests run) and a CUDA kernel
// (csrc/cuda/cascade_kernels.cu, launched from csrc/cuda/dispatch.cpp); both take their
// per-element arithmetic from fastprompt/arith.h. The functions here pick one by device.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fastprompt::cascade {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// The kernels of one device type.
struct Kernels {
  // Raises (a c10::Error naming the argument, recoverably: no device assertion) if a value of
  // index (B,) lies outside [0, T) or one of lengths (T,) outside [0, P].
  void (*check_sets)(const OptTensor& index, const OptTensor& lengths, int64_t T, int64_t P,
                     const char* op);
  // out[b, h, n] = w_p o_p + w_i o_i, lse = log(e^lse_p + e^lse_i) (fastprompt/arith.h merge):
  // o_p / o_i (B, H, N, d) and lse_p / lse_i (B, H, N) fp32, any strides, or undefined for a part
  // with no key; counts (B,) int64 valid prompt keys per sequence (a sequence with 0 ignores
  // the prompt part), or undefined. out (B, H, N, d) and lse (B, H, N) fp32 are written.
  void (*merge)(const Tensor& o_p, const Tensor& lse_p, const Tensor& o_i, const Tensor& lse_i,
                const Tensor& counts, const Tensor& out, const Tensor& lse);
  // (T, H, P, d) fp32: set t's sum of per_seq (B, H, P, d) over its sequences, which are
  // order[offsets[t]] ... order[offsets[t + 1] - 1] in increasing order (int64 tensors).
  Tensor (*reduce_sets)(const Tensor& per_seq, const Tensor& order, const Tensor& offsets,
                        int64_t T);
  // Prompt Condensation's terms (S, B, P) = sum over h, j of dk[b, h, i, j] u_k[s, t_b, h, i, j]
  // + dv u_v, and gate (B, P) = gate_mult * sum over h of gate_src[b, h, i]. dk, dv (B, H, P, d)
  // and gate_src (B, H, P): any strides, one float dtype; u_k, u_v (S, T, H, P, d) fp32
  // contiguous; index (B,) int64 or undefined (set 0).
  void (*score_terms)(const Tensor& dk, const Tensor& dv, const Tensor& gate_src,
                      double gate_mult, const Tensor& u_k, const Tensor& u_v, const Tensor& index,
                      const Tensor& terms, const Tensor& gate);
};

extern const Kernels kCpuKernels;
#ifdef FASTPROMPT_WITH_CUDA
extern const Kernels kCudaKernels;
#endif

inline const Kernels& kernels_for(const Tensor& t) {
#ifdef FASTPROMPT_WITH_CUDA
  if (t.is_cuda()) return kCudaKernels;
#endif
  TORCH_CHECK(t.is_cpu(), "fastprompt_ext: no kernels for device ", t.device(),
              " in this build (see `fastprompt info`)");
  return kCpuKernels;
}

}  // namespace fastprompt::cascade
