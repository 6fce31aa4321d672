// Single-threaded GEMM on raw pointers for the CPU kernels (called inside at::parallel_for).
//
// Row-major: C[m x n] = alpha * op(A) * op(B) + beta * C, op(A) is m x k (A stored k x m when
// trans_a), op(B) is k x n (B stored n x k when trans_b). Low-precision inputs accumulate and
// write fp32.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>

namespace fastprompt::cpu {

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta,
          float* c, int64_t ldc);

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const c10::Half* a, int64_t lda, const c10::Half* b, int64_t ldb, float beta, float* c,
          int64_t ldc);

// Keeps the BLAS single-threaded on this thread while alive. The kernels call the BLAS from inside
// at::parallel_for; MKL built against another OpenMP runtime than torch's does not see that
// parallel region and would start its own threads on top of ours.
class BlasThreadGuard {
 public:
  BlasThreadGuard();
  ~BlasThreadGuard();
  BlasThreadGuard(const BlasThreadGuard&) = delete;
  BlasThreadGuard& operator=(const BlasThreadGuard&) = delete;

 private:
  int previous_;
};

// Which implementation serves each dtype, e.g. "f32: sgemm_ (libtorch_cpu); bf16: ...".
std::string gemm_provider();

}  // namespace fastprompt::cpu
