// Pieces shared by the two paths of the CPU prompt attention (csrc/cpu/prompt_attention.cpp):
// the key_bias view, scaled scores, GEMM operands, and the runs of sequences with one prompt set
// that the backward sums prompt gradients over.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "common.h"
#include "vec_utils.h"

namespace fastprompt::cpu {

constexpr int64_t kKeyGroup = 512;  // key columns per score block

// key_bias broadcast to (G, H, Nq, Nk) in fp32, read through its strides (0 where it
// broadcasts), sequence b reading row b mod G (G = B, or a period: a bias per window, never
// repeated in memory); p is null without one.
struct BiasView {
  const float* p = nullptr;
  int64_t sb = 0, sh = 0, sn = 0, sk = 0, period = 1;
};

inline BiasView bias_view(const at::Tensor& expanded) {
  if (!expanded.defined()) return {};
  return {expanded.const_data_ptr<float>(), expanded.stride(0), expanded.stride(1),
          expanded.stride(2), expanded.stride(3), std::max<int64_t>(expanded.size(0), 1)};
}

// A key group's scores (rows x cols, ld apart; keys c0 .. c0 + cols - 1 of [prompt set; image
// keys], np prompt keys) += key_bias of sequence b, head h, query rows r0... on its image keys.
inline void add_key_bias(float* scores, int64_t ld, int64_t rows, const BiasView& kb, int64_t b,
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

// scores (rows x cols, rows cols apart) = scale q k^T, k's rows ldk apart. An infinite scale
// multiplies the finished products, as the reference does: a BLAS may fold alpha into an operand
// before summing, and inf * a_i b_i summed gives NaN where the reference's inf * (a . b) is +-inf.
template <typename T>
void scaled_scores(int64_t rows, int64_t cols, int64_t d, float scale, const T* q, int64_t ldq,
                   const T* k, int64_t ldk, float* scores) {
  const bool finite = std::isfinite(scale);
  gemm(false, true, rows, cols, d, finite ? scale : 1.0f, q, ldq, k, ldk, 0.0f, scores, cols);
  if (!finite) scale_row(scores, scale, rows * cols);
}

// The backward's units of prompt-key gradient: runs of consecutive sequences with one prompt set
// (one sequence each when the score terms need per-sequence gradients). A run's gradient is
// summed in its own fp32 buffer, and the runs' buffers per set in run order: deterministic
// whatever the thread count, without atomics, as long as the run length depends on the input
// alone. Runs rather than single sequences keep the buffers small: a Swin stage has thousands of
// (window, head) pairs, and a buffer each was hundreds of MB per training step to allocate and
// fault in.
struct Runs {
  std::vector<int64_t> begin;  // (n + 1,): run u holds sequences begin[u] .. begin[u + 1] - 1
  Sets sets;                   // each run's set (index) and the sets' lengths
  int64_t longest = 0;         // sequences in the longest run
  int64_t count() const { return static_cast<int64_t>(begin.size()) - 1; }
};

inline Runs make_runs(const Sets& sets, int64_t B, int64_t max_len) {
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
  for (int64_t u = 0; u < runs.count(); ++u) {
    runs.longest = std::max(runs.longest, runs.begin[u + 1] - runs.begin[u]);
  }
  return runs;
}

// Results of the backward reduced afterwards.
struct BwdBuffers {
  float* dpk_run;    // (runs, H, P, d) fp32, written by the tasks
  float* dpv_run;
  float* gate_part;  // (B, H, P) fp32, zeroed; sum over queries of dS per head
};

}  // namespace fastprompt::cpu
