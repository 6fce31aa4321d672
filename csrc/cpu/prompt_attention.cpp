// Prompt attention on the CPU: forward and backward (with the optional score terms).
//
// Each task is one (sequence, head, block of query rows). Its keys are two segments read in
// place: the sequence's prompt set (prompt_k[prompt_index[b], h, :prompt_lengths[set]]; stride
// 0 over the batch for a shared set, never copied per sequence) followed by the sequence's own
// keys, whose scores get the optional key_bias (read through its broadcast strides, in fp32).
// Keys are taken in groups of at most kKeyGroup columns; a group may span the end of the prompt
// segment and the start of the image one, and is computed as one score block by up to two GEMMs
// (one per segment) writing side by side into the same buffer. The softmax runs online across
// groups (fastprompt/arith.h), so the concatenated K/V is never built and long key sets stay in
// cache-sized blocks. GEMMs come from blas.h; low-precision inputs multiply in their own
// type with fp32 accumulation (P and dS are rounded to the input type before their GEMMs, as
// PyTorch's own CPU flash attention does).
//
// Backward tasks are (sequence, head): a task owns the gradients of its image keys and its
// sequence's prompt-key gradients, which go to a per-sequence fp32 buffer and are then summed
// per set in sequence order (deterministic for a given thread count and input; no atomics).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "blas.h"
#include "common.h"
#include "fastprompt/arith.h"
#include "vec_utils.h"

namespace fastprompt::cpu {
namespace {

constexpr int64_t kRowBlock = 256;  // query rows per task (balanced: ceil(N / ceil(N / 256)))
constexpr int64_t kKeyGroup = 512;  // key columns per score block

// The part of a key group that falls in one segment: keys [start, start + len) of the segment,
// written to columns [col, col + len) of the group's score block.
struct Piece {
  int segment;  // 0 = prompt set, 1 = image keys
  int64_t start, len, col;
};

int pieces_of(int64_t c0, int64_t cols, int64_t np, Piece out[2]) {
  int n = 0;
  if (c0 < np) out[n++] = {0, c0, std::min(c0 + cols, np) - c0, 0};
  const int64_t img0 = std::max(c0, np);
  if (c0 + cols > img0) out[n++] = {1, img0 - np, c0 + cols - img0, img0 - c0};
  return n;
}

// key_bias broadcast to (B, H, Nq, Nk) in fp32, read through its strides (0 where it
// broadcasts); p is null without one.
struct BiasView {
  const float* p = nullptr;
  int64_t sb = 0, sh = 0, sn = 0, sk = 0;
};

BiasView bias_view(const at::Tensor& expanded) {
  if (!expanded.defined()) return {};
  return {expanded.const_data_ptr<float>(), expanded.stride(0), expanded.stride(1),
          expanded.stride(2), expanded.stride(3)};
}

// The image piece's scores (rows x pc.len, rows ld apart, from column pc.col) += key_bias of
// sequence b, head h, query rows r0..., keys pc.start...
void add_key_bias(float* scores, int64_t ld, int64_t rows, const BiasView& kb, int64_t b,
                  int64_t h, int64_t r0, const Piece& pc) {
  if (kb.p == nullptr || pc.segment != 1) return;
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = kb.p + b * kb.sb + h * kb.sh + (r0 + r) * kb.sn + pc.start * kb.sk;
    float* dst = scores + r * ld + pc.col;
    if (kb.sk == 1) {
      add_row(dst, src, pc.len);
    } else {
      for (int64_t j = 0; j < pc.len; ++j) dst[j] += src[j * kb.sk];
    }
  }
}

int64_t row_blocks(int64_t n) { return std::max<int64_t>(1, (n + kRowBlock - 1) / kRowBlock); }

template <typename T>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pk,
             const at::Tensor& pv, const Sets& sets, const BiasView& kb, const AttnShape& s,
             float scale, at::Tensor& out, at::Tensor& lse) {
  constexpr bool kLowp = !std::is_same_v<T, float>;
  const int64_t nqb = row_blocks(s.Nq);
  const int64_t bm = (s.Nq + nqb - 1) / nqb;
  const int64_t d = s.d;
  T* out_p = out.data_ptr<T>();  // (B, Nq, H, d) storage
  float* lse_p = lse.data_ptr<float>();

  at::parallel_for(0, s.B * s.H * nqb, 1, [&](int64_t begin, int64_t end) {
    BlasThreadGuard blas_threads;
    Scratch<float> sbuf(bm * kKeyGroup), acc(bm * d);
    Scratch<T> plow(kLowp ? bm * kKeyGroup : 0);
    std::vector<RowState> st(bm);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (s.H * nqb), h = (task / nqb) % s.H, qb = task % nqb;
      const int64_t r0 = qb * bm, rows = std::min(bm, s.Nq - r0);
      if (rows <= 0) continue;
      const int64_t t = sets.set_of(b), np = sets.length_of(t, s.P);
      const Mat<T> Q = mat<T>(q, b, h), K = mat<T>(k, b, h), V = mat<T>(v, b, h);
      const Mat<T> PK = mat<T>(pk, t, h), PV = mat<T>(pv, t, h);
      const T* qrow = Q.row(r0);
      const int64_t total = np + s.Nk;
      std::fill(st.begin(), st.begin() + rows, row_init());
      if (total == 0) std::fill(acc.begin(), acc.begin() + rows * d, 0.0f);
      for (int64_t c0 = 0; c0 < total; c0 += kKeyGroup) {
        const int64_t cols = std::min(kKeyGroup, total - c0);
        Piece pcs[2];
        const int npc = pieces_of(c0, cols, np, pcs);
        for (int i = 0; i < npc; ++i) {
          const Mat<T>& KS = pcs[i].segment == 0 ? PK : K;
          gemm(false, true, rows, pcs[i].len, d, scale, qrow, Q.ld, KS.row(pcs[i].start), KS.ld,
               0.0f, sbuf.data() + pcs[i].col, cols);
          add_key_bias(sbuf.data(), cols, rows, kb, b, h, r0, pcs[i]);
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* srow = sbuf.data() + r * cols;
          const float alpha = row_rescale(st[r], row_max(srow, cols));
          if (saturated(st[r].m)) {
            std::fill(srow, srow + cols, 0.0f);
          } else {
            row_add(st[r], exp_sub_sum(srow, cols, safe_max(st[r].m)));
          }
          if (c0 > 0) scale_row(acc.data() + r * d, alpha, d);
          if constexpr (kLowp) cast_row(srow, plow.data() + r * cols, cols);
        }
        for (int i = 0; i < npc; ++i) {
          const Mat<T>& VS = pcs[i].segment == 0 ? PV : V;
          const float beta = (c0 == 0 && i == 0) ? 0.0f : 1.0f;
          if constexpr (kLowp) {
            gemm(false, false, rows, d, pcs[i].len, 1.0f, plow.data() + pcs[i].col, cols,
                 VS.row(pcs[i].start), VS.ld, beta, acc.data(), d);
          } else {
            gemm(false, false, rows, d, pcs[i].len, 1.0f, sbuf.data() + pcs[i].col, cols,
                 VS.row(pcs[i].start), VS.ld, beta, acc.data(), d);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* orow = out_p + ((b * s.Nq + r0 + r) * s.H + h) * d;
        store_row(acc.data() + r * d, row_out_scale(st[r]), orow, d);
        lse_p[(b * s.H + h) * s.Nq + r0 + r] = row_lse(st[r]);
      }
    }
  });
}

// Per-sequence results of the backward that are reduced afterwards.
struct BwdBuffers {
  float* dpk_seq;  // (B, H, P, d) fp32, zeroed
  float* dpv_seq;
  float* gate_part;  // (B, H, P) fp32, zeroed; sum over queries of dS per head
};

template <typename T>
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& out,
              const at::Tensor& lse, const Sets& sets, const BiasView& kb, const AttnShape& s,
              float scale, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              const BwdBuffers& buf) {
  constexpr bool kLowp = !std::is_same_v<T, float>;
  const int64_t nqb = row_blocks(s.Nq);
  const int64_t bm = (s.Nq + nqb - 1) / nqb;
  const int64_t d = s.d;
  const float* lse_p = lse.const_data_ptr<float>();  // contiguous (B, H, Nq)

  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    BlasThreadGuard blas_threads;
    Scratch<float> pbuf(bm * kKeyGroup), dsbuf(bm * kKeyGroup), dq_acc(bm * d), delta(bm);
    Scratch<T> plow(kLowp ? bm * kKeyGroup : 0), dslow(kLowp ? bm * kKeyGroup : 0);
    // fp32 inputs accumulate straight into dk/dv (fp32, rows ld_img apart); others in these
    // buffers (rows d apart).
    Scratch<float> dk_acc(kLowp ? s.Nk * d : 0), dv_acc(kLowp ? s.Nk * d : 0);
    const int64_t ld_img = kLowp ? d : dk.stride(2);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / s.H, h = task % s.H;
      const int64_t t = sets.set_of(b), np = sets.length_of(t, s.P);
      const Mat<T> Q = mat<T>(q, b, h), K = mat<T>(k, b, h), V = mat<T>(v, b, h);
      const Mat<T> PK = mat<T>(pk, t, h), PV = mat<T>(pv, t, h);
      const Mat<T> DO = mat<T>(dout, b, h), O = mat<T>(out, b, h);
      const int64_t total = np + s.Nk;
      float* dpk = buf.dpk_seq + (b * s.H + h) * s.P * d;
      float* dpv = buf.dpv_seq + (b * s.H + h) * s.P * d;
      float* gate = buf.gate_part == nullptr ? nullptr : buf.gate_part + (b * s.H + h) * s.P;
      float* dk_img;
      float* dv_img;
      if constexpr (kLowp) {
        std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
        dk_img = dk_acc.data();
        dv_img = dv_acc.data();
      } else {
        dk_img = dk.data_ptr<float>() + b * dk.stride(0) + h * dk.stride(1);
        dv_img = dv.data_ptr<float>() + b * dv.stride(0) + h * dv.stride(1);
      }
      for (int64_t r0 = 0; r0 < s.Nq; r0 += bm) {
        const int64_t rows = std::min(bm, s.Nq - r0);
        const T* qrow = Q.row(r0);
        const T* dorow = DO.row(r0);
        const float* lrow = lse_p + (b * s.H + h) * s.Nq + r0;
        for (int64_t r = 0; r < rows; ++r) delta[r] = dot_row(DO.row(r0 + r), O.row(r0 + r), d);
        std::fill(dq_acc.begin(), dq_acc.begin() + rows * d, 0.0f);
        for (int64_t c0 = 0; c0 < total; c0 += kKeyGroup) {
          const int64_t cols = std::min(kKeyGroup, total - c0);
          Piece pcs[2];
          const int npc = pieces_of(c0, cols, np, pcs);
          auto keys = [&](const Piece& pc) -> const Mat<T>& { return pc.segment == 0 ? PK : K; };
          auto vals = [&](const Piece& pc) -> const Mat<T>& { return pc.segment == 0 ? PV : V; };
          auto dld = [&](const Piece& pc) { return pc.segment == 0 ? d : ld_img; };
          auto dkey = [&](const Piece& pc) {
            return pc.segment == 0 ? dpk + pc.start * d : dk_img + pc.start * ld_img;
          };
          auto dval = [&](const Piece& pc) {
            return pc.segment == 0 ? dpv + pc.start * d : dv_img + pc.start * ld_img;
          };
          // P = exp(scale q k^T + key_bias - lse)
          for (int i = 0; i < npc; ++i) {
            gemm(false, true, rows, pcs[i].len, d, scale, qrow, Q.ld,
                 keys(pcs[i]).row(pcs[i].start), keys(pcs[i]).ld, 0.0f, pbuf.data() + pcs[i].col,
                 cols);
            add_key_bias(pbuf.data(), cols, rows, kb, b, h, r0, pcs[i]);
          }
          for (int64_t r = 0; r < rows; ++r) {
            exp_sub(pbuf.data() + r * cols, cols, lrow[r]);
            if constexpr (kLowp) cast_row(pbuf.data() + r * cols, plow.data() + r * cols, cols);
          }
          // dV += P^T dO ; dP = dO V^T
          for (int i = 0; i < npc; ++i) {
            const Piece& pc = pcs[i];
            if constexpr (kLowp) {
              gemm(true, false, pc.len, d, rows, 1.0f, plow.data() + pc.col, cols, dorow, DO.ld,
                   1.0f, dval(pc), dld(pc));
            } else {
              gemm(true, false, pc.len, d, rows, 1.0f, pbuf.data() + pc.col, cols, dorow, DO.ld,
                   1.0f, dval(pc), dld(pc));
            }
            gemm(false, true, rows, pc.len, d, 1.0f, dorow, DO.ld, vals(pc).row(pc.start),
                 vals(pc).ld, 0.0f, dsbuf.data() + pc.col, cols);
          }
          // dS = P (dP - delta); the gate sums dS over queries for each prompt key.
          for (int64_t r = 0; r < rows; ++r) {
            float* dsrow = dsbuf.data() + r * cols;
            dscore_row(dsrow, pbuf.data() + r * cols, delta[r], cols);
            if (gate != nullptr && c0 < np) add_row(gate + c0, dsrow, std::min(cols, np - c0));
            if constexpr (kLowp) cast_row(dsrow, dslow.data() + r * cols, cols);
          }
          // dQ += scale dS K ; dK += scale dS^T Q
          for (int i = 0; i < npc; ++i) {
            const Piece& pc = pcs[i];
            if constexpr (kLowp) {
              gemm(false, false, rows, d, pc.len, scale, dslow.data() + pc.col, cols,
                   keys(pc).row(pc.start), keys(pc).ld, 1.0f, dq_acc.data(), d);
              gemm(true, false, pc.len, d, rows, scale, dslow.data() + pc.col, cols, qrow, Q.ld,
                   1.0f, dkey(pc), dld(pc));
            } else {
              gemm(false, false, rows, d, pc.len, scale, dsbuf.data() + pc.col, cols,
                   keys(pc).row(pc.start), keys(pc).ld, 1.0f, dq_acc.data(), d);
              gemm(true, false, pc.len, d, rows, scale, dsbuf.data() + pc.col, cols, qrow, Q.ld,
                   1.0f, dkey(pc), dld(pc));
            }
          }
        }
        T* dq_p = dq.data_ptr<T>() + b * dq.stride(0) + h * dq.stride(1) + r0 * dq.stride(2);
        for (int64_t r = 0; r < rows; ++r) {
          store_row(dq_acc.data() + r * d, 1.0f, dq_p + r * dq.stride(2), d);
        }
      }
      if constexpr (kLowp) {
        T* dk_p = dk.data_ptr<T>() + b * dk.stride(0) + h * dk.stride(1);
        T* dv_p = dv.data_ptr<T>() + b * dv.stride(0) + h * dv.stride(1);
        for (int64_t n = 0; n < s.Nk; ++n) {
          store_row(dk_acc.data() + n * d, 1.0f, dk_p + n * dk.stride(2), d);
          store_row(dv_acc.data() + n * d, 1.0f, dv_p + n * dv.stride(2), d);
        }
      }
    }
  });
}

// A checked key_bias as the kernels read it: fp32 (exact for 16-bit inputs), broadcast to
// (B, H, Nq, Nk) without copying; undefined without one.
at::Tensor expanded_bias(const OptTensor& key_bias, const AttnShape& s) {
  if (!key_bias.has_value()) return at::Tensor();
  return key_bias_4d(key_bias->to(at::kFloat)).expand({s.B, s.H, s.Nq, s.Nk});
}

// The sequences of each set as the tensors cpu::reduce_sets reads.
std::pair<at::Tensor, at::Tensor> member_tensors(const Sets& sets, int64_t B, int64_t T) {
  const SetMembers m = set_members(sets, B, T);
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor order = at::empty({B}, i64), offsets = at::empty({T + 1}, i64);
  std::copy(m.order.begin(), m.order.end(), order.data_ptr<int64_t>());
  std::copy(m.offsets.begin(), m.offsets.end(), offsets.data_ptr<int64_t>());
  return {order, offsets};
}

}  // namespace
}  // namespace fastprompt::cpu

namespace fastprompt {
using namespace fastprompt::cpu;

std::tuple<Tensor, Tensor> prompt_attention_fwd_cpu(const Tensor& q_, const Tensor& k_,
                                                    const Tensor& v_, const Tensor& pk_,
                                                    const Tensor& pv_,
                                                    const OptTensor& prompt_index,
                                                    const OptTensor& prompt_lengths, double scale,
                                                    const OptTensor& key_bias) {
  constexpr const char* op = "fastprompt_ext::prompt_attention_fwd";
  const AttnShape s = check_attention(q_, k_, v_, pk_, pv_, prompt_index, prompt_lengths, op);
  check_key_bias(key_bias, s, q_, op);
  const at::Tensor kb = expanded_bias(key_bias, s);
  const Sets sets = read_sets(prompt_index, prompt_lengths, s, op);
  const at::Tensor q = rows_readable(q_), k = rows_readable(k_), v = rows_readable(v_);
  const at::Tensor pk = rows_readable(pk_), pv = rows_readable(pv_);
  // (B, H, N, d) stored as (B, N, H, d): merging heads afterwards is free.
  at::Tensor out = heads_last_empty(s.B, s.H, s.Nq, s.d, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.Nq}, q.options().dtype(at::kFloat));
  if (s.B * s.H * s.Nq == 0) return {out, lse};
  FP_DISPATCH_FLOATS(q.scalar_type(), "prompt_attention_fwd", [&] {
    forward<scalar_t>(q, k, v, pk, pv, sets, bias_view(kb), s, static_cast<float>(scale), out,
                      lse);
  });
  return {out, lse};
}

BwdResult prompt_attention_bwd_cpu(
    const Tensor& dout_, const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& pk_,
    const Tensor& pv_, const OptTensor& prompt_index, const OptTensor& prompt_lengths,
    const Tensor& out_, const Tensor& lse_, double scale, const OptTensor& u_k_,
    const OptTensor& u_v_, const OptTensor& key_bias) {
  constexpr const char* op = "fastprompt_ext::prompt_attention_bwd";
  const AttnShape s = check_attention(q_, k_, v_, pk_, pv_, prompt_index, prompt_lengths, op);
  check_key_bias(key_bias, s, q_, op);
  const at::Tensor kb = expanded_bias(key_bias, s);
  const int64_t S = check_backward_args(dout_, q_, out_, lse_, u_k_, u_v_, s, op);
  const bool scored = u_k_.has_value();
  const Sets sets = read_sets(prompt_index, prompt_lengths, s, op);
  const at::Tensor q = rows_readable(q_), k = rows_readable(k_), v = rows_readable(v_);
  const at::Tensor pk = rows_readable(pk_), pv = rows_readable(pv_);
  const at::Tensor dout = rows_readable(dout_), out = rows_readable(out_);
  const at::Tensor lse = lse_.contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  // dq, dk, dv stored (B, N, H, d), as the op keeps them (merging heads is then free).
  at::Tensor dq = heads_last_empty(s.B, s.H, s.Nq, s.d, q.options());
  // fp32 dk/dv are accumulated in place, so they start at zero.
  at::Tensor dk = heads_last_empty(s.B, s.H, s.Nk, s.d, q.options());
  at::Tensor dv = heads_last_empty(s.B, s.H, s.Nk, s.d, q.options());
  if (q.scalar_type() == at::kFloat) {
    dk.zero_();
    dv.zero_();
  }
  at::Tensor dpk_seq = at::zeros({s.B, s.H, s.P, s.d}, f32);
  at::Tensor dpv_seq = at::zeros({s.B, s.H, s.P, s.d}, f32);
  // The gate (sum over queries of dS per prompt key) only when scores are asked for.
  at::Tensor gate_part = at::zeros({scored ? s.B : 0, s.H, s.P}, f32);
  if (s.B * s.H * s.Nq > 0) {
    BwdBuffers buf{dpk_seq.data_ptr<float>(), dpv_seq.data_ptr<float>(),
                   scored ? gate_part.data_ptr<float>() : nullptr};
    FP_DISPATCH_FLOATS(q.scalar_type(), "prompt_attention_bwd", [&] {
      backward<scalar_t>(dout, q, k, v, pk, pv, out, lse, sets, bias_view(kb), s,
                         static_cast<float>(scale), dq, dk, dv, buf);
    });
  } else {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  const auto [order, offsets] = member_tensors(sets, s.B, s.T);
  const at::Tensor dpk = reduce_sets(dpk_seq, order, offsets, s.T);
  const at::Tensor dpv = reduce_sets(dpv_seq, order, offsets, s.T);
  at::Tensor terms = at::zeros({S, s.B, s.P}, f32);
  at::Tensor gate = at::zeros({s.B, s.P}, f32);
  if (scored) {
    const at::Tensor index = prompt_index.has_value() ? prompt_index->to(at::kLong) : at::Tensor();
    score_terms(dpk_seq, dpv_seq, gate_part, 1.0, u_k_->to(at::kFloat).contiguous(),
                u_v_->to(at::kFloat).contiguous(), index, terms, gate);
  }
  return {dq, dk, dv, dpk, dpv, terms, gate};
}

}  // namespace fastprompt
