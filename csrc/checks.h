// Argument checks shared by the CPU and CUDA entry points: every failure names the argument, what
// it got and what it needs.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

// float32, bfloat16 and float16, the dtypes every kernel takes (scalar_t inside the lambda).
#define FP_DISPATCH_FLOATS(TYPE, NAME, ...)                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE( \
                         at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace fastprompt {

struct AttnShape {
  int64_t B, H, Nq, Nk, d, T, P;
};

inline void check_float(const at::Tensor& t, const char* name, const char* op) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", st);
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* op) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type() && t.device() == ref.device(), op, ": ", name,
              " is ", t.scalar_type(), " on ", t.device(), "; q is ", ref.scalar_type(), " on ",
              ref.device(), "; they must match");
}

inline void check_index(const std::optional<at::Tensor>& t, const char* name, int64_t size,
                        const at::Tensor& q, const char* op) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == size, op, ": ", name, " must have shape (", size,
              ",), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", t->scalar_type());
  TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", t->device(), ", q on ",
              q.device());
}

// q, k, v: (B, H, N, d) (k/v may have their own N); prompt_k/v: (T, H, P, d).
inline AttnShape check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& pk, const at::Tensor& pv,
                                 const std::optional<at::Tensor>& index,
                                 const std::optional<at::Tensor>& lengths, const char* op) {
  const std::pair<const at::Tensor*, const char*> all[] = {
      {&q, "q"}, {&k, "k"}, {&v, "v"}, {&pk, "prompt_k"}, {&pv, "prompt_v"}};
  for (const auto& [t, name] : all) {
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be 4-D, got shape ", t->sizes());
    check_float(*t, name, op);
    check_same(*t, q, name, op);
  }
  AttnShape s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), pk.size(0), pk.size(2)};
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == s.B && k.size(1) == s.H && k.size(3) == s.d,
              op, ": k ", k.sizes(), " and v ", v.sizes(), " must be (B=", s.B, ", H=", s.H,
              ", N, d=", s.d, ")");
  TORCH_CHECK(pk.sizes() == pv.sizes(), op, ": prompt_k ", pk.sizes(), " and prompt_v ", pv.sizes(),
              " differ");
  TORCH_CHECK(s.T >= 1 && pk.size(1) == s.H && pk.size(3) == s.d, op,
              ": prompt_k must be (T>=1, H=", s.H, ", P, d=", s.d, "), got ", pk.sizes());
  check_index(index, "prompt_index", s.B, q, op);
  check_index(lengths, "prompt_lengths", s.T, q, op);
  return s;
}

// key_bias: an additive bias on the scores of the image keys (a windowed backbone's
// relative-position bias and shift mask), broadcastable to (B, H, Nq, Nk), never differentiated;
// its first dimension may also be a divisor G of B (sequence b reads row b mod G).
inline void check_key_bias(const std::optional<at::Tensor>& key_bias, const AttnShape& s,
                           const at::Tensor& q, const char* op) {
  if (!key_bias.has_value()) return;
  const at::Tensor& kb = *key_bias;
  TORCH_CHECK(kb.is_floating_point() && kb.device() == q.device(), op,
              ": key_bias must be a floating-point tensor on ", q.device(), ", got ",
              kb.scalar_type(), " on ", kb.device());
  const int64_t full[4] = {s.B, s.H, s.Nq, s.Nk};
  bool ok = kb.dim() <= 4;
  for (int64_t i = 0; ok && i < kb.dim(); ++i) {
    const int64_t want = full[4 - kb.dim() + i];
    const bool period = kb.dim() == 4 && i == 0 && kb.size(0) > 0 && s.B % kb.size(0) == 0;
    ok = kb.size(i) == 1 || kb.size(i) == want || period;
  }
  TORCH_CHECK(ok, op, ": key_bias ", kb.sizes(), " must broadcast to (B=", s.B, ", H=", s.H,
              ", Nq=", s.Nq, ", Nk=", s.Nk, "), its first dimension 1, B or a divisor of B");
}

// A checked 4-D key_bias with B rows: a periodic one (G rows, 1 < G < B) repeated B / G times,
// for kernels that take only a bias that broadcasts.
inline at::Tensor key_bias_rows(const at::Tensor& kb4, int64_t B) {
  const int64_t g = kb4.size(0);
  if (g == 1 || g == B) return kb4;
  return kb4.repeat({B / g, 1, 1, 1});
}

// A checked key_bias as a 4-D view (leading dims of size 1 added; nothing copied).
inline at::Tensor key_bias_4d(const at::Tensor& kb) {
  at::Tensor r = kb;
  while (r.dim() < 4) r = r.unsqueeze(0);
  return r;
}

// An uninitialised (B, H, N, d) tensor stored as (B, N, H, d): the layout of every attention
// output and input gradient of this library (merging heads is then free).
inline at::Tensor heads_last_empty(int64_t B, int64_t H, int64_t N, int64_t d,
                                   const at::TensorOptions& opts) {
  return at::empty({B, N, H, d}, opts).transpose(1, 2);
}

inline void check_exact(const at::Tensor& t, at::IntArrayRef sizes, const char* name,
                        const char* op) {
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
}

// The backward's own arguments: dout and out like q, lse (B, H, Nq) fp32, and the optional score
// vectors u_k, u_v (S, T, H, P, d). Returns S (0 without score vectors).
inline int64_t check_backward_args(const at::Tensor& dout, const at::Tensor& q,
                                   const at::Tensor& out, const at::Tensor& lse,
                                   const std::optional<at::Tensor>& u_k,
                                   const std::optional<at::Tensor>& u_v, const AttnShape& s,
                                   const char* op) {
  check_exact(dout, q.sizes(), "dout", op);
  check_exact(out, q.sizes(), "out", op);
  check_same(dout, q, "dout", op);
  check_same(out, q, "out", op);
  check_exact(lse, {s.B, s.H, s.Nq}, "lse", op);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.device() == q.device(), op,
              ": lse must be float32 on ", q.device(), ", got ", lse.scalar_type(), " on ",
              lse.device());
  TORCH_CHECK(u_k.has_value() == u_v.has_value(), op, ": give both u_k and u_v or neither");
  if (!u_k.has_value()) return 0;
  const std::pair<const at::Tensor*, const char*> us[] = {{&*u_k, "u_k"}, {&*u_v, "u_v"}};
  for (const auto& [u, name] : us) {
    TORCH_CHECK(u->dim() == 5, op, ": ", name, " must be (S, T, H, P, d), got ", u->sizes());
    check_exact(*u, {u_k->size(0), s.T, s.H, s.P, s.d}, name, op);
    TORCH_CHECK(u->is_floating_point() && u->device() == q.device(), op, ": ", name,
                " must be a floating-point tensor on ", q.device(), ", got ", u->scalar_type(),
                " on ", u->device());
  }
  return u_k->size(0);
}

}  // namespace fastprompt
