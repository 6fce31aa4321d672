// One part of a cascade: ordinary attention of some queries over some keys, on PyTorch's own
// fused kernels, returning what the merge and the exact backward need.
//
// CPU: the CPU flash kernel (the one scaled_dot_product_attention runs). CUDA: FlashAttention-2
// for fp16/bf16 without a bias, PyTorch's memory-efficient kernel otherwise (fp32 runs there as
// 3xTF32 on tensor cores, fp32-accurate; a key bias masks prompt slots past a set's length). The
// caller never passes a part without queries or keys (the CPU kernel divides by those lengths).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastprompt::cascade {

using Tensor = at::Tensor;

// out (B, H, Nq, d) in q's dtype, any layout; lse (B, H, Nq) fp32, any layout. bias: additive,
// 4-D, broadcastable to (B, H, Nq, Nk), or undefined; in q's dtype on CUDA with the strides of its
// non-broadcast dims but the last multiples of 16 elements (the memory-efficient kernel's
// alignment), in q's dtype or fp32 on the CPU.
std::tuple<Tensor, Tensor> part_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& bias, double scale);

// dq, dk, dv (layouts as the kernel returns them) of one part, given the *merged* out and lse
// of the whole attention (lse (B, H, Nq) fp32 contiguous, +inf where a row has no probability):
// the part's exact share of the gradients.
std::tuple<Tensor, Tensor, Tensor> part_backward(const Tensor& dout, const Tensor& q,
                                                 const Tensor& k, const Tensor& v,
                                                 const Tensor& bias, const Tensor& out,
                                                 const Tensor& lse, double scale);

// Why the CUDA parts cannot take inputs of this dtype and head dim here (empty if they can).
std::string cuda_part_unsupported(at::ScalarType dtype, int64_t head_dim);

}  // namespace fastprompt::cascade
