// Helpers shared by the CPU kernel files: input views, prompt-set lookup, score reduction.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>
#include <vector>

#include "../checks.h"

namespace fastprompt::cpu {

// A tensor the GEMMs can read in place: unit stride along d and rows that do not overlap.
inline at::Tensor rows_readable(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && (t.size(2) <= 1 || t.stride(2) >= t.size(3));
  return ok ? t : t.contiguous();
}

inline std::vector<int64_t> to_vector(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return {};
  at::Tensor c = t->to(at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

struct Sets {
  std::vector<int64_t> index;    // empty: set 0 for every sequence
  std::vector<int64_t> lengths;  // empty: all P keys
  int64_t set_of(int64_t b) const { return index.empty() ? 0 : index[b]; }
  int64_t length_of(int64_t t, int64_t P) const { return lengths.empty() ? P : lengths[t]; }
};

inline Sets read_sets(const std::optional<at::Tensor>& index,
                      const std::optional<at::Tensor>& lengths, const AttnShape& s,
                      const char* op) {
  Sets sets{to_vector(index), to_vector(lengths)};
  for (int64_t i : sets.index) {
    TORCH_CHECK(i >= 0 && i < s.T, op, ": prompt_index values must lie in [0, ", s.T, "), got ", i);
  }
  for (int64_t n : sets.lengths) {
    TORCH_CHECK(n >= 0 && n <= s.P, op, ": prompt_lengths values must lie in [0, ", s.P, "], got ",
                n);
  }
  return sets;
}

// A zero-initialised scratch array aligned to 64 bytes. The BLAS may pick its code path by the
// alignment of its operands; a fixed alignment keeps the GEMMs, and so the backward, bitwise
// reproducible from run to run (std::vector's alignment depends on the allocator's state).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : n_(n) {
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
    p_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(p_ != nullptr, "fastprompt_ext: out of memory allocating ", bytes, " bytes");
    std::fill(p_.get(), p_.get() + n, T(0));
  }
  T* data() { return p_.get(); }
  T* begin() { return p_.get(); }
  T* end() { return p_.get() + n_; }
  T& operator[](int64_t i) { return p_.get()[i]; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> p_;
  int64_t n_;
};

// Row-major (rows x d) matrix of one (sequence or set, head) with its row stride.
template <typename T>
struct Mat {
  const T* p;
  int64_t ld;
  const T* row(int64_t r) const { return p + r * ld; }
};

template <typename T>
inline Mat<T> mat(const at::Tensor& t, int64_t i0, int64_t h) {
  return {t.const_data_ptr<T>() + i0 * t.stride(0) + h * t.stride(1), t.stride(2)};
}

// Prompt Condensation terms from per-sequence fp32 prompt gradients dpk_seq/dpv_seq (B, H, P, d)
// and per-head gate parts (B, H, P): terms (S, B, P) and gate (B, P), both fp32, summed in a
// fixed order. u_k/u_v: contiguous fp32 (S, T, H, P, d) (ignored when S = 0).
void score_terms(const float* dpk_seq, const float* dpv_seq, const float* gate_part,
                 const at::Tensor& u_k, const at::Tensor& u_v, int64_t S, const Sets& sets,
                 const AttnShape& s, at::Tensor& terms, at::Tensor& gate);

}  // namespace fastprompt::cpu
