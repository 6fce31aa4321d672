// GEMM for the CPU kernels.
//
// ATen's own small-GEMM entry points (at::native::cpublas::gemm for float/bf16) are not exported
// from libtorch_cpu, and going through at::mm per tile costs a dispatcher round trip and tensor
// allocations per call. The BLAS that torch links is exported, though: x86 wheels carry MKL
// (`sgemm_`, and `cblas_gemm_bf16bf16f32` / `cblas_gemm_f16f16f32`, which use AMX/AVX512-BF16
// where the CPU has them); other builds carry OpenBLAS's `sgemm_`. The symbols are looked up once
// at run time, so a build without them still loads: it then falls back to at::mm on tensor views
// of the same memory (correct, slower), and gemm_provider() says which path is in use.
#include "blas.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstring>

namespace fastprompt::cpu {
namespace {

// Fortran BLAS (LP64, as torch declares it in ATen/native/BlasKernel.cpp).
using sgemm_fn = void (*)(const char* transa, const char* transb, const int* m, const int* n,
                          const int* k, const float* alpha, const float* a, const int* lda,
                          const float* b, const int* ldb, const float* beta, float* c,
                          const int* ldc);
// MKL's CBLAS low-precision GEMMs: (layout, transa, transb, m, n, k, alpha, A, lda, B, ldb,
// beta, C, ldc) with 16-bit inputs and fp32 C.
using gemm16_fn = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha,
                           const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                           float* c, int ldc);

constexpr int kCblasRowMajor = 101;
constexpr int kCblasNoTrans = 111;
constexpr int kCblasTrans = 112;

using set_threads_fn = int (*)(int);

struct Symbols {
  set_threads_fn mkl_threads_local = nullptr;
  sgemm_fn sgemm = nullptr;
  gemm16_fn bf16 = nullptr;
  gemm16_fn f16 = nullptr;
  std::string where;
};

void* find_symbol(const char* name, std::string& where) {
  // libtorch_cpu is a link dependency of this library, so it is loaded; its symbols live in our
  // local scope, not necessarily the global one, hence the RTLD_NOLOAD handle first.
  for (const char* lib : {"libtorch_cpu.so", "libtorch_cpu.dylib"}) {
    if (void* handle = dlopen(lib, RTLD_LAZY | RTLD_NOLOAD)) {
      if (void* sym = dlsym(handle, name)) {
        where = lib;
        return sym;
      }
    }
  }
  if (void* sym = dlsym(RTLD_DEFAULT, name)) {
    where = "process";
    return sym;
  }
  return nullptr;
}

const Symbols& symbols() {
  static const Symbols syms = [] {
    Symbols s;
    s.sgemm = reinterpret_cast<sgemm_fn>(find_symbol("sgemm_", s.where));
    std::string unused;
    s.mkl_threads_local =
        reinterpret_cast<set_threads_fn>(find_symbol("MKL_Set_Num_Threads_Local", unused));
    s.bf16 = reinterpret_cast<gemm16_fn>(find_symbol("cblas_gemm_bf16bf16f32", unused));
    s.f16 = reinterpret_cast<gemm16_fn>(find_symbol("cblas_gemm_f16f16f32", unused));
    return s;
  }();
  return syms;
}

bool fits_int(int64_t v) { return v <= static_cast<int64_t>(INT32_MAX); }

// Zero rows of C (or scale them) when k == 0: BLAS may reject k = 0 with beta semantics intact.
void scale_c(int64_t m, int64_t n, float beta, float* c, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    float* row = c + i * ldc;
    if (beta == 0.0f) {
      std::fill(row, row + n, 0.0f);
    } else if (beta != 1.0f) {
      for (int64_t j = 0; j < n; ++j) row[j] *= beta;
    }
  }
}

at::Tensor view(const void* p, bool trans, int64_t rows, int64_t cols, int64_t ld,
                at::ScalarType dtype) {
  // op(X) as a (rows x cols) strided view of the caller's memory (no copy).
  std::vector<int64_t> sizes{rows, cols};
  std::vector<int64_t> strides = trans ? std::vector<int64_t>{1, ld} : std::vector<int64_t>{ld, 1};
  return at::from_blob(const_cast<void*>(p), sizes, strides,
                       at::TensorOptions().dtype(dtype).device(at::kCPU));
}

void gemm_fallback(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const void* a,
                   int64_t lda, const void* b, int64_t ldb, float beta, float* c, int64_t ldc,
                   at::ScalarType dtype) {
  at::Tensor A = view(a, ta, m, k, lda, dtype).to(at::kFloat);
  at::Tensor B = view(b, tb, k, n, ldb, dtype).to(at::kFloat);
  at::Tensor C = view(c, false, m, n, ldc, at::kFloat);
  if (beta == 0.0f) C.zero_();  // addmm would propagate NaN garbage through 0 * C
  at::addmm_out(C, C, A, B, beta, alpha);
}

}  // namespace

BlasThreadGuard::BlasThreadGuard() : previous_(-1) {
  if (auto fn = symbols().mkl_threads_local) previous_ = fn(1);
}

BlasThreadGuard::~BlasThreadGuard() {
  if (auto fn = symbols().mkl_threads_local; fn != nullptr && previous_ >= 0) fn(previous_);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_c(m, n, beta, c, ldc);
  const auto& s = symbols();
  if (s.sgemm != nullptr && fits_int(std::max({m, n, k, lda, ldb, ldc}))) {
    // Column-major BLAS on row-major data: C^T = op(B)^T op(A)^T.
    const char transa = tb ? 'T' : 'N';
    const char transb = ta ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(std::max<int64_t>(ldb, tb ? k : n));
    const int LDB = static_cast<int>(std::max<int64_t>(lda, ta ? m : k));
    const int LDC = static_cast<int>(std::max<int64_t>(ldc, n));
    s.sgemm(&transa, &transb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
    return;
  }
  gemm_fallback(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, at::kFloat);
}

namespace {
template <typename T>
void gemm16(gemm16_fn fn, at::ScalarType dtype, bool ta, bool tb, int64_t m, int64_t n, int64_t k,
            float alpha, const T* a, int64_t lda, const T* b, int64_t ldb, float beta, float* c,
            int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) return scale_c(m, n, beta, c, ldc);
  if (fn != nullptr && fits_int(std::max({m, n, k, lda, ldb, ldc}))) {
    const int LDA = static_cast<int>(std::max<int64_t>(lda, ta ? m : k));
    const int LDB = static_cast<int>(std::max<int64_t>(ldb, tb ? k : n));
    const int LDC = static_cast<int>(std::max<int64_t>(ldc, n));
    fn(kCblasRowMajor, ta ? kCblasTrans : kCblasNoTrans, tb ? kCblasTrans : kCblasNoTrans,
       static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha,
       reinterpret_cast<const uint16_t*>(a), LDA, reinterpret_cast<const uint16_t*>(b), LDB, beta,
       c, LDC);
    return;
  }
  gemm_fallback(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, dtype);
}
}  // namespace

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::BFloat16* a,
          int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm16(symbols().bf16, at::kBFloat16, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const c10::Half* a,
          int64_t lda, const c10::Half* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm16(symbols().f16, at::kHalf, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

std::string gemm_provider() {
  const auto& s = symbols();
  std::string out = "f32: ";
  out += s.sgemm ? "sgemm_ (" + s.where + ")" : "at::addmm fallback";
  out += "; bf16: ";
  out += s.bf16 ? "cblas_gemm_bf16bf16f32" : "fp32 at::addmm fallback";
  out += "; f16: ";
  out += s.f16 ? "cblas_gemm_f16f16f32" : "fp32 at::addmm fallback";
  return out;
}

}  // namespace fastprompt::cpu
