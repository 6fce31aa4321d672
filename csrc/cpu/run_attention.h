// The CPU prompt attention over runs of sequences that share one prompt set (the path
// csrc/cpu/prompt_attention.cpp takes for short sequences: windows, ViT-sized sequences).
//
// A task is one (run, head). Every query row of the run attends to the same prompt keys, so the
// prompt segment of all of them is one GEMM per product: scores (R·Nq x P) = scale Q_run K_p^T,
// out += P_p V_p, and in the backward dP_p = dO_run V_p^T, dQ_run = scale dS_p K_p,
// dK_p = scale dS_p^T Q_run and dV_p = P_p^T dO_run, the last two summing over the run's rows
// inside the GEMM (its depth), straight into the run's prompt-gradient buffer. Only the image
// segment (Nq x Nk) is computed per sequence. At Swin's windows (49 queries, 50 prompt and 49
// image keys, d 32) one GEMM of a whole run runs far closer to the BLAS's peak than one small
// GEMM per window over both segments. Each row's softmax spans both segments: its maximum is
// taken over both before either is exponentiated (a row's keys fit in one score block here, so no
// online rescaling is needed; longer ones take the other path).
//
// The run's query rows (and dO's) are read in place when its sequences' rows are evenly spaced,
// as the qkv projection's (S, N, 3, H, d) layout gives, and copied otherwise. The run length
// depends on the shape alone, never on the thread count, so results are bitwise the same for any
// number of threads; prompt gradients are summed per run, then per set in run order.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "attention_parts.h"
#include "blas.h"
#include "common.h"
#include "fastprompt/arith.h"
#include "vec_utils.h"

namespace fastprompt::cpu {

constexpr int64_t kRunRows = 512;  // query rows of a run (sequences x Nq) the split aims for
constexpr int64_t kRunTasks = 64;  // (run, head) tasks it keeps, where the batch allows

// Whether the run path takes this shape: every key of a row in one score block, and a sequence's
// queries within a run's rows.
inline bool run_path_fits(const AttnShape& s) {
  return s.P + s.Nk <= kKeyGroup && s.Nq <= kRunRows;
}

// Sequences per run: as many as kRunRows query rows hold, fewer where that would leave fewer
// than kRunTasks tasks (16-core machines need several tasks per thread to balance). A function of
// the shape alone: the backward's summation order must not depend on the thread count.
inline int64_t run_length(const AttnShape& s) {
  int64_t r = std::max<int64_t>(1, kRunRows / std::max<int64_t>(s.Nq, 1));
  while (r > 1 && (s.B + r - 1) / r * s.H < kRunTasks) --r;
  return r;
}

// The rows of sequences b0 .. b0 + n - 1, head h, of a (B, H, N, d) tensor as one (n·N x d)
// matrix: in place where sequence b + 1's rows follow sequence b's at the row stride, else
// copied into pack.
template <typename T>
Mat<T> run_rows(const at::Tensor& t, int64_t b0, int64_t n, int64_t h, T* pack) {
  const int64_t rows = t.size(2), d = t.size(3);
  const Mat<T> first = mat<T>(t, b0, h);
  if (n == 1 || (t.stride(0) == rows * t.stride(2) && t.stride(2) >= d)) return first;
  for (int64_t i = 0; i < n; ++i) copy_rows(mat<T>(t, b0 + i, h), rows, d, pack + i * rows * d);
  return {pack, d};
}

// One query row's softmax over its two segments, in place: the scores become exp(score - max)
// (0 for a saturated row, fastprompt/arith.h); returns the row's state. The maximum propagates a
// NaN score from either segment, as the reference's softmax does.
inline RowState softmax_row(float* a, int64_t na, float* b, int64_t nb) {
  const float ma = row_max(a, na), mb = row_max(b, nb);
  RowState st = row_init();
  row_rescale(st, (ma > mb || std::isnan(ma)) ? ma : mb);
  if (saturated(st.m)) {
    std::fill(a, a + na, 0.0f);
    std::fill(b, b + nb, 0.0f);
    return st;
  }
  const float m = safe_max(st.m);
  row_add(st, exp_sub_sum(a, na, m) + exp_sub_sum(b, nb, m));
  return st;
}

// Low-precision copies of n fp32 values (no-op for fp32 inputs, whose GEMMs read the fp32 block).
template <typename T>
void cast_if_low(const float* src, Scratch<T>& dst, int64_t offset, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) cast_row(src + offset, dst.data() + offset, n);
}

template <typename T>
void forward_runs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& pk, const at::Tensor& pv, const Runs& runs,
                  const BiasView& kb, const AttnShape& s, float scale, at::Tensor& out,
                  at::Tensor& lse) {
  constexpr bool kLowp = !std::is_same_v<T, float>;
  const int64_t d = s.d, nq = s.Nq, nk = s.Nk, rmax = runs.longest * nq;
  T* out_p = out.data_ptr<T>();  // (B, Nq, H, d) storage
  float* lse_p = lse.data_ptr<float>();

  at::parallel_for(0, runs.count() * s.H, 1, [&](int64_t begin, int64_t end) {
    BlasThreadGuard blas_threads;
    Scratch<float> sp(rmax * s.P), si(nq * nk), acc(rmax * d);
    Scratch<T> splow(kLowp ? rmax * s.P : 0), silow(kLowp ? nq * nk : 0), qpack(rmax * d);
    std::vector<RowState> st(rmax);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u = task / s.H, h = task % s.H;
      const int64_t b0 = runs.begin[u], n = runs.begin[u + 1] - b0, rows = n * nq;
      const int64_t t = runs.sets.set_of(u), np = runs.sets.length_of(t, s.P);
      const Mat<T> Q = run_rows<T>(q, b0, n, h, qpack.data());
      const Mat<T> Kp = mat<T>(pk, t, h), Vp = mat<T>(pv, t, h);
      scaled_scores(rows, np, d, scale, Q.p, Q.ld, Kp.p, Kp.ld, sp.data());
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = b0 + i;
        const Mat<T> K = mat<T>(k, b, h), V = mat<T>(v, b, h);
        scaled_scores(nq, nk, d, scale, Q.row(i * nq), Q.ld, K.p, K.ld, si.data());
        add_key_bias(si.data(), nk, nq, kb, b, h, 0, np, nk, np);
        for (int64_t r = 0; r < nq; ++r) {
          const int64_t row = i * nq + r;
          st[row] = softmax_row(sp.data() + row * np, np, si.data() + r * nk, nk);
          cast_if_low(sp.data(), splow, row * np, np);
          cast_if_low(si.data(), silow, r * nk, nk);
        }
        gemm(false, false, nq, d, nk, 1.0f, operand(si, silow), nk, V.p, V.ld, 0.0f,
             acc.data() + i * nq * d, d);
      }
      gemm(false, false, rows, d, np, 1.0f, operand(sp, splow), np, Vp.p, Vp.ld, 1.0f,
           acc.data(), d);
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t b = b0 + row / nq, r = row % nq;
        T* orow = out_p + ((b * nq + r) * s.H + h) * d;
        store_row(acc.data() + row * d, row_out_scale(st[row]), orow, d);
        lse_p[(b * s.H + h) * nq + r] = row_lse(st[row]);
      }
    }
  });
}

// Stores an fp32 (n x d) block, rows d apart, to rows of a (B, H, N, d) tensor's sequence b,
// head h.
template <typename T>
void store_rows(const float* src, int64_t n, int64_t d, at::Tensor& dst, int64_t b, int64_t h) {
  T* p = dst.data_ptr<T>() + b * dst.stride(0) + h * dst.stride(1);
  for (int64_t r = 0; r < n; ++r) store_row(src + r * d, 1.0f, p + r * dst.stride(2), d);
}

template <typename T>
void backward_runs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& pk, const at::Tensor& pv,
                   const at::Tensor& out, const at::Tensor& lse, const Runs& runs,
                   const BiasView& kb, const AttnShape& s, float scale, bool image_grads,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, const BwdBuffers& buf) {
  constexpr bool kLowp = !std::is_same_v<T, float>;
  const int64_t d = s.d, nq = s.Nq, nk = s.Nk, rmax = runs.longest * nq;
  const float* lse_p = lse.const_data_ptr<float>();  // contiguous (B, H, Nq)

  at::parallel_for(0, runs.count() * s.H, 1, [&](int64_t begin, int64_t end) {
    BlasThreadGuard blas_threads;
    Scratch<float> pp(rmax * s.P), dsp(rmax * s.P), pi(nq * nk), dsi(nq * nk);
    Scratch<float> dq_acc(rmax * d), dk_acc(nk * d), dv_acc(nk * d), delta(rmax), lrow(rmax);
    Scratch<T> pplow(kLowp ? rmax * s.P : 0), dsplow(kLowp ? rmax * s.P : 0);
    Scratch<T> pilow(kLowp ? nq * nk : 0), dsilow(kLowp ? nq * nk : 0);
    Scratch<T> qpack(rmax * d), dopack(rmax * d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u = task / s.H, h = task % s.H;
      const int64_t b0 = runs.begin[u], n = runs.begin[u + 1] - b0, rows = n * nq;
      const int64_t t = runs.sets.set_of(u), np = runs.sets.length_of(t, s.P);
      const Mat<T> Q = run_rows<T>(q, b0, n, h, qpack.data());
      const Mat<T> DO = run_rows<T>(dout, b0, n, h, dopack.data());
      const Mat<T> Kp = mat<T>(pk, t, h), Vp = mat<T>(pv, t, h);
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t b = b0 + row / nq, r = row % nq;
        delta[row] = dot_row(DO.row(row), mat<T>(out, b, h).row(r), d);
        lrow[row] = lse_p[(b * s.H + h) * nq + r];
      }
      // The prompt segment of every row of the run: P = exp(scale Q K_p^T - lse),
      // dV_p = P^T dO, dP = dO V_p^T, dS = P (dP - delta), dK_p = scale dS^T Q.
      scaled_scores(rows, np, d, scale, Q.p, Q.ld, Kp.p, Kp.ld, pp.data());
      for (int64_t row = 0; row < rows; ++row) {
        exp_sub(pp.data() + row * np, np, lrow[row]);
        cast_if_low(pp.data(), pplow, row * np, np);
      }
      float* dpk = buf.dpk_run + (u * s.H + h) * s.P * d;
      float* dpv = buf.dpv_run + (u * s.H + h) * s.P * d;
      std::fill(dpk + np * d, dpk + s.P * d, 0.0f);
      std::fill(dpv + np * d, dpv + s.P * d, 0.0f);
      gemm(true, false, np, d, rows, 1.0f, operand(pp, pplow), np, DO.p, DO.ld, 0.0f, dpv, d);
      gemm(false, true, rows, np, d, 1.0f, DO.p, DO.ld, Vp.p, Vp.ld, 0.0f, dsp.data(), np);
      for (int64_t row = 0; row < rows; ++row) {
        float* ds = dsp.data() + row * np;
        dscore_row(ds, pp.data() + row * np, delta[row], np);
        // The gate sums dS over queries for each prompt key.
        if (buf.gate_part != nullptr) {
          add_row(buf.gate_part + ((b0 + row / nq) * s.H + h) * s.P, ds, np);
        }
        cast_if_low(dsp.data(), dsplow, row * np, np);
      }
      const T* ds_p = operand(dsp, dsplow);
      gemm(true, false, np, d, rows, scale, ds_p, np, Q.p, Q.ld, 0.0f, dpk, d);
      // Without image gradients the prompt columns are all that is needed: their probabilities
      // come from the forward's lse, and dS of a column from that column alone.
      if (!image_grads) continue;
      gemm(false, false, rows, d, np, scale, ds_p, np, Kp.p, Kp.ld, 0.0f, dq_acc.data(), d);
      // The image segment, sequence by sequence, with the same steps.
      for (int64_t i = 0; i < n; ++i) {
        const int64_t b = b0 + i;
        const Mat<T> K = mat<T>(k, b, h), V = mat<T>(v, b, h);
        const T* qb = Q.row(i * nq);
        const T* dob = DO.row(i * nq);
        scaled_scores(nq, nk, d, scale, qb, Q.ld, K.p, K.ld, pi.data());
        add_key_bias(pi.data(), nk, nq, kb, b, h, 0, np, nk, np);
        for (int64_t r = 0; r < nq; ++r) {
          exp_sub(pi.data() + r * nk, nk, lrow[i * nq + r]);
          cast_if_low(pi.data(), pilow, r * nk, nk);
        }
        gemm(true, false, nk, d, nq, 1.0f, operand(pi, pilow), nk, dob, DO.ld, 0.0f,
             dv_acc.data(), d);
        gemm(false, true, nq, nk, d, 1.0f, dob, DO.ld, V.p, V.ld, 0.0f, dsi.data(), nk);
        for (int64_t r = 0; r < nq; ++r) {
          dscore_row(dsi.data() + r * nk, pi.data() + r * nk, delta[i * nq + r], nk);
          cast_if_low(dsi.data(), dsilow, r * nk, nk);
        }
        const T* dsi_p = operand(dsi, dsilow);
        gemm(true, false, nk, d, nq, scale, dsi_p, nk, qb, Q.ld, 0.0f, dk_acc.data(), d);
        gemm(false, false, nq, d, nk, scale, dsi_p, nk, K.p, K.ld, 1.0f,
             dq_acc.data() + i * nq * d, d);
        store_rows<T>(dk_acc.data(), nk, d, dk, b, h);
        store_rows<T>(dv_acc.data(), nk, d, dv, b, h);
        store_rows<T>(dq_acc.data() + i * nq * d, nq, d, dq, b, h);
      }
    }
  });
}

}  // namespace fastprompt::cpu
