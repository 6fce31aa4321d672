// Tensor-level entry points of the fastprompt_ext operators.
//
// registration.cpp binds them to the schemas and documents them; csrc/cpu/ holds the CPU kernels,
// csrc/cascade/ the cascade over PyTorch's fused attention (the CUDA path, and its CPU twin).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastprompt {

using OptTensor = std::optional<at::Tensor>;
using Tensor = at::Tensor;

using BwdResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The CPU kernels (csrc/cpu/prompt_attention.cpp).
std::tuple<Tensor, Tensor> prompt_attention_fwd_cpu(const Tensor& q, const Tensor& k,
                                                    const Tensor& v, const Tensor& prompt_k,
                                                    const Tensor& prompt_v,
                                                    const OptTensor& prompt_index,
                                                    const OptTensor& prompt_lengths, double scale,
                                                    const OptTensor& key_bias);

BwdResult prompt_attention_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                   const Tensor& v, const Tensor& prompt_k, const Tensor& prompt_v,
                                   const OptTensor& prompt_index, const OptTensor& prompt_lengths,
                                   const Tensor& out, const Tensor& lse, double scale,
                                   const OptTensor& u_k, const OptTensor& u_v,
                                   const OptTensor& key_bias, bool image_grads);

// The cascade (csrc/cascade/cascade.cpp), on any device the build has kernels for.
std::tuple<Tensor, Tensor> cascade_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& prompt_k, const Tensor& prompt_v,
                                       const OptTensor& prompt_index,
                                       const OptTensor& prompt_lengths, double scale,
                                       const OptTensor& key_bias);

BwdResult cascade_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Tensor& prompt_k, const Tensor& prompt_v,
                      const OptTensor& prompt_index, const OptTensor& prompt_lengths,
                      const Tensor& out, const Tensor& lse, double scale, const OptTensor& u_k,
                      const OptTensor& u_v, const OptTensor& key_bias, bool image_grads);

// What this build is: CPU ISA it was compiled for, GEMM providers, CUDA archs (for `info`).
std::string build_info();

}  // namespace fastprompt
