// Vectorised row loops of the CPU kernels (at::vec; compiled for the ISA the build targets).
// The scalar decisions around them (-inf rows, rescaling) live in fastprompt/arith.h.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "fastprompt/arith.h"

namespace fastprompt::cpu {

using Vec = at::vec::Vectorized<float>;

inline float row_max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= Vec::size()) {
    Vec vm = Vec::loadu(x);
    for (i = Vec::size(); i + Vec::size() <= n; i += Vec::size()) {
      vm = at::vec::maximum(vm, Vec::loadu(x + i));
    }
    m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// x <- exp(x - m); returns the sum of the new x. m must be finite.
inline float exp_sub_sum(float* x, int64_t n, float m) {
  const Vec vm(m);
  Vec vs(0.0f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec e = (Vec::loadu(x + i) - vm).exp_u20();
    e.store(x + i);
    vs = vs + e;
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vs);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    s += x[i];
  }
  return s;
}

// x <- exp(x - lse), or 0 everywhere when lse gives no key a probability (a row that attended
// to nothing, or a saturated one: fastprompt/arith.h).
inline void exp_sub(float* x, int64_t n, float lse) {
  if (lse_gives_no_probability(lse)) {
    std::fill(x, x + n, 0.0f);
    return;
  }
  const Vec vm(lse);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    (Vec::loadu(x + i) - vm).exp_u20().store(x + i);
  }
  for (; i < n; ++i) x[i] = std::exp(x[i] - lse);
}

// ds <- p * (ds - delta)  (ds holds dP on entry).
inline void dscore_row(float* ds, const float* p, float delta, int64_t n) {
  const Vec vd(delta);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    (Vec::loadu(p + i) * (Vec::loadu(ds + i) - vd)).store(ds + i);
  }
  for (; i < n; ++i) ds[i] = p[i] * (ds[i] - delta);
}

inline void add_row(float* acc, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    (Vec::loadu(acc + i) + Vec::loadu(x + i)).store(acc + i);
  }
  for (; i < n; ++i) acc[i] += x[i];
}

// y <- y + a * x
inline void axpy_row(float* y, const float* x, float a, int64_t n) {
  const Vec va(a);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    at::vec::fmadd(Vec::loadu(x + i), va, Vec::loadu(y + i)).store(y + i);
  }
  for (; i < n; ++i) y[i] += a * x[i];
}

inline void scale_row(float* x, float f, int64_t n) {
  const Vec vf(f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(x + i) * vf).store(x + i);
  for (; i < n; ++i) x[i] *= f;
}

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// dst <- src * f in T (f = 1 for a plain cast).
template <typename T>
inline void store_row(const float* src, float f, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    const Vec vf(f);
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(src + i) * vf).store(dst + i);
    for (; i < n; ++i) dst[i] = src[i] * f;
  } else {
    constexpr int64_t kChunk = 256;
    float tmp[kChunk];
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const int64_t len = std::min(kChunk, n - i0);
      for (int64_t i = 0; i < len; ++i) tmp[i] = src[i0 + i] * f;
      at::vec::convert(tmp, dst + i0, len);
    }
  }
}

// Low-precision copy of an fp32 row (the GEMM operand of P or dS).
template <typename T>
inline void cast_row(const float* src, T* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

// fp32 dot product of two rows of T.
template <typename T>
inline float dot_row(const T* a, const T* b, int64_t n) {
  float s = 0.0f;
  if constexpr (std::is_same_v<T, float>) {
    Vec vs(0.0f);
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      vs = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), vs);
    }
    s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vs);
    for (; i < n; ++i) s += a[i] * b[i];
  } else {
    for (int64_t i = 0; i < n; ++i) s += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  }
  return s;
}

}  // namespace fastprompt::cpu
