// Launcher interface of the CUDA kernels: plain structs of pointers, sizes and strides.
//
// dispatch.cpp (host compiler, torch headers) fills these from tensors; cascade_kernels.cu (nvcc,
// no torch headers, so it compiles fast and the ptxas report can build it alone) launches the
// kernels. Strides are in elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastprompt::cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// Element (i, j, k, l) of a 4-D view is at p + i*s0 + j*s1 + k*s2 + l*s3; p = null: absent.
struct View4 {
  const void* p;
  int64_t s0, s1, s2, s3;
};

struct View3 {
  const void* p;
  int64_t s0, s1, s2;
};

// Sets flag bit 1 if an index value lies outside [0, T), bit 2 if a length lies outside [0, P].
struct CheckSetsParams {
  const int64_t* index;  // (B,) or null
  int64_t B, T;
  const int64_t* lengths;  // (T,) or null
  int64_t P;
  int* flag;
};

// out = w_p o_p + w_i o_i and lse merged (fastprompt/arith.h), one row (b, h, n) of d features.
struct MergeParams {
  DType dtype;
  int vec;  // elements per load and store (launch::vector_elems)
  int64_t B, H, N, d;
  View4 o_p, o_i;       // (B, H, N, d), dtype; p = null for a part with no key
  View3 lse_p, lse_i;   // (B, H, N) fp32
  const int64_t* counts;  // (B,) valid prompt keys per sequence, or null (all)
  View4 out;            // (B, H, N, d), dtype, written
  float* lse;           // (B, H, N) contiguous, written
};

// out[t, h, i, j] = sum over m in [offsets[t], offsets[t + 1]) of src[order[m], h, i, j].
struct ReduceParams {
  DType dtype;
  int64_t T, H, P, d;
  View4 src;  // (B, H, P, d), dtype
  const int64_t* order;
  const int64_t* offsets;
  float* out;  // (T, H, P, d) contiguous fp32
};

// terms[s, b, i] = sum_{h, j} dk[b, h, i, j] uk[s, t_b, h, i, j] + dv uv, gate[b, i] =
// gate_mult * sum_h gate_src[b, h, i].
struct TermsParams {
  DType dtype;
  int64_t B, H, P, d, S, T;
  View4 dk, dv;     // (B, H, P, d), dtype
  View3 gate_src;   // (B, H, P), dtype
  float gate_mult;
  const float* uk;  // (S, T, H, P, d) contiguous fp32
  const float* uv;
  const int64_t* index;  // (B,) or null (set 0)
  float* terms;     // (S, B, P) contiguous
  float* gate;      // (B, P) contiguous
};

// Each launcher returns the launch's cudaError_t (cudaSuccess when nothing was launched).
cudaError_t launch_check_sets(const CheckSetsParams& p, cudaStream_t stream);
cudaError_t launch_merge(const MergeParams& p, cudaStream_t stream);
cudaError_t launch_reduce_sets(const ReduceParams& p, cudaStream_t stream);
cudaError_t launch_score_terms(const TermsParams& p, cudaStream_t stream);

}  // namespace fastprompt::cuda
