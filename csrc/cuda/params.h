// Launcher interface of the CUDA kernels: plain structs of pointers, sizes and strides.
//
// dispatch.cpp (host compiler, torch headers) fills these from tensors; the .cu files (nvcc, no
// torch headers, so they compile fast and the ptxas report can build them alone) launch the
// kernels. Strides are in elements; every matrix has unit stride along its last dimension.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastprompt::cuda {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// A (batch-or-set, head, row, feature) view: element (i, h, r, f) is at p + i*si + h*sh + r*sr + f.
struct View4 {
  const void* p;
  int64_t si, sh, sr;
};

struct AttnParams {
  DType dtype;
  int B, H, Nq, Nk, d, T, P;
  View4 q, k, v, pk, pv;
  const int64_t* index;    // (B,) set of each sequence, or null (set 0)
  const int64_t* lengths;  // (T,) valid keys per set, or null (P)
  float scale;
};

struct FwdParams {
  AttnParams a;
  void* out;   // (B, Nq, H, d) contiguous, dtype
  float* lse;  // (B, H, Nq)
};

struct BwdParams {
  AttnParams a;
  View4 dout, out;
  const float* lse;  // (B, H, Nq) contiguous
  float* delta;      // (B, H, Nq) scratch: sum(dout * out)
  void* dq;          // (B, H, Nq, d) contiguous, dtype
  void* dk;          // (B, H, Nk, d) contiguous, dtype
  void* dv;
  float* dpk_seq;  // (B, H, P, d) per-sequence prompt gradients
  float* dpv_seq;
  float* gate_part;  // (B, H, P): sum over queries of dS, per head
  float* dpk;        // (T, H, P, d) per-set sums
  float* dpv;
};

// Standalone score reduction: gate_part[b, h, i] = v_i . dV_i - sum_n P[n, i] delta_n.
struct GateParams {
  AttnParams a;
  const float* lse;      // (B, H, Nq)
  const float* delta;    // (B, H, Nq)
  const float* dpv_seq;  // (B, H, P, d)
  float* gate_part;      // (B, H, P)
};

// terms (S, B, P) and gate (B, P) from per-sequence gradients and per-head gate parts.
struct TermsParams {
  int S, B, T, H, P, d;
  const int64_t* index;
  const float* dpk_seq;  // (B, H, P, d)
  const float* dpv_seq;
  const float* gate_part;  // (B, H, P)
  const float* uk;         // (S, T, H, P, d) contiguous fp32
  const float* uv;
  float* terms;
  float* gate;
};

// Each launcher returns the launch's cudaError_t (cudaSuccess when nothing was launched).
cudaError_t launch_prompt_attention_fwd(const FwdParams& p, cudaStream_t stream);
cudaError_t launch_prompt_attention_bwd(const BwdParams& p, cudaStream_t stream);
cudaError_t launch_prompt_gate(const GateParams& p, cudaStream_t stream);
cudaError_t launch_score_terms(const TermsParams& p, cudaStream_t stream);
// dst row j <- src row rows[j] (gather), or dst row rows[j] <- src row j (scatter).
cudaError_t launch_copy_rows(const void* src, void* dst, const int64_t* rows, int64_t n_rows,
                             int64_t row_bytes, bool scatter, cudaStream_t stream);

}  // namespace fastprompt::cuda
