// Prompt Condensation's score reduction on CUDA.
//
// score_terms_kernel turns per-sequence prompt gradients (B, H, P, d) and per-head gate parts
// into terms (S, B, P) and gate (B, P); the fused backward feeds it directly. gate_kernel computes
// the gate parts for the standalone op from lse and delta, as the reference writes them:
// v_i . dV_i - sum_n P[n, i] delta_n. One writer per output and fixed-order sums: deterministic.
#include <cuda_runtime.h>

#include <algorithm>

#include "common.cuh"

namespace fastprompt::cuda {
namespace {

constexpr int kThreads = 128;
// Four resident blocks per SM: caps registers at 128 per thread (the budget the ptxas test
// enforces). Without a minimum, ptxas picked lower counts and spilled a few bytes.
constexpr int kMinBlocks = 4;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;
constexpr int kPerWarp = kTile / kWarps;

// One warp per (sequence, prompt): gate = sum over heads; terms[s] = sum over heads and features.
__global__ void __launch_bounds__(kThreads, kMinBlocks) score_terms_kernel(const TermsParams p) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (item >= static_cast<int64_t>(p.B) * p.P) return;
  const int b = static_cast<int>(item / p.P), i = static_cast<int>(item % p.P);
  const int64_t t = p.index == nullptr ? 0 : p.index[b];
  if (t < 0 || t >= p.T) __trap();
  if (lane == 0) {
    float g = 0.0f;
    for (int h = 0; h < p.H; ++h) g += p.gate_part[(static_cast<int64_t>(b) * p.H + h) * p.P + i];
    p.gate[item] = g;
  }
  for (int s = 0; s < p.S; ++s) {
    float acc = 0.0f;
    for (int h = 0; h < p.H; ++h) {
      const int64_t g0 = ((static_cast<int64_t>(b) * p.H + h) * p.P + i) * p.d;
      const int64_t u0 = (((static_cast<int64_t>(s) * p.T + t) * p.H + h) * p.P + i) * p.d;
      for (int c = lane; c < p.d; c += 32) {
        acc = score_term_fma(acc, p.dpk_seq[g0 + c], p.uk[u0 + c], p.dpv_seq[g0 + c], p.uv[u0 + c]);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) p.terms[static_cast<int64_t>(s) * p.B * p.P + item] = acc;
  }
}

// One block per (32 prompt keys, head, sequence); queries streamed in tiles of 32.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) gate_kernel(const GateParams p) {
  const AttnParams& a = p.a;
  extern __shared__ float smem[];
  const int ld = a.d + 1;
  float* ks = smem;
  float* qs = ks + kTile * ld;
  float* w_s = qs + kTile * ld;  // lse and delta of the query tile
  const int b = blockIdx.z, h = blockIdx.y, c0 = blockIdx.x * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = set_of(a, b);
  const int np = length_of(a, t);
  const int valid_keys = min(kTile, a.P - c0);
  const int prob_keys = min(kTile, np - c0);  // keys whose probabilities count (past: P = 0)
  load_tile<T>(ks, ld, row_ptr<T>(a.pk, t, h, c0), a.pk.sr, kTile, max(prob_keys, 0), a.d);
  const int64_t bh = static_cast<int64_t>(b) * a.H + h;
  float pdelta[kPerWarp];
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) pdelta[i] = 0.0f;
  for (int q0 = 0; q0 < a.Nq && prob_keys > 0; q0 += kTile) {
    const int rows = min(kTile, a.Nq - q0);
    __syncthreads();
    load_tile<T>(qs, ld, row_ptr<T>(a.q, b, h, q0), a.q.sr, kTile, rows, a.d);
    if (threadIdx.x < kTile) {
      const bool ok = static_cast<int>(threadIdx.x) < rows;
      w_s[threadIdx.x] = ok ? p.lse[bh * a.Nq + q0 + threadIdx.x] : neg_inf();
      w_s[kTile + threadIdx.x] = ok ? p.delta[bh * a.Nq + q0 + threadIdx.x] : 0.0f;
    }
    __syncthreads();
    const float* qrow = qs + lane * ld;
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      const int key = warp * kPerWarp + i;
      if (key >= prob_keys) continue;
      float s = 0.0f;
      for (int f = 0; f < a.d; ++f) s = fmaf(qrow[f], ks[key * ld + f], s);
      const float pr = prob_from_lse(s * a.scale, w_s[lane]);
      pdelta[i] += warp_sum(pr * w_s[kTile + lane]);
    }
  }
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) {
    const int key = warp * kPerWarp + i;
    if (key >= valid_keys) continue;
    const T* vrow = row_ptr<T>(a.pv, t, h, c0 + key);
    const float* gv = p.dpv_seq + (bh * a.P + c0 + key) * a.d;
    float dot = 0.0f;
    for (int c = lane; c < a.d; c += 32) dot = fmaf(to_f32(vrow[c]), gv[c], dot);
    dot = warp_sum(dot);
    if (lane == 0) p.gate_part[bh * a.P + c0 + key] = gate_from_parts(dot, pdelta[i]);
  }
}

}  // namespace

cudaError_t launch_score_terms(const TermsParams& p, cudaStream_t stream) {
  const int64_t items = static_cast<int64_t>(p.B) * p.P;
  if (items == 0) return cudaSuccess;
  score_terms_kernel<<<static_cast<unsigned>((items + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
      p);
  return cudaGetLastError();
}

cudaError_t launch_prompt_gate(const GateParams& p, cudaStream_t stream) {
  const AttnParams& a = p.a;
  if (a.d < 1 || static_cast<int64_t>(a.B) * a.H * a.P == 0) return cudaSuccess;
  const dim3 grid((a.P + kTile - 1) / kTile, a.H, a.B);
  const size_t smem = (2 * static_cast<size_t>(kTile) * (a.d + 1) + 2 * kTile) * sizeof(float);
  auto launch = [&](auto kernel) -> cudaError_t {
    if (smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    kernel<<<grid, kThreads, smem, stream>>>(p);
    return cudaGetLastError();
  };
  switch (a.dtype) {
    case DType::f32:
      return launch(gate_kernel<float>);
    case DType::f16:
      return launch(gate_kernel<__half>);
    case DType::bf16:
      return launch(gate_kernel<__nv_bfloat16>);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastprompt::cuda
