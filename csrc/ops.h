// Tensor-level entry points of the fastprompt_ext operators, one set per device.
//
// registration.cpp binds them to the schemas; csrc/cpu/ and csrc/cuda/ implement them. The
// schemas and their meaning are documented in registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastprompt {

using OptTensor = std::optional<at::Tensor>;
using Tensor = at::Tensor;

std::tuple<Tensor, Tensor> prompt_attention_fwd_cpu(const Tensor& q, const Tensor& k,
                                                    const Tensor& v, const Tensor& prompt_k,
                                                    const Tensor& prompt_v,
                                                    const OptTensor& prompt_index,
                                                    const OptTensor& prompt_lengths, double scale);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> prompt_attention_bwd_cpu(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prompt_k,
    const Tensor& prompt_v, const OptTensor& prompt_index, const OptTensor& prompt_lengths,
    const Tensor& out, const Tensor& lse, double scale, const OptTensor& u_k, const OptTensor& u_v);

std::tuple<Tensor, Tensor> prompt_scores_cpu(const Tensor& q, const Tensor& prompt_k,
                                             const Tensor& prompt_v, const Tensor& lse,
                                             const Tensor& delta, const Tensor& dprompt_k,
                                             const Tensor& dprompt_v, const Tensor& u_k,
                                             const Tensor& u_v, double scale,
                                             const OptTensor& prompt_index,
                                             const OptTensor& prompt_lengths);

std::tuple<Tensor, Tensor> gather_prompts_cpu(const Tensor& table, const Tensor& keep);
Tensor gather_prompts_backward_cpu(const Tensor& grad_packed, const Tensor& keep);

#ifdef FASTPROMPT_WITH_CUDA
std::tuple<Tensor, Tensor> prompt_attention_fwd_cuda(const Tensor& q, const Tensor& k,
                                                     const Tensor& v, const Tensor& prompt_k,
                                                     const Tensor& prompt_v,
                                                     const OptTensor& prompt_index,
                                                     const OptTensor& prompt_lengths, double scale);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> prompt_attention_bwd_cuda(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prompt_k,
    const Tensor& prompt_v, const OptTensor& prompt_index, const OptTensor& prompt_lengths,
    const Tensor& out, const Tensor& lse, double scale, const OptTensor& u_k, const OptTensor& u_v);

std::tuple<Tensor, Tensor> prompt_scores_cuda(const Tensor& q, const Tensor& prompt_k,
                                              const Tensor& prompt_v, const Tensor& lse,
                                              const Tensor& delta, const Tensor& dprompt_k,
                                              const Tensor& dprompt_v, const Tensor& u_k,
                                              const Tensor& u_v, double scale,
                                              const OptTensor& prompt_index,
                                              const OptTensor& prompt_lengths);

std::tuple<Tensor, Tensor> gather_prompts_cuda(const Tensor& table, const Tensor& keep);
Tensor gather_prompts_backward_cuda(const Tensor& grad_packed, const Tensor& keep);
#endif

// What this build is: CPU ISA it was compiled for, GEMM providers, CUDA archs (for `info`).
std::string build_info();

}  // namespace fastprompt
