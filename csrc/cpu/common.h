// Helpers shared by the CPU kernel files: input views, prompt-set lookup, score reduction.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>
#include <vector>

#include "../checks.h"
#include "fastprompt/arith.h"

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

// The sequences of each set: set t holds order[offsets[t]] ... order[offsets[t + 1] - 1], in
// increasing sequence order (a stable counting sort of prompt_index).
struct SetMembers {
  std::vector<int64_t> order;    // (B,)
  std::vector<int64_t> offsets;  // (T + 1,)
};

inline SetMembers set_members(const Sets& sets, int64_t B, int64_t T) {
  SetMembers m{std::vector<int64_t>(B), std::vector<int64_t>(T + 1, 0)};
  for (int64_t b = 0; b < B; ++b) ++m.offsets[sets.set_of(b) + 1];
  for (int64_t t = 0; t < T; ++t) m.offsets[t + 1] += m.offsets[t];
  std::vector<int64_t> next(m.offsets.begin(), m.offsets.end() - 1);
  for (int64_t b = 0; b < B; ++b) m.order[next[sets.set_of(b)]++] = b;
  return m;
}

inline Sets read_sets(const std::optional<at::Tensor>& index,
                      const std::optional<at::Tensor>& lengths, const AttnShape& s,
                      const char* op) {
  Sets sets{to_vector(index), to_vector(lengths)};
  for (int64_t i : sets.index) {
    TORCH_CHECK(set_index_ok(i, s.T), op, ": prompt_index values must lie in [0, ", s.T, "), got ",
                i);
  }
  for (int64_t n : sets.lengths) {
    TORCH_CHECK(set_length_ok(n, s.P), op, ": prompt_lengths values must lie in [0, ", s.P,
                "], got ", n);
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

// The per-set reduction and the score epilogue of csrc/cpu/cascade_kernels.cpp, which the CPU
// kernels' backward shares (arguments as in csrc/cascade/kernels.h).
at::Tensor reduce_sets(const at::Tensor& per_seq, const at::Tensor& order,
                       const at::Tensor& offsets, int64_t T);
void score_terms(const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& gate_src,
                 double gate_mult, const at::Tensor& u_k, const at::Tensor& u_v,
                 const at::Tensor& index, const at::Tensor& terms, const at::Tensor& gate);

}  // namespace fastprompt::cpu
