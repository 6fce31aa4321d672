// CUDA entry points of the fastprompt_ext operators: checks, allocation and launcher calls.
//
// Compiled by the host compiler (torch headers stay out of the .cu files). Outputs follow the
// CPU kernels exactly: out stored (B, N, H, d), contiguous dq/dk/dv, fp32 per-set prompt
// gradients, and the per-sequence buffers zeroed so prompt keys past a set's length get none.
// prompt_index / prompt_lengths values are checked on the device (a bad value stops the kernel)
// rather than here, which would synchronise.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks.h"
#include "../ops.h"
#include "params.h"

namespace fastprompt {
namespace {

using cuda::View4;

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return cuda::DType::f32;
    case at::kHalf:
      return cuda::DType::f16;
    default:
      return cuda::DType::bf16;
  }
}

// Unit stride along d is what the kernels need; other layouts are copied once.
at::Tensor unit_last(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

View4 view(const at::Tensor& t) {
  return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

const int64_t* index_ptr(const OptTensor& t, at::Tensor& keep_alive) {
  if (!t.has_value()) return nullptr;
  keep_alive = t->to(at::kLong).contiguous();
  return keep_alive.const_data_ptr<int64_t>();
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

struct Prepared {
  cuda::AttnParams a;
  at::Tensor q, k, v, pk, pv, index, lengths;  // keep the copies alive
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& pk, const at::Tensor& pv, const OptTensor& index,
                 const OptTensor& lengths, double scale, const char* op) {
  const AttnShape s = check_attention(q, k, v, pk, pv, index, lengths, op);
  TORCH_CHECK(s.d >= 1 && s.d <= 128, op, ": the CUDA kernels take head dims 1 to 128, got ", s.d);
  Prepared r;
  r.q = unit_last(q);
  r.k = unit_last(k);
  r.v = unit_last(v);
  r.pk = unit_last(pk);
  r.pv = unit_last(pv);
  cuda::AttnParams& a = r.a;
  a.dtype = dtype_of(q);
  a.B = static_cast<int>(s.B);
  a.H = static_cast<int>(s.H);
  a.Nq = static_cast<int>(s.Nq);
  a.Nk = static_cast<int>(s.Nk);
  a.d = static_cast<int>(s.d);
  a.T = static_cast<int>(s.T);
  a.P = static_cast<int>(s.P);
  a.q = view(r.q);
  a.k = view(r.k);
  a.v = view(r.v);
  a.pk = view(r.pk);
  a.pv = view(r.pv);
  a.index = index_ptr(index, r.index);
  a.lengths = index_ptr(lengths, r.lengths);
  a.scale = static_cast<float>(scale);
  return r;
}

}  // namespace

std::tuple<Tensor, Tensor> prompt_attention_fwd_cuda(const Tensor& q, const Tensor& k,
                                                     const Tensor& v, const Tensor& prompt_k,
                                                     const Tensor& prompt_v,
                                                     const OptTensor& prompt_index,
                                                     const OptTensor& prompt_lengths,
                                                     double scale) {
  constexpr const char* op = "fastprompt_ext::prompt_attention_fwd";
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared in = prepare(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale, op);
  const auto& a = in.a;
  at::Tensor out = at::empty({a.B, a.Nq, a.H, a.d}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({a.B, a.H, a.Nq}, q.options().dtype(at::kFloat));
  cuda::FwdParams p{a, out.data_ptr(), lse.data_ptr<float>()};
  check_launch(cuda::launch_prompt_attention_fwd(p, c10::cuda::getCurrentCUDAStream()), op);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> prompt_attention_bwd_cuda(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& prompt_k,
    const Tensor& prompt_v, const OptTensor& prompt_index, const OptTensor& prompt_lengths,
    const Tensor& out, const Tensor& lse, double scale, const OptTensor& u_k,
    const OptTensor& u_v) {
  constexpr const char* op = "fastprompt_ext::prompt_attention_bwd";
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared in = prepare(q, k, v, prompt_k, prompt_v, prompt_index, prompt_lengths, scale, op);
  const auto& a = in.a;
  check_exact(dout, q.sizes(), "dout", op);
  check_exact(out, q.sizes(), "out", op);
  check_same(dout, q, "dout", op);
  check_same(out, q, "out", op);
  check_exact(lse, {a.B, a.H, a.Nq}, "lse", op);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.device() == q.device(), op,
              ": lse must be float32 on ", q.device(), ", got ", lse.scalar_type(), " on ",
              lse.device());
  TORCH_CHECK(u_k.has_value() == u_v.has_value(), op, ": give both u_k and u_v or neither");
  const int64_t S = u_k.has_value() ? u_k->size(0) : 0;
  if (u_k.has_value()) {
    check_exact(*u_k, {S, a.T, a.H, a.P, a.d}, "u_k", op);
    check_exact(*u_v, {S, a.T, a.H, a.P, a.d}, "u_v", op);
  }
  const at::Tensor dout_u = unit_last(dout), out_u = unit_last(out), lse_c = lse.contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty({a.B, a.H, a.Nq, a.d}, q.options());
  at::Tensor dk = at::empty({a.B, a.H, a.Nk, a.d}, q.options());
  at::Tensor dv = at::empty({a.B, a.H, a.Nk, a.d}, q.options());
  at::Tensor delta = at::empty({a.B, a.H, a.Nq}, f32);
  at::Tensor dpk_seq = at::zeros({a.B, a.H, a.P, a.d}, f32);
  at::Tensor dpv_seq = at::zeros({a.B, a.H, a.P, a.d}, f32);
  at::Tensor gate_part = at::zeros({a.B, a.H, a.P}, f32);
  at::Tensor dpk = at::empty({a.T, a.H, a.P, a.d}, f32);
  at::Tensor dpv = at::empty({a.T, a.H, a.P, a.d}, f32);
  cuda::BwdParams p{a,
                    view(dout_u),
                    view(out_u),
                    lse_c.const_data_ptr<float>(),
                    delta.data_ptr<float>(),
                    dq.data_ptr(),
                    dk.data_ptr(),
                    dv.data_ptr(),
                    dpk_seq.data_ptr<float>(),
                    dpv_seq.data_ptr<float>(),
                    gate_part.data_ptr<float>(),
                    dpk.data_ptr<float>(),
                    dpv.data_ptr<float>()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(cuda::launch_prompt_attention_bwd(p, stream), op);
  at::Tensor terms = at::empty({S, a.B, a.P}, f32);
  at::Tensor gate = at::empty({a.B, a.P}, f32);
  const at::Tensor uk = S > 0 ? u_k->to(at::kFloat).contiguous() : at::empty({0}, f32);
  const at::Tensor uv = S > 0 ? u_v->to(at::kFloat).contiguous() : at::empty({0}, f32);
  cuda::TermsParams tp{static_cast<int>(S),
                       a.B,
                       a.T,
                       a.H,
                       a.P,
                       a.d,
                       a.index,
                       dpk_seq.const_data_ptr<float>(),
                       dpv_seq.const_data_ptr<float>(),
                       gate_part.const_data_ptr<float>(),
                       uk.const_data_ptr<float>(),
                       uv.const_data_ptr<float>(),
                       terms.data_ptr<float>(),
                       gate.data_ptr<float>()};
  check_launch(cuda::launch_score_terms(tp, stream), op);
  return {dq, dk, dv, dpk, dpv, terms, gate};
}

std::tuple<Tensor, Tensor> prompt_scores_cuda(const Tensor& q, const Tensor& prompt_k,
                                              const Tensor& prompt_v, const Tensor& lse,
                                              const Tensor& delta, const Tensor& dprompt_k,
                                              const Tensor& dprompt_v, const Tensor& u_k,
                                              const Tensor& u_v, double scale,
                                              const OptTensor& prompt_index,
                                              const OptTensor& prompt_lengths) {
  constexpr const char* op = "fastprompt_ext::prompt_scores";
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared in = prepare(q, q, q, prompt_k, prompt_v, prompt_index, prompt_lengths, scale, op);
  const auto& a = in.a;
  check_exact(lse, {a.B, a.H, a.Nq}, "lse", op);
  check_exact(delta, {a.B, a.H, a.Nq}, "delta", op);
  check_exact(dprompt_k, {a.B, a.H, a.P, a.d}, "dprompt_k", op);
  check_exact(dprompt_v, {a.B, a.H, a.P, a.d}, "dprompt_v", op);
  TORCH_CHECK(u_k.dim() == 5, op, ": u_k must be (S, T, H, P, d), got ", u_k.sizes());
  const int64_t S = u_k.size(0);
  check_exact(u_k, {S, a.T, a.H, a.P, a.d}, "u_k", op);
  check_exact(u_v, {S, a.T, a.H, a.P, a.d}, "u_v", op);
  for (const auto* t : {&lse, &delta, &dprompt_k, &dprompt_v, &u_k, &u_v}) {
    TORCH_CHECK(t->device() == q.device(), op, ": every tensor must be on ", q.device(),
                ", got one on ", t->device());
  }
  const auto f32c = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  const at::Tensor lse32 = f32c(lse), delta32 = f32c(delta), dpk = f32c(dprompt_k),
                   dpv = f32c(dprompt_v), uk = f32c(u_k), uv = f32c(u_v);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor gate_part = at::zeros({a.B, a.H, a.P}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::GateParams gp{a, lse32.const_data_ptr<float>(), delta32.const_data_ptr<float>(),
                      dpv.const_data_ptr<float>(), gate_part.data_ptr<float>()};
  check_launch(cuda::launch_prompt_gate(gp, stream), op);
  at::Tensor terms = at::empty({S, a.B, a.P}, f32);
  at::Tensor gate = at::empty({a.B, a.P}, f32);
  cuda::TermsParams tp{static_cast<int>(S),
                       a.B,
                       a.T,
                       a.H,
                       a.P,
                       a.d,
                       a.index,
                       dpk.const_data_ptr<float>(),
                       dpv.const_data_ptr<float>(),
                       gate_part.const_data_ptr<float>(),
                       uk.const_data_ptr<float>(),
                       uv.const_data_ptr<float>(),
                       terms.data_ptr<float>(),
                       gate.data_ptr<float>()};
  check_launch(cuda::launch_score_terms(tp, stream), op);
  return {terms, gate};
}

namespace {

void check_keep(const at::Tensor& data, const at::Tensor& keep, const char* op, const char* name) {
  TORCH_CHECK(keep.dim() == 2 && keep.scalar_type() == at::kBool, op,
              ": keep must be a 2-D bool tensor (L, P), got ", keep.scalar_type(), " ",
              keep.sizes());
  TORCH_CHECK(keep.device() == data.device(), op, ": keep is on ", keep.device(), ", ", name,
              " on ", data.device());
}

}  // namespace

std::tuple<Tensor, Tensor> gather_prompts_cuda(const Tensor& table, const Tensor& keep) {
  constexpr const char* op = "fastprompt_ext::gather_prompts";
  TORCH_CHECK(table.dim() == 3, op, ": table must be 3-D, got shape ", table.sizes());
  check_keep(table, keep, op, "table");
  TORCH_CHECK(keep.size(0) == table.size(0) && keep.size(1) == table.size(1), op,
              ": keep must be (L, P) = (", table.size(0), ", ", table.size(1), "), got ",
              keep.sizes());
  const c10::cuda::CUDAGuard guard(table.device());
  const int64_t L = table.size(0), P = table.size(1), D = table.size(2);
  // The kept-row list (the packed size is data-dependent, so one synchronisation is inherent).
  const at::Tensor rows = at::nonzero(keep.reshape({L * P})).reshape({-1}).contiguous();
  const at::Tensor counts = keep.sum(1).to(at::kLong).cpu();
  const at::Tensor src = table.reshape({L * P, D}).contiguous();
  at::Tensor packed = at::empty({rows.size(0), D}, table.options());
  check_launch(
      cuda::launch_copy_rows(src.const_data_ptr(), packed.data_ptr(),
                             rows.const_data_ptr<int64_t>(), rows.size(0), D * table.element_size(),
                             false, c10::cuda::getCurrentCUDAStream()),
      op);
  return {packed, counts};
}

Tensor gather_prompts_backward_cuda(const Tensor& grad_packed, const Tensor& keep) {
  constexpr const char* op = "fastprompt_ext::gather_prompts_backward";
  TORCH_CHECK(grad_packed.dim() == 2, op, ": grad_packed must be 2-D, got shape ",
              grad_packed.sizes());
  check_keep(grad_packed, keep, op, "grad_packed");
  const c10::cuda::CUDAGuard guard(grad_packed.device());
  const int64_t L = keep.size(0), P = keep.size(1), D = grad_packed.size(1);
  const at::Tensor rows = at::nonzero(keep.reshape({L * P})).reshape({-1}).contiguous();
  TORCH_CHECK(grad_packed.size(0) == rows.size(0), op, ": grad_packed has ", grad_packed.size(0),
              " rows but keep selects ", rows.size(0));
  at::Tensor grad = at::zeros({L * P, D}, grad_packed.options());
  const at::Tensor src = grad_packed.contiguous();
  check_launch(
      cuda::launch_copy_rows(src.const_data_ptr(), grad.data_ptr(), rows.const_data_ptr<int64_t>(),
                             rows.size(0), D * grad_packed.element_size(), true,
                             c10::cuda::getCurrentCUDAStream()),
      op);
  return grad.view({L, P, D});
}

}  // namespace fastprompt
