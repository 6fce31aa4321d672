// The parts of the cascade on PyTorch's fused attention kernels (see parts.h).
//
// Everything device-specific of the cascade is in this file: the CPU branch is what the test
// suite runs; the CUDA branch calls the kernels behind scaled_dot_product_attention directly,
// with the arguments their ATen schemas have had unchanged since torch 2.2.
#include "parts.h"

#include <ATen/Context.h>
#include <ATen/ops/_scaled_dot_product_efficient_attention.h>
#include <ATen/ops/_scaled_dot_product_efficient_attention_backward.h>
#include <ATen/ops/_scaled_dot_product_flash_attention.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_backward.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <vector>

#ifdef FASTPROMPT_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fastprompt::cascade {
namespace {

std::optional<Tensor> maybe(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

// The CPU flash kernel of torch 2.6 reads a mask's keys with unit stride, whatever its stride
// (a transposed mask gave wrong results): a mask strided along the keys is copied first, its
// other broadcast dimensions kept broadcast.
std::optional<Tensor> cpu_mask(const Tensor& t) {
  if (!t.defined()) return std::nullopt;
  if (t.size(-1) <= 1 || t.stride(-1) == 1) return t;
  Tensor base = t;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    if (t.stride(i) == 0) base = base.narrow(i, 0, 1);
  }
  return base.contiguous().expand(t.sizes());
}

// FlashAttention-2 needs sm_80 or newer.
bool flash_capable(const Tensor& q) {
#ifdef FASTPROMPT_WITH_CUDA
  int major = 0;
  const cudaError_t err =
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device());
  TORCH_CHECK(err == cudaSuccess, "fastprompt_ext: cannot read the compute capability of ",
              q.device(), ": ", cudaGetErrorString(err));
  return major >= 8;
#else
  return false;  // a build without CUDA never sees a CUDA tensor here
#endif
}

// FlashAttention-2: fp16/bf16, head dims that are multiples of 8 up to 256, no bias.
bool use_flash(const Tensor& q, const Tensor& bias) {
  const auto st = q.scalar_type();
  return !bias.defined() && (st == at::kHalf || st == at::kBFloat16) && q.size(-1) % 8 == 0 &&
         q.size(-1) <= 256 && at::globalContext().userEnabledFlashSDP() && flash_capable(q);
}

// The memory-efficient kernel reads a (B, H, Nq, Nk) bias through its strides: the (B, 1, 1, Nk)
// key bias is expanded (stride 0 over heads and queries, which its alignment rules accept).
Tensor full_bias(const Tensor& bias, const Tensor& q, const Tensor& k) {
  if (!bias.defined()) return bias;
  return bias.expand({q.size(0), q.size(1), q.size(2), k.size(2)});
}

// The memory-efficient kernel pads lse to a multiple of 32 queries and may read the padding.
Tensor padded_lse(const Tensor& lse) {
  const int64_t n = lse.size(2), padded = (n + 31) / 32 * 32;
  if (padded == n && lse.is_contiguous()) return lse;
  Tensor out = at::empty({lse.size(0), lse.size(1), padded}, lse.options());
  out.narrow(2, n, padded - n).fill_(INFINITY);  // no probability for a padding row
  out.narrow(2, 0, n).copy_(lse);
  return out;
}

// CUDA launches at most 65,535 blocks along a grid's y and z, where PyTorch's fused kernels put
// the sequences (flash, and the memory-efficient kernel in older torch versions): a part with
// more sequences (a windowed backbone at a large batch) is run in parts of at most this many,
// on every device, so that the CPU tests run the same loop. Parts also keep a stride-0 (shared)
// key from the memory-efficient backward's own batch split, which allocates its gradient with
// the key's strides.
constexpr int64_t kMaxSequences = 65535;

// Sequences [start, start + n) of t, when t has one row per sequence (else it broadcasts).
Tensor seq_rows(const Tensor& t, int64_t start, int64_t n, int64_t batch) {
  if (!t.defined() || t.dim() == 0 || t.size(0) != batch || batch == 1) return t;
  return t.narrow(0, start, n);
}

}  // namespace

std::string cuda_part_unsupported(at::ScalarType dtype, int64_t head_dim) {
  if (head_dim % 8 != 0 || head_dim > 256) {
    return "the CUDA path takes head dims that are multiples of 8 up to 256 (PyTorch's fused "
           "attention kernels), got " +
           std::to_string(head_dim);
  }
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  const auto& ctx = at::globalContext();
  if (!ctx.userEnabledMemEfficientSDP() && !(half && ctx.userEnabledFlashSDP())) {
    return "PyTorch's fused attention kernels for this dtype are disabled "
           "(torch.backends.cuda.enable_mem_efficient_sdp / enable_flash_sdp)";
  }
  return "";
}

std::tuple<Tensor, Tensor> part_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& bias, double scale) {
  if (const int64_t B = q.size(0); B > kMaxSequences) {
    std::vector<Tensor> outs, lses;
    for (int64_t i = 0; i < B; i += kMaxSequences) {
      const int64_t n = std::min(kMaxSequences, B - i);
      auto [o, l] = part_forward(q.narrow(0, i, n), seq_rows(k, i, n, B), seq_rows(v, i, n, B),
                                 seq_rows(bias, i, n, B), scale);
      outs.push_back(o);
      lses.push_back(l);
    }
    return {at::cat(outs), at::cat(lses)};
  }
  if (q.is_cpu()) {
    auto [out, lse] =
        at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, false, cpu_mask(bias), scale);
    return {out, lse};
  }
  const std::string why = cuda_part_unsupported(q.scalar_type(), q.size(-1));
  TORCH_CHECK(why.empty(), "fastprompt_ext: ", why);
  if (use_flash(q, bias)) {
    auto r = at::_scaled_dot_product_flash_attention(q, k, v, 0.0, false, false, scale);
    return {std::get<0>(r), std::get<1>(r)};
  }
  auto r = at::_scaled_dot_product_efficient_attention(q, k, v, maybe(full_bias(bias, q, k)),
                                                       true, 0.0, false, scale);
  return {std::get<0>(r), std::get<1>(r).narrow(2, 0, q.size(2))};
}

std::tuple<Tensor, Tensor, Tensor> part_backward(const Tensor& dout, const Tensor& q,
                                                 const Tensor& k, const Tensor& v,
                                                 const Tensor& bias, const Tensor& out,
                                                 const Tensor& lse, double scale) {
  if (const int64_t B = q.size(0); B > kMaxSequences) {
    std::vector<Tensor> dqs, dks, dvs;
    for (int64_t i = 0; i < B; i += kMaxSequences) {
      const int64_t n = std::min(kMaxSequences, B - i);
      auto [dq, dk, dv] =
          part_backward(dout.narrow(0, i, n), q.narrow(0, i, n), seq_rows(k, i, n, B),
                        seq_rows(v, i, n, B), seq_rows(bias, i, n, B), out.narrow(0, i, n),
                        lse.narrow(0, i, n), scale);
      dqs.push_back(dq);
      dks.push_back(dk);
      dvs.push_back(dv);
    }
    return {at::cat(dqs), at::cat(dks), at::cat(dvs)};
  }
  if (q.is_cpu()) {
    return at::_scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0,
                                                                    false, cpu_mask(bias), scale);
  }
  const std::string why = cuda_part_unsupported(q.scalar_type(), q.size(-1));
  TORCH_CHECK(why.empty(), "fastprompt_ext: ", why);
  // Dropout is 0: the random-number state is never read.
  const Tensor no_rng = at::empty({0}, q.options().dtype(at::kLong));
  if (use_flash(q, bias)) {
    // Dense (not variable-length) sequences: no cumulative lengths.
    return at::_scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, Tensor(),
                                                            Tensor(), q.size(2), k.size(2), 0.0,
                                                            false, no_rng, no_rng, scale);
  }
  auto r = at::_scaled_dot_product_efficient_attention_backward(
      dout, q, k, v, full_bias(bias, q, k), out, padded_lse(lse), no_rng, no_rng, 0.0,
      {true, true, true, false}, false, scale);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

}  // namespace fastprompt::cascade
