// CPU twins of the cascade's small kernels (csrc/cascade/kernels.h): the set checks, the
// log-sum-exp merge, the per-set reduction and the score epilogue. They run the per-element
// arithmetic of fastprompt/arith.h that the CUDA kernels compile, in the same order per element,
// so the tests cover it. The reduction and the epilogue also serve the CPU kernels' backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <type_traits>

#include "../cascade/kernels.h"
#include "../checks.h"
#include "common.h"
#include "fastprompt/arith.h"
#include "vec_utils.h"

namespace fastprompt::cpu {
namespace {

// Element access through strides (the partial results come in the layouts the kernels chose).
template <typename T, int N>
struct Strided {
  const T* p = nullptr;
  int64_t st[N] = {};
  explicit Strided(const at::Tensor& t) {
    if (!t.defined()) return;
    p = t.const_data_ptr<T>();
    for (int i = 0; i < N; ++i) st[i] = t.stride(i);
  }
  const T* at(int64_t a, int64_t b, int64_t c) const { return p + a * st[0] + b * st[1] + c * st[2]; }
};

void check_sets(const std::optional<at::Tensor>& index, const std::optional<at::Tensor>& lengths,
                int64_t T, int64_t P,
                const char* op) {
  read_sets(index, lengths, AttnShape{0, 0, 0, 0, 0, T, P}, op);
}

template <typename T>
void merge_impl(const at::Tensor& o_p, const at::Tensor& lse_p, const at::Tensor& o_i,
                const at::Tensor& lse_i, const at::Tensor& counts, const at::Tensor& out,
                const at::Tensor& lse) {
  const int64_t B = out.size(0), H = out.size(1), N = out.size(2), d = out.size(3);
  const Strided<T, 4> op(o_p), oi(o_i);
  const Strided<float, 3> lp(lse_p), li(lse_i);
  const at::Tensor cnt = counts.defined() ? counts.contiguous() : counts;
  const int64_t* c = cnt.defined() ? cnt.const_data_ptr<int64_t>() : nullptr;
  T* outp = out.data_ptr<T>();
  float* lsep = lse.data_ptr<float>();
  const int64_t so[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  at::parallel_for(0, B * H * N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (H * N), h = (r / N) % H, n = r % N;
      const bool use_p = op.p != nullptr && (c == nullptr || c[b] > 0);
      const Merge w = merge_rows(use_p ? *lp.at(b, h, n) : neg_inf(),
                                 oi.p != nullptr ? *li.at(b, h, n) : neg_inf());
      const T* rp = use_p ? op.at(b, h, n) : nullptr;
      const T* ri = oi.p != nullptr ? oi.at(b, h, n) : nullptr;
      T* dst = outp + b * so[0] + h * so[1] + n * so[2];
      for (int64_t j = 0; j < d; ++j) {
        const float vp = rp != nullptr ? static_cast<float>(rp[j * op.st[3]]) : 0.0f;
        const float vi = ri != nullptr ? static_cast<float>(ri[j * oi.st[3]]) : 0.0f;
        dst[j * so[3]] = static_cast<T>(merge_value(w, vp, vi));
      }
      lsep[(b * H + h) * N + n] = w.lse;
    }
  });
}

void merge(const at::Tensor& o_p, const at::Tensor& lse_p, const at::Tensor& o_i,
           const at::Tensor& lse_i, const at::Tensor& counts, const at::Tensor& out,
           const at::Tensor& lse) {
  TORCH_CHECK(lse.is_contiguous(), "fastprompt_ext: merge writes a contiguous lse");
  FP_DISPATCH_FLOATS(out.scalar_type(), "cascade_merge", [&] {
    merge_impl<scalar_t>(o_p, lse_p, o_i, lse_i, counts, out, lse);
  });
}

}  // namespace

template <typename T>
static void reduce_impl(const at::Tensor& per_seq, const int64_t* order, const int64_t* offsets,
                        int64_t T_sets, at::Tensor& out) {
  const int64_t H = per_seq.size(1), P = per_seq.size(2), d = per_seq.size(3);
  const Strided<T, 4> src(per_seq);
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, T_sets * H * P, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row / (H * P), h = (row / P) % H, i = row % P;
      float* o = dst + row * d;
      std::fill(o, o + d, 0.0f);
      // Members in increasing sequence order: a fixed summation order.
      for (int64_t m = offsets[t]; m < offsets[t + 1]; ++m) {
        const T* x = src.at(order[m], h, i);
        if constexpr (std::is_same_v<T, float>) {
          if (src.st[3] == 1) {  // the CPU kernels' own fp32 per-sequence buffers
            add_row(o, x, d);
            continue;
          }
        }
        for (int64_t j = 0; j < d; ++j) o[j] += static_cast<float>(x[j * src.st[3]]);
      }
    }
  });
}

at::Tensor reduce_sets(const at::Tensor& per_seq, const at::Tensor& order,
                       const at::Tensor& offsets, int64_t T_sets) {
  const at::Tensor ord = order.to(at::kLong).contiguous(), off = offsets.to(at::kLong).contiguous();
  at::Tensor out = at::empty({T_sets, per_seq.size(1), per_seq.size(2), per_seq.size(3)},
                             per_seq.options().dtype(at::kFloat));
  FP_DISPATCH_FLOATS(per_seq.scalar_type(), "cascade_reduce_sets", [&] {
    reduce_impl<scalar_t>(per_seq, ord.const_data_ptr<int64_t>(), off.const_data_ptr<int64_t>(),
                          T_sets, out);
  });
  return out;
}

template <typename T>
static void score_terms_impl(const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& gsrc,
                             float gate_mult, const at::Tensor& u_k, const at::Tensor& u_v,
                             const int64_t* index, const at::Tensor& terms,
                             const at::Tensor& gate) {
  const int64_t B = dk.size(0), H = dk.size(1), P = dk.size(2), d = dk.size(3);
  const int64_t S = u_k.size(0), T_sets = u_k.size(1);
  const Strided<T, 4> gk(dk), gv(dv);
  const Strided<T, 3> gs(gsrc);
  const float* uk = u_k.const_data_ptr<float>();  // contiguous (S, T, H, P, d)
  const float* uv = u_v.const_data_ptr<float>();
  float* terms_p = terms.data_ptr<float>();  // contiguous (S, B, P)
  float* gate_p = gate.data_ptr<float>();    // contiguous (B, P)
  at::parallel_for(0, B * P, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t b = bi / P, i = bi % P, t = index == nullptr ? 0 : index[b];
      float g = 0.0f;
      for (int64_t h = 0; h < H; ++h) g += static_cast<float>(*gs.at(b, h, i));
      gate_p[bi] = g * gate_mult;
      for (int64_t s = 0; s < S; ++s) {
        float acc = 0.0f;
        for (int64_t h = 0; h < H; ++h) {
          const T* k = gk.at(b, h, i);
          const T* v = gv.at(b, h, i);
          const int64_t u0 = (((s * T_sets + t) * H + h) * P + i) * d;
          for (int64_t j = 0; j < d; ++j) {
            acc = score_term_fma(acc, static_cast<float>(k[j * gk.st[3]]), uk[u0 + j],
                                 static_cast<float>(v[j * gv.st[3]]), uv[u0 + j]);
          }
        }
        terms_p[(s * B + b) * P + i] = acc;
      }
    }
  });
}

void score_terms(const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& gate_src,
                 double gate_mult, const at::Tensor& u_k, const at::Tensor& u_v,
                 const at::Tensor& index, const at::Tensor& terms, const at::Tensor& gate) {
  TORCH_CHECK(terms.is_contiguous() && gate.is_contiguous() && u_k.is_contiguous() &&
                  u_v.is_contiguous() && u_k.scalar_type() == at::kFloat,
              "fastprompt_ext: score_terms takes contiguous fp32 u_k/u_v, terms and gate");
  const at::Tensor idx = index.defined() ? index.to(at::kLong).contiguous() : index;
  FP_DISPATCH_FLOATS(dk.scalar_type(), "cascade_score_terms", [&] {
    score_terms_impl<scalar_t>(dk, dv, gate_src, static_cast<float>(gate_mult), u_k, u_v,
                               idx.defined() ? idx.const_data_ptr<int64_t>() : nullptr, terms,
                               gate);
  });
}

}  // namespace fastprompt::cpu

namespace fastprompt::cascade {
const Kernels kCpuKernels{&cpu::check_sets, &cpu::merge, &cpu::reduce_sets, &cpu::score_terms};
}  // namespace fastprompt::cascade
