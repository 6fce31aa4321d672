// Prompt attention as a cascade (Hydragen's decomposition, FlashInfer's cascade attention) on
// PyTorch's fused attention kernels, orchestrated in C++: the backend's CUDA path.
//
// The keys of a query are its set's prompt keys and its own image keys. Each part is ordinary
// attention on PyTorch's fused kernels (parts.h), returning (o_j, lse_j); one kernel merges them
// by log-sum-exp into the output, written straight into the (B, N, H, d) layout. In the forward,
// a shared set's (T = 1) prompt part is one call whose query sequence is all B * N queries of the
// batch against the set's P keys: one long problem with tensor-core-friendly shapes that reads the
// prompt K/V once. Indexed sets: each sequence attends to its set's keys, gathered by index.
//
// The backward hands each part's fused backward the *merged* out and lse: a fused backward
// computes P = exp(s - lse) and D = rowsum(dO * O) from them, so each part returns its exact
// share of dq and its own keys' exact dK, dV. The prompt part's backward runs per sequence (the
// set's keys broadcast over the batch when shared): a fused backward parallelises over key blocks
// and loops over queries inside a block, so the long call would give the whole batch's work to
// ceil(P / 128) * H thread blocks. The per-sequence prompt gradients are then summed per set by a
// kernel that visits each set's members in order (fp32, deterministic).
//
// A key_bias (a windowed backbone's relative-position bias and shift mask) belongs to the image
// keys only: it goes to the image part, and the prompt part never sees it.
//
// Prompt Condensation's scores need those per-sequence prompt gradients and the gate
// sum_n dS[n, i], which no fused kernel returns. The scored backward pads the head dim by 8: q
// gets a feature equal to 1 that the prompt keys have 0 in, which changes no score, and the
// padded column of dK is then scale * sum_n dS[n, i], the gate of head h. One epilogue kernel
// forms the terms and the gate from there.
//
// Code here is device-generic: on CPU tensors the same orchestration runs on PyTorch's CPU flash
// kernel and the CPU twins of the small kernels (the `cascade_attention_*` schemas), which is how
// the tests cover this path on machines without a GPU.
#include <ATen/ops/arange.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <limits>

#include "../checks.h"
#include "../ops.h"
#include "kernels.h"
#include "parts.h"

namespace fastprompt {
namespace {

using cascade::Kernels;
using cascade::part_backward;
using cascade::part_forward;

// (B, H, N, d) -> (1, H, B * N, d): every query of the batch in one sequence (a view when the
// layout allows, as for timm's fused qkv, else one copy).
Tensor as_long(const Tensor& t) {
  return t.transpose(0, 1).reshape({1, t.size(1), t.size(0) * t.size(2), t.size(3)});
}

Tensor from_long(const Tensor& t, int64_t B) {
  return t.squeeze(0).reshape({t.size(1), B, t.size(2) / B, t.size(3)}).transpose(0, 1);
}

Tensor lse_from_long(const Tensor& lse, int64_t B) {
  return lse.squeeze(0).reshape({lse.size(1), B, lse.size(2) / B}).transpose(0, 1);
}

// t in the (B, N, H, d) storage of heads_last_empty (a copy only if it is not already).
Tensor heads_last(const Tensor& t) {
  if (t.transpose(1, 2).is_contiguous()) return t;
  Tensor r = heads_last_empty(t.size(0), t.size(1), t.size(2), t.size(3), t.options());
  r.copy_(t);
  return r;
}

Tensor heads_last_like(const Tensor& like) {
  return heads_last_empty(like.size(0), like.size(1), like.size(2), like.size(3), like.options());
}

Tensor heads_last_zeros(const Tensor& like) { return heads_last_like(like).zero_(); }

// (K,) lengths -> (K, P) bool: which slots of each set (or sequence) hold a valid key.
Tensor valid_slots(const Tensor& lengths, int64_t P) {
  return at::arange(P, lengths.options()).unsqueeze(0).lt(lengths.unsqueeze(1));
}

// (K, 1, 1, P) additive bias: -inf on invalid slots. Rows padded to 16 elements: the
// memory-efficient kernel needs an aligned batch stride.
Tensor slot_bias(const Tensor& valid, at::ScalarType dtype) {
  const int64_t K = valid.size(0), P = valid.size(1);
  Tensor bias = at::zeros({K, (P + 15) / 16 * 16}, valid.options().dtype(dtype)).narrow(1, 0, P);
  bias.masked_fill_(valid.logical_not(), -INFINITY);
  return bias.unsqueeze(1).unsqueeze(1);
}

// The prompt part's keys and values: the set table, or one set per sequence, with slots past a
// set's length zeroed (so that whatever they hold never meets a 0 * NaN) and masked by a bias.
struct PromptKeys {
  Tensor k, v, bias;
  Tensor counts;  // (B,) int64 valid keys per sequence, or undefined (all P)
};

PromptKeys prompt_keys(const Tensor& pk, const Tensor& pv, const OptTensor& index,
                       const OptTensor& lengths, int64_t B, bool per_sequence) {
  const int64_t P = pk.size(2);
  PromptKeys r{pk, pv, Tensor(), Tensor()};
  Tensor valid;
  if (lengths.has_value()) {
    valid = valid_slots(lengths->to(at::kLong), P);  // (T, P)
    const Tensor keep = valid.unsqueeze(1).unsqueeze(3);
    const Tensor zero = at::zeros({}, pk.options());
    r.k = at::where(keep, pk, zero);
    r.v = at::where(keep, pv, zero);
  }
  // A shared set (one set, or no index: set 0 for every sequence) is broadcast over the batch
  // (stride 0), never copied; indexed sets are gathered.
  const bool shared = pk.size(0) == 1 || !index.has_value();
  const Tensor idx = index.has_value() ? index->to(at::kLong) : Tensor();
  auto per_seq = [&](const Tensor& t) {
    return shared ? t.narrow(0, 0, 1).expand({B, -1, -1, -1}) : t.index_select(0, idx);
  };
  if (per_sequence) {
    r.k = per_seq(r.k);
    r.v = per_seq(r.v);
  } else {
    r.k = r.k.narrow(0, 0, 1);
    r.v = r.v.narrow(0, 0, 1);
  }
  if (lengths.has_value()) {
    const Tensor lens = lengths->to(at::kLong);
    Tensor valid_seq = valid.narrow(0, 0, 1);
    if (per_sequence) valid_seq = shared ? valid_seq.expand({B, -1}) : valid.index_select(0, idx);
    r.bias = slot_bias(valid_seq, pk.scalar_type());
    r.counts = shared ? lens.narrow(0, 0, 1).expand({B}) : lens.index_select(0, idx);
  }
  return r;
}

// The sequences of each set in increasing order (a stable sort of the index) and where each
// set's run starts: what the per-set reduction reads. No host synchronisation.
std::pair<Tensor, Tensor> set_members(const OptTensor& index, int64_t B, int64_t T,
                                      const at::TensorOptions& opts) {
  const auto i64 = opts.dtype(at::kLong);
  if (!index.has_value()) {
    return {at::arange(B, i64), at::full({T + 1}, B, i64).index_fill_(0, at::zeros({1}, i64), 0)};
  }
  auto [sorted, order] = at::sort(index->to(at::kLong), /*stable=*/true, 0, false);
  return {order, at::searchsorted(sorted, at::arange(T + 1, i64))};
}

// kb cast to dtype through fp32, as the reference adds it, with its finite values clamped to a
// 16-bit dtype's range: a plain cast makes a large finite mask (finfo(float32).min) -inf in
// fp16/bf16, and a row it masks entirely would then have no key where the fp32 computation keeps
// it. Infinities stay (the Python bias_in's rule).
Tensor bias_in(const Tensor& kb, at::ScalarType dtype) {
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || kb.scalar_type() == dtype) {
    return kb.to(dtype);
  }
  const double top = dtype == at::kHalf
                         ? static_cast<double>(std::numeric_limits<at::Half>::max())
                         : static_cast<double>(std::numeric_limits<at::BFloat16>::max());
  const Tensor wide = kb.to(at::kFloat);
  return at::where(wide.isinf(), wide, wide.clamp(-top, top)).to(dtype);
}

// The image part's bias from a checked key_bias, 4-D, broadcast where it broadcasts and a period
// repeated to B rows. On the CPU in fp32 (the CPU flash kernel takes it, and it stays exact for
// 16-bit inputs); on CUDA in q's dtype (the memory-efficient kernel's rule) with every stride of a
// dimension of size > 1 but the last a multiple of 16 elements, as scaled_dot_product_attention
// prepares a mask for it (a period is repeated straight into that padded buffer).
Tensor image_bias(const OptTensor& key_bias, const Tensor& q, int64_t nk) {
  if (!key_bias.has_value()) return Tensor();
  const int64_t B = q.size(0);
  Tensor bias = key_bias_4d(bias_in(*key_bias, q.is_cpu() ? at::kFloat : q.scalar_type()));
  if (q.is_cpu()) return key_bias_rows(bias, B);
  // A bias broadcast over the keys is read with unit stride along them, so it is widened first.
  if (bias.size(3) != nk) bias = bias.expand({-1, -1, -1, nk});
  const int64_t g = bias.size(0);
  const bool period = g != 1 && g != B;
  constexpr int64_t kAlign = 16;
  bool aligned = !period && bias.stride(3) == 1;
  for (int64_t i = 0; aligned && i < 3; ++i) {
    aligned = bias.size(i) == 1 || bias.stride(i) % kAlign == 0;
  }
  if (aligned) return bias;
  const int64_t n = bias.size(3), rows = period ? B : g;
  Tensor padded = at::zeros(
      {rows, bias.size(1), bias.size(2), (n + kAlign - 1) / kAlign * kAlign}, bias.options());
  Tensor body = padded.narrow(3, 0, n);
  if (g > 0) {  // the G rows once, or rows / G times for a period
    body.view({rows / g, g, bias.size(1), bias.size(2), n}).copy_(bias.unsqueeze(0));
  }
  return body;
}

// The fused kernels read rows with unit stride along d; other layouts are copied once.
Tensor unit_last(const Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

struct Prepared {
  AttnShape s;
  const Kernels* kernels;
};

Prepared prepare(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& pk,
                 const Tensor& pv, const OptTensor& index, const OptTensor& lengths,
                 const char* op) {
  const AttnShape s = check_attention(q, k, v, pk, pv, index, lengths, op);
  const Kernels& kernels = cascade::kernels_for(q);
  if (q.is_cuda()) {
    const std::string why = cascade::cuda_part_unsupported(q.scalar_type(), s.d);
    TORCH_CHECK(why.empty(), op, ": ", why);
  }
  kernels.check_sets(index, lengths, s.T, s.P, op);
  return {s, &kernels};
}

}  // namespace

std::tuple<Tensor, Tensor> cascade_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                       const Tensor& pk_, const Tensor& pv_,
                                       const OptTensor& index, const OptTensor& lengths,
                                       double scale, const OptTensor& key_bias) {
  constexpr const char* op = "fastprompt_ext::prompt_attention_fwd (cascade)";
  const c10::DeviceGuard guard(q_.device());
  const auto [s, kernels] = prepare(q_, k_, v_, pk_, pv_, index, lengths, op);
  check_key_bias(key_bias, s, q_, op);
  const Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
  const Tensor pk = unit_last(pk_), pv = unit_last(pv_);
  Tensor out = heads_last_empty(s.B, s.H, s.Nq, s.d, q.options());
  Tensor lse = at::empty({s.B, s.H, s.Nq}, q.options().dtype(at::kFloat));
  if (s.B * s.H * s.Nq == 0) return {out, lse};
  Tensor o_i, lse_i, o_p, lse_p, counts;
  if (s.Nk > 0) {
    std::tie(o_i, lse_i) = part_forward(q, k, v, image_bias(key_bias, q, s.Nk), scale);
    if (key_bias.has_value()) {
      // A row whose image keys the bias masks entirely (-inf) has no image key; kernels differ on
      // what they return for it (the CPU flash kernel: lse 0), which would poison the merge.
      // Found in the dtype the reference adds the bias in, on the bias's own rows, then repeated.
      const at::ScalarType acc = c10::promoteTypes(q.scalar_type(), at::kFloat);
      const Tensor wide = key_bias_4d(key_bias->to(acc));
      const Tensor masked = key_bias_rows(wide.isneginf().all(-1, /*keepdim=*/true), s.B)
                                .squeeze(-1)
                                .expand({s.B, s.H, s.Nq});
      lse_i = lse_i.masked_fill(masked, -INFINITY);
      o_i = o_i.masked_fill(masked.unsqueeze(-1), 0.0);
    }
  }
  if (s.P > 0) {
    const bool shared = s.T == 1 || !index.has_value();
    const PromptKeys pr = prompt_keys(pk, pv, index, lengths, s.B, !shared);
    if (shared) {
      auto [o, l] = part_forward(as_long(q), pr.k, pr.v, pr.bias, scale);
      o_p = from_long(o, s.B);
      lse_p = lse_from_long(l, s.B);
    } else {
      std::tie(o_p, lse_p) = part_forward(q, pr.k, pr.v, pr.bias, scale);
    }
    counts = pr.counts;
  }
  kernels->merge(o_p, lse_p, o_i, lse_i, counts, out, lse);
  return {out, lse};
}

namespace {

// The scored prompt part: per-sequence prompt gradients and the gate through the padded head dim
// (see the file comment). Returns dq's prompt share; fills the rest.
Tensor scored_prompt_part(const Tensor& dout, const Tensor& q, const Tensor& out,
                          const Tensor& lse, const PromptKeys& pr, double scale,
                          const OptTensor& index, const Tensor& u_k, const Tensor& u_v,
                          const AttnShape& s, const Kernels& kernels, Tensor& dpk, Tensor& dpv,
                          Tensor& terms, Tensor& gate) {
  // scale = 0: every score is 0 whatever q is; run with q = 0 and scale 1 instead, which keeps
  // the scores and gives the gate column sum_n dS directly (and dq is then 0).
  const bool zero_scale = scale == 0.0;
  const std::vector<int64_t> pad{0, 8};
  Tensor q_pad = at::constant_pad_nd(zero_scale ? at::zeros_like(q) : q, pad, 0);
  q_pad.select(3, s.d).fill_(1.0);
  auto [dq_pad, dk_pad, dv_pad] = part_backward(
      at::constant_pad_nd(dout, pad, 0), q_pad, at::constant_pad_nd(pr.k, pad, 0),
      at::constant_pad_nd(pr.v, pad, 0), pr.bias, at::constant_pad_nd(out, pad, 0), lse,
      zero_scale ? 1.0 : scale);
  const Tensor dk_seq = dk_pad.narrow(3, 0, s.d), dv_seq = dv_pad.narrow(3, 0, s.d);
  auto [order, offsets] = set_members(index, s.B, s.T, q.options());
  dpk = kernels.reduce_sets(dk_seq, order, offsets, s.T);
  dpv = kernels.reduce_sets(dv_seq, order, offsets, s.T);
  const Tensor idx = index.has_value() ? index->to(at::kLong) : Tensor();
  kernels.score_terms(dk_seq, dv_seq, dk_pad.select(3, s.d), zero_scale ? 1.0 : 1.0 / scale,
                      u_k, u_v, idx, terms, gate);
  return zero_scale ? Tensor() : dq_pad.narrow(3, 0, s.d);
}

}  // namespace

BwdResult cascade_bwd(const Tensor& dout_, const Tensor& q_, const Tensor& k_, const Tensor& v_,
                      const Tensor& pk_, const Tensor& pv_, const OptTensor& index,
                      const OptTensor& lengths, const Tensor& out_, const Tensor& lse,
                      double scale, const OptTensor& u_k, const OptTensor& u_v,
                      const OptTensor& key_bias, bool image_grads) {
  constexpr const char* op = "fastprompt_ext::prompt_attention_bwd (cascade)";
  const c10::DeviceGuard guard(q_.device());
  const auto [s, kernels] = prepare(q_, k_, v_, pk_, pv_, index, lengths, op);
  check_key_bias(key_bias, s, q_, op);
  const int64_t S = check_backward_args(dout_, q_, out_, lse, u_k, u_v, s, op);
  const bool scored = u_k.has_value();
  TORCH_CHECK(!(scored && q_.is_cuda() && s.d > 248), op,
              ": the scored backward pads the head dim by 8 and PyTorch's fused kernels take at "
              "most 256: head dims up to 248, got ",
              s.d);
  const Tensor q = unit_last(q_), k = unit_last(k_), v = unit_last(v_);
  const Tensor pk = unit_last(pk_), pv = unit_last(pv_);
  const Tensor dout = unit_last(dout_), out = unit_last(out_);
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor dq, dk, dv;
  Tensor dpk = at::zeros({s.T, s.H, s.P, s.d}, f32), dpv = at::zeros({s.T, s.H, s.P, s.d}, f32);
  Tensor terms = at::zeros({S, s.B, s.P}, f32), gate = at::zeros({s.B, s.P}, f32);
  if (s.B * s.H * s.Nq == 0) {
    return {heads_last_zeros(q), heads_last_zeros(k), heads_last_zeros(v), dpk, dpv, terms, gate};
  }
  // A row with no key (lse = -inf) must give every key probability 0: +inf does (exp(s - inf)).
  const Tensor lse_b = at::where(lse.eq(-INFINITY), INFINITY, lse).contiguous();
  // Without image gradients only the prompt part runs: its gradients need the merged out and lse,
  // not the image part's backward.
  if (s.Nk > 0 && image_grads) {
    std::tie(dq, dk, dv) =
        part_backward(dout, q, k, v, image_bias(key_bias, q, s.Nk), out, lse_b, scale);
  } else if (image_grads) {  // no image keys
    dk = heads_last_zeros(k);
    dv = heads_last_zeros(v);
  } else {  // not asked for: the op drops them, so they are left unwritten (no memset)
    dk = heads_last_like(k);
    dv = heads_last_like(v);
  }
  Tensor dq_p;
  if (s.P > 0) {
    const PromptKeys pr = prompt_keys(pk, pv, index, lengths, s.B, /*per_sequence=*/true);
    if (scored) {
      const Tensor uk = u_k->to(at::kFloat).contiguous(), uv = u_v->to(at::kFloat).contiguous();
      dq_p = scored_prompt_part(dout, q, out, lse_b, pr, scale, index, uk, uv, s, *kernels, dpk,
                                dpv, terms, gate);
    } else {
      auto [dq_seq, dk_seq, dv_seq] =
          part_backward(dout, q, pr.k, pr.v, pr.bias, out, lse_b, scale);
      dq_p = dq_seq;
      auto [order, offsets] = set_members(index, s.B, s.T, q.options());
      dpk = kernels->reduce_sets(dk_seq, order, offsets, s.T);
      dpv = kernels->reduce_sets(dv_seq, order, offsets, s.T);
    }
  }
  if (!dq.defined()) {
    dq = dq_p.defined() ? dq_p : image_grads ? heads_last_zeros(q) : heads_last_like(q);
  } else if (dq_p.defined()) {
    dq = heads_last(dq).add_(dq_p);
  }
  return {heads_last(dq), heads_last(dk), heads_last(dv), dpk, dpv, terms, gate};
}

}  // namespace fastprompt
