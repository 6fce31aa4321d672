// Prompt attention on the CPU: forward and backward (with the optional score terms).
//
// Each task is one (sequence, head, block of query rows). Its keys are the sequence's prompt set
// (prompt_k[prompt_index[b], h, :prompt_lengths[set]]; a shared set is one tensor, never expanded
// per sequence) followed by the sequence's own keys, whose scores get the optional key_bias (read
// through its broadcast strides, in fp32). The task packs the two segments of one (sequence,
// head) into a contiguous scratch block, so that each score or value product is one GEMM: with
// windows of 49 tokens the products are tiny and their number costs more than the copy (the
// PyTorch-level alternative, a cat per sequence, materialises every sequence's keys at once).
// Keys are taken in groups of at most kKeyGroup columns and the softmax runs online across groups
// (fastprompt/arith.h), so long key sets stay in cache-sized blocks. GEMMs come from blas.h;
// low-precision inputs multiply in their own type with fp32 accumulation (P and dS are rounded to
// the input type before their GEMMs, as PyTorch's own CPU flash attention does).
//
// Backward tasks are (run of sequences, head): a task owns the gradients of its sequences' image
// keys and the run's prompt-key gradients, which go to a per-run fp32 buffer and are then summed
// per set in run order (deterministic whatever the thread count; no atomics).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
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

// key_bias broadcast to (G, H, Nq, Nk) in fp32, read through its strides (0 where it
// broadcasts), sequence b reading row b mod G (G = B, or a period: a bias per window, never
// repeated in memory); p is null without one.
struct BiasView {
  const float* p = nullptr;
  int64_t sb = 0, sh = 0, sn = 0, sk = 0, period = 1;
};

BiasView bias_view(const at::Tensor& expanded) {
  if (!expanded.defined()) return {};
  return {expanded.const_data_ptr<float>(), expanded.stride(0), expanded.stride(1),
          expanded.stride(2), expanded.stride(3), std::max<int64_t>(expanded.size(0), 1)};
}

// A key group's scores (rows x cols, ld apart; keys c0 .. c0 + cols - 1 of [prompt set; image
// keys], np prompt keys) += key_bias of sequence b, head h, query rows r0... on its image keys.
void add_key_bias(float* scores, int64_t ld, int64_t rows, const BiasView& kb, int64_t b,
                  int64_t h, int64_t r0, int64_t c0, int64_t cols, int64_t np) {
  const int64_t img0 = std::max(c0, np);  // the group's first image key, as a packed column
  if (kb.p == nullptr || c0 + cols <= img0) return;
  const int64_t len = c0 + cols - img0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* src =
        kb.p + (b % kb.period) * kb.sb + h * kb.sh + (r0 + r) * kb.sn + (img0 - np) * kb.sk;
    float* dst = scores + r * ld + (img0 - c0);
    if (kb.sk == 1) {
      add_row(dst, src, len);
    } else {
      for (int64_t j = 0; j < len; ++j) dst[j] += src[j * kb.sk];
    }
  }
}

// The GEMM operand of a fp32 block of P or dS: the block itself, or its copy in the inputs'
// low-precision type.
template <typename T>
const T* operand(Scratch<float>& f32, Scratch<T>& low) {
  if constexpr (std::is_same_v<T, float>) {
    return f32.data();
  } else {
    return low.data();
  }
}

// Rows [0, n) of m into dst, rows d apart.
template <typename T>
void copy_rows(const Mat<T>& m, int64_t n, int64_t d, T* dst) {
  for (int64_t r = 0; r < n; ++r) std::copy(m.row(r), m.row(r) + d, dst + r * d);
}

// scores (rows x cols, rows cols apart) = scale q k^T. An infinite scale multiplies the finished
// products, as the reference does: a BLAS may fold alpha into an operand before summing, and
// inf * a_i b_i summed gives NaN where the reference's inf * (a . b) is +-inf.
template <typename T>
void scaled_scores(int64_t rows, int64_t cols, int64_t d, float scale, const T* q, int64_t ldq,
                   const T* k, float* scores) {
  const bool finite = std::isfinite(scale);
  gemm(false, true, rows, cols, d, finite ? scale : 1.0f, q, ldq, k, d, 0.0f, scores, cols);
  if (!finite) scale_row(scores, scale, rows * cols);
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
  const int64_t key_rows = s.P + s.Nk;
  T* out_p = out.data_ptr<T>();  // (B, Nq, H, d) storage
  float* lse_p = lse.data_ptr<float>();

  at::parallel_for(0, s.B * s.H * nqb, 1, [&](int64_t begin, int64_t end) {
    BlasThreadGuard blas_threads;
    Scratch<float> sbuf(bm * kKeyGroup), acc(bm * d);
    Scratch<T> plow(kLowp ? bm * kKeyGroup : 0);
    Scratch<T> kcat(key_rows * d), vcat(key_rows * d);
    std::vector<RowState> st(bm);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (s.H * nqb), h = (task / nqb) % s.H, qb = task % nqb;
      const int64_t r0 = qb * bm, rows = std::min(bm, s.Nq - r0);
      if (rows <= 0) continue;
      const int64_t t = sets.set_of(b), np = sets.length_of(t, s.P);
      const Mat<T> Q = mat<T>(q, b, h);
      copy_rows(mat<T>(pk, t, h), np, d, kcat.data());
      copy_rows(mat<T>(k, b, h), s.Nk, d, kcat.data() + np * d);
      copy_rows(mat<T>(pv, t, h), np, d, vcat.data());
      copy_rows(mat<T>(v, b, h), s.Nk, d, vcat.data() + np * d);
      const T* qrow = Q.row(r0);
      const int64_t total = np + s.Nk;
      std::fill(st.begin(), st.begin() + rows, row_init());
      if (total == 0) std::fill(acc.begin(), acc.begin() + rows * d, 0.0f);
      for (int64_t c0 = 0; c0 < total; c0 += kKeyGroup) {
        const int64_t cols = std::min(kKeyGroup, total - c0);
        scaled_scores(rows, cols, d, scale, qrow, Q.ld, kcat.data() + c0 * d, sbuf.data());
        add_key_bias(sbuf.data(), cols, rows, kb, b, h, r0, c0, cols, np);
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
        const float beta = c0 == 0 ? 0.0f : 1.0f;
        gemm(false, false, rows, d, cols, 1.0f, operand(sbuf, plow), cols, vcat.data() + c0 * d,
             d, beta, acc.data(), d);
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* orow = out_p + ((b * s.Nq + r0 + r) * s.H + h) * d;
        store_row(acc.data() + r * d, row_out_scale(st[r]), orow, d);
        lse_p[(b * s.H + h) * s.Nq + r0 + r] = row_lse(st[r]);
      }
    }
  });
}

// The backward's units of prompt-key gradient: runs of consecutive sequences with one prompt set,
// at most kRunSeqs long (one sequence each when the score terms need per-sequence gradients).
// A run's gradient is summed in sequence order in its own fp32 buffer, and the runs' buffers per
// set in run order: deterministic whatever the thread count, without atomics. Runs rather than
// single sequences keep the buffers small: a Swin stage has thousands of (window, head) pairs,
// and a buffer each was hundreds of MB per training step to allocate and fault in.
constexpr int64_t kRunSeqs = 16;

struct Runs {
  std::vector<int64_t> begin;  // (n + 1,): run u holds sequences begin[u] .. begin[u + 1] - 1
  Sets sets;                   // each run's set (index) and the sets' lengths
  int64_t count() const { return static_cast<int64_t>(begin.size()) - 1; }
};

Runs make_runs(const Sets& sets, int64_t B, int64_t max_len) {
  Runs runs;
  runs.sets.lengths = sets.lengths;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = sets.set_of(b);
    if (runs.begin.empty() || b - runs.begin.back() == max_len || t != runs.sets.index.back()) {
      runs.begin.push_back(b);
      runs.sets.index.push_back(t);
    }
  }
  runs.begin.push_back(B);
  return runs;
}

// Results of the backward reduced afterwards.
struct BwdBuffers {
  float* dpk_run;    // (runs, H, P, d) fp32, written by the tasks
  float* dpv_run;
  float* gate_part;  // (B, H, P) fp32, zeroed; sum over queries of dS per head
};

// Tasks are (run, head). For each sequence the task packs [prompt keys; image keys] (and the
// values) into one contiguous block, so each step of a key group is one GEMM rather than one per
// segment (with windows of 49 tokens the GEMMs are tiny and their number is what costs), and
// accumulates the key/value gradients in a matching fp32 block: its prompt rows are added to the
// run's buffer, its image rows stored to dk/dv.
template <typename T>
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& out,
              const at::Tensor& lse, const Runs& runs, const BiasView& kb, const AttnShape& s,
              float scale, bool image_grads, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
              const BwdBuffers& buf) {
  constexpr bool kLowp = !std::is_same_v<T, float>;
  const int64_t nqb = row_blocks(s.Nq);
  const int64_t bm = (s.Nq + nqb - 1) / nqb;
  const int64_t d = s.d;
  const int64_t key_rows = s.P + s.Nk;
  const float* lse_p = lse.const_data_ptr<float>();  // contiguous (B, H, Nq)

  at::parallel_for(0, runs.count() * s.H, 1, [&](int64_t begin, int64_t end) {
    BlasThreadGuard blas_threads;
    Scratch<float> pbuf(bm * kKeyGroup), dsbuf(bm * kKeyGroup), dq_acc(bm * d), delta(bm);
    Scratch<T> plow(kLowp ? bm * kKeyGroup : 0), dslow(kLowp ? bm * kKeyGroup : 0);
    Scratch<T> kcat(key_rows * d), vcat(key_rows * d);
    Scratch<float> dkcat(key_rows * d), dvcat(key_rows * d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u = task / s.H, h = task % s.H;
      const int64_t t = runs.sets.set_of(u), np = runs.sets.length_of(t, s.P);
      // Without image gradients only the prompt keys' columns are needed: their probabilities
      // come from the forward's lse, and dS of a column from that column alone.
      const int64_t total = np + (image_grads ? s.Nk : 0);
      float* dpk = buf.dpk_run + (u * s.H + h) * s.P * d;
      float* dpv = buf.dpv_run + (u * s.H + h) * s.P * d;
      std::fill(dpk, dpk + s.P * d, 0.0f);
      std::fill(dpv, dpv + s.P * d, 0.0f);
      copy_rows(mat<T>(pk, t, h), np, d, kcat.data());
      copy_rows(mat<T>(pv, t, h), np, d, vcat.data());
      for (int64_t b = runs.begin[u]; b < runs.begin[u + 1]; ++b) {
        const Mat<T> Q = mat<T>(q, b, h), DO = mat<T>(dout, b, h), O = mat<T>(out, b, h);
        copy_rows(mat<T>(k, b, h), total - np, d, kcat.data() + np * d);
        copy_rows(mat<T>(v, b, h), total - np, d, vcat.data() + np * d);
        std::fill(dkcat.begin(), dkcat.begin() + total * d, 0.0f);
        std::fill(dvcat.begin(), dvcat.begin() + total * d, 0.0f);
        float* gate = buf.gate_part == nullptr ? nullptr : buf.gate_part + (b * s.H + h) * s.P;
        for (int64_t r0 = 0; r0 < s.Nq; r0 += bm) {
          const int64_t rows = std::min(bm, s.Nq - r0);
          const T* qrow = Q.row(r0);
          const T* dorow = DO.row(r0);
          const float* lrow = lse_p + (b * s.H + h) * s.Nq + r0;
          for (int64_t r = 0; r < rows; ++r) delta[r] = dot_row(DO.row(r0 + r), O.row(r0 + r), d);
          std::fill(dq_acc.begin(), dq_acc.begin() + rows * d, 0.0f);
          for (int64_t c0 = 0; c0 < total; c0 += kKeyGroup) {
            const int64_t cols = std::min(kKeyGroup, total - c0);
            const T* kg = kcat.data() + c0 * d;
            const T* vg = vcat.data() + c0 * d;
            float* dkg = dkcat.data() + c0 * d;
            float* dvg = dvcat.data() + c0 * d;
            // P = exp(scale q k^T + key_bias - lse)
            scaled_scores(rows, cols, d, scale, qrow, Q.ld, kg, pbuf.data());
            add_key_bias(pbuf.data(), cols, rows, kb, b, h, r0, c0, cols, np);
            for (int64_t r = 0; r < rows; ++r) {
              exp_sub(pbuf.data() + r * cols, cols, lrow[r]);
              if constexpr (kLowp) cast_row(pbuf.data() + r * cols, plow.data() + r * cols, cols);
            }
            // dV += P^T dO ; dP = dO V^T
            gemm(true, false, cols, d, rows, 1.0f, operand(pbuf, plow), cols, dorow, DO.ld, 1.0f,
                 dvg, d);
            gemm(false, true, rows, cols, d, 1.0f, dorow, DO.ld, vg, d, 0.0f, dsbuf.data(), cols);
            // dS = P (dP - delta); the gate sums dS over queries for each prompt key.
            for (int64_t r = 0; r < rows; ++r) {
              float* dsrow = dsbuf.data() + r * cols;
              dscore_row(dsrow, pbuf.data() + r * cols, delta[r], cols);
              if (gate != nullptr && c0 < np) add_row(gate + c0, dsrow, std::min(cols, np - c0));
              if constexpr (kLowp) cast_row(dsrow, dslow.data() + r * cols, cols);
            }
            // dK += scale dS^T Q ; dQ += scale dS K
            const T* ds = operand(dsbuf, dslow);
            gemm(true, false, cols, d, rows, scale, ds, cols, qrow, Q.ld, 1.0f, dkg, d);
            if (image_grads) {
              gemm(false, false, rows, d, cols, scale, ds, cols, kg, d, 1.0f, dq_acc.data(), d);
            }
          }
          if (!image_grads) continue;
          T* dq_p = dq.data_ptr<T>() + b * dq.stride(0) + h * dq.stride(1) + r0 * dq.stride(2);
          for (int64_t r = 0; r < rows; ++r) {
            store_row(dq_acc.data() + r * d, 1.0f, dq_p + r * dq.stride(2), d);
          }
        }
        add_row(dpk, dkcat.data(), np * d);
        add_row(dpv, dvcat.data(), np * d);
        T* dk_p = dk.data_ptr<T>() + b * dk.stride(0) + h * dk.stride(1);
        T* dv_p = dv.data_ptr<T>() + b * dv.stride(0) + h * dv.stride(1);
        for (int64_t n = 0; n < total - np; ++n) {
          store_row(dkcat.data() + (np + n) * d, 1.0f, dk_p + n * dk.stride(2), d);
          store_row(dvcat.data() + (np + n) * d, 1.0f, dv_p + n * dv.stride(2), d);
        }
      }
    }
  });
}

// A checked key_bias as the kernels read it: fp32 (exact for 16-bit inputs), broadcast to
// (B or its period G, H, Nq, Nk) without copying; undefined without one.
at::Tensor expanded_bias(const OptTensor& key_bias, const AttnShape& s) {
  if (!key_bias.has_value()) return at::Tensor();
  const at::Tensor kb = key_bias_4d(key_bias->to(at::kFloat));
  const int64_t rows = kb.size(0) == 1 ? s.B : kb.size(0);
  return kb.expand({rows, s.H, s.Nq, s.Nk});
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
    const OptTensor& u_v_, const OptTensor& key_bias, bool image_grads) {
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
  at::Tensor dk = heads_last_empty(s.B, s.H, s.Nk, s.d, q.options());
  at::Tensor dv = heads_last_empty(s.B, s.H, s.Nk, s.d, q.options());
  // The score terms read each sequence's own prompt-key gradients: runs of one sequence then.
  const Runs runs = make_runs(sets, s.B, scored ? 1 : kRunSeqs);
  at::Tensor dpk_run = at::empty({runs.count(), s.H, s.P, s.d}, f32);
  at::Tensor dpv_run = at::empty({runs.count(), s.H, s.P, s.d}, f32);
  // The gate (sum over queries of dS per prompt key) only when scores are asked for.
  at::Tensor gate_part = at::zeros({scored ? s.B : 0, s.H, s.P}, f32);
  if (s.B * s.H * s.Nq > 0) {
    BwdBuffers buf{dpk_run.data_ptr<float>(), dpv_run.data_ptr<float>(),
                   scored ? gate_part.data_ptr<float>() : nullptr};
    FP_DISPATCH_FLOATS(q.scalar_type(), "prompt_attention_bwd", [&] {
      backward<scalar_t>(dout, q, k, v, pk, pv, out, lse, runs, bias_view(kb), s,
                         static_cast<float>(scale), image_grads, dq, dk, dv, buf);
    });
  } else {
    for (at::Tensor* t : {&dq, &dk, &dv, &dpk_run, &dpv_run}) t->zero_();
  }
  const auto [order, offsets] = member_tensors(runs.sets, runs.count(), s.T);
  const at::Tensor dpk = reduce_sets(dpk_run, order, offsets, s.T);
  const at::Tensor dpv = reduce_sets(dpv_run, order, offsets, s.T);
  at::Tensor terms = at::zeros({S, s.B, s.P}, f32);
  at::Tensor gate = at::zeros({s.B, s.P}, f32);
  if (scored) {
    const at::Tensor index = prompt_index.has_value() ? prompt_index->to(at::kLong) : at::Tensor();
    score_terms(dpk_run, dpv_run, gate_part, 1.0, u_k_->to(at::kFloat).contiguous(),
                u_v_->to(at::kFloat).contiguous(), index, terms, gate);
  }
  return {dq, dk, dv, dpk, dpv, terms, gate};
}

}  // namespace fastprompt
