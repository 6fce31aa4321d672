// Prompt attention on CUDA: forward, and backward (dq; dk/dv with per-sequence prompt gradients
// and the gate; per-set reduction).
//
// Plain SIMT kernels with fp32 accumulation, written for exactness and a small register
// footprint rather than peak speed (the Triton backend is the fast path on GPUs). A block has 4
// warps; tiles of 32 rows are staged in shared memory as fp32 with row stride d + 1 so that lanes
// reading one column of different rows hit different banks. Lane j of a warp owns key (or query)
// j of the current tile, and feature f * 32 + lane of every accumulator row. Keys are the
// sequence's prompt set (read through prompt_index, cut to prompt_lengths, never copied) and then
// its own keys; the online softmax and the -inf cases come from fastprompt/arith.h, shared with
// the CPU kernels. Nothing uses atomics: each per-sequence prompt gradient has one writer and the
// per-set sums run over sequences in order, so the backward is deterministic.
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
constexpr int kTile = 32;                 // rows of a shared-memory tile (queries or keys)
constexpr int kPerWarp = kTile / kWarps;  // rows each warp owns within a tile

__device__ __forceinline__ float dot_smem(const float* a, const float* b, int d) {
  float s = 0.0f;
  for (int f = 0; f < d; ++f) s = fmaf(a[f], b[f], s);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Forward: one block per (32 queries, head, sequence).
// ---------------------------------------------------------------------------------------------
template <typename T, int FPL>
__global__ void __launch_bounds__(kThreads, kMinBlocks) fwd_kernel(const FwdParams p) {
  const AttnParams& a = p.a;
  extern __shared__ float smem[];
  const int ld = a.d + 1;
  float* qs = smem;
  float* ks = qs + kTile * ld;
  float* vs = ks + kTile * ld;
  const int b = blockIdx.z, h = blockIdx.y, r0 = blockIdx.x * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = set_of(a, b);
  const int np = length_of(a, t);
  load_tile<T>(qs, ld, row_ptr<T>(a.q, b, h, r0), a.q.sr, kTile, min(kTile, a.Nq - r0), a.d);

  float acc[kPerWarp][FPL];
  RowState st[kPerWarp];
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) {
    st[i] = row_init();
#pragma unroll
    for (int f = 0; f < FPL; ++f) acc[i][f] = 0.0f;
  }
  for (int seg = 0; seg < 2; ++seg) {
    // By value: a reference chosen at run time between two kernel parameters would make the
    // compiler copy the parameter block to local memory.
    const View4 K = seg == 0 ? a.pk : a.k;
    const View4 V = seg == 0 ? a.pv : a.v;
    const int64_t owner = seg == 0 ? t : b;
    const int n = seg == 0 ? np : a.Nk;
    for (int c0 = 0; c0 < n; c0 += kTile) {
      const int valid = min(kTile, n - c0);
      __syncthreads();  // the previous tile is consumed
      load_tile<T>(ks, ld, row_ptr<T>(K, owner, h, c0), K.sr, kTile, valid, a.d);
      load_tile<T>(vs, ld, row_ptr<T>(V, owner, h, c0), V.sr, kTile, valid, a.d);
      __syncthreads();
      const float* krow = ks + lane * ld;
#pragma unroll
      for (int i = 0; i < kPerWarp; ++i) {
        const float* qrow = qs + (warp * kPerWarp + i) * ld;
        const float s = lane < valid ? dot_smem(qrow, krow, a.d) * a.scale : neg_inf();
        const float alpha = row_rescale(st[i], warp_max(s));
        const float pr = fp_exp(s - safe_max(st[i].m));
        row_add(st[i], warp_sum(pr));
#pragma unroll
        for (int f = 0; f < FPL; ++f) acc[i][f] *= alpha;
        for (int j = 0; j < valid; ++j) {
          const float pj = __shfl_sync(kFullMask, pr, j);
#pragma unroll
          for (int f = 0; f < FPL; ++f) {
            const int c = f * 32 + lane;
            if (c < a.d) acc[i][f] = fmaf(pj, vs[j * ld + c], acc[i][f]);
          }
        }
      }
    }
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) {
    const int row = r0 + warp * kPerWarp + i;
    if (row >= a.Nq) continue;
    const float sc = row_out_scale(st[i]);
    T* orow = out + ((static_cast<int64_t>(b) * a.Nq + row) * a.H + h) * a.d;
#pragma unroll
    for (int f = 0; f < FPL; ++f) {
      const int c = f * 32 + lane;
      if (c < a.d) orow[c] = from_f32<T>(acc[i][f] * sc);
    }
    if (lane == 0) p.lse[(static_cast<int64_t>(b) * a.H + h) * a.Nq + row] = row_lse(st[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// delta[b, h, n] = sum_f dout * out: one warp per query row.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks) delta_kernel(const BwdParams p) {
  const AttnParams& a = p.a;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(a.B) * a.H * a.Nq) return;
  const int n = static_cast<int>(row % a.Nq);
  const int h = static_cast<int>((row / a.Nq) % a.H);
  const int b = static_cast<int>(row / (static_cast<int64_t>(a.Nq) * a.H));
  const T* dorow = row_ptr<T>(p.dout, b, h, n);
  const T* orow = row_ptr<T>(p.out, b, h, n);
  float s = 0.0f;
  for (int c = lane; c < a.d; c += 32) s = fmaf(to_f32(dorow[c]), to_f32(orow[c]), s);
  s = warp_sum(s);
  if (lane == 0) p.delta[row] = s;
}

// dq: one block per (32 queries, head, sequence), keys streamed as in the forward.
template <typename T, int FPL>
__global__ void __launch_bounds__(kThreads, kMinBlocks) dq_kernel(const BwdParams p) {
  const AttnParams& a = p.a;
  extern __shared__ float smem[];
  const int ld = a.d + 1;
  float* qs = smem;
  float* dos = qs + kTile * ld;
  float* ks = dos + kTile * ld;
  float* vs = ks + kTile * ld;
  const int b = blockIdx.z, h = blockIdx.y, r0 = blockIdx.x * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = set_of(a, b);
  const int np = length_of(a, t);
  const int rows = min(kTile, a.Nq - r0);
  load_tile<T>(qs, ld, row_ptr<T>(a.q, b, h, r0), a.q.sr, kTile, rows, a.d);
  load_tile<T>(dos, ld, row_ptr<T>(p.dout, b, h, r0), p.dout.sr, kTile, rows, a.d);

  float dq[kPerWarp][FPL], lse[kPerWarp], delta[kPerWarp];
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) {
    const int row = r0 + warp * kPerWarp + i;
    const int64_t at = (static_cast<int64_t>(b) * a.H + h) * a.Nq + row;
    lse[i] = row < a.Nq ? p.lse[at] : neg_inf();  // -inf: a padding row gets P = 0
    delta[i] = row < a.Nq ? p.delta[at] : 0.0f;
#pragma unroll
    for (int f = 0; f < FPL; ++f) dq[i][f] = 0.0f;
  }
  for (int seg = 0; seg < 2; ++seg) {
    // By value: a reference chosen at run time between two kernel parameters would make the
    // compiler copy the parameter block to local memory.
    const View4 K = seg == 0 ? a.pk : a.k;
    const View4 V = seg == 0 ? a.pv : a.v;
    const int64_t owner = seg == 0 ? t : b;
    const int n = seg == 0 ? np : a.Nk;
    for (int c0 = 0; c0 < n; c0 += kTile) {
      const int valid = min(kTile, n - c0);
      __syncthreads();
      load_tile<T>(ks, ld, row_ptr<T>(K, owner, h, c0), K.sr, kTile, valid, a.d);
      load_tile<T>(vs, ld, row_ptr<T>(V, owner, h, c0), V.sr, kTile, valid, a.d);
      __syncthreads();
      const float* krow = ks + lane * ld;
      const float* vrow = vs + lane * ld;
#pragma unroll
      for (int i = 0; i < kPerWarp; ++i) {
        const float* qrow = qs + (warp * kPerWarp + i) * ld;
        const float* dorow = dos + (warp * kPerWarp + i) * ld;
        float ds = 0.0f;
        if (lane < valid) {
          const float pr = prob_from_lse(dot_smem(qrow, krow, a.d) * a.scale, lse[i]);
          ds = dscore(pr, dot_smem(dorow, vrow, a.d), delta[i]);
        }
        for (int j = 0; j < valid; ++j) {
          const float dsj = __shfl_sync(kFullMask, ds, j);
#pragma unroll
          for (int f = 0; f < FPL; ++f) {
            const int c = f * 32 + lane;
            if (c < a.d) dq[i][f] = fmaf(dsj, ks[j * ld + c], dq[i][f]);
          }
        }
      }
    }
  }
  T* out = static_cast<T*>(p.dq);
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) {
    const int row = r0 + warp * kPerWarp + i;
    if (row >= a.Nq) continue;
    T* drow = out + ((static_cast<int64_t>(b) * a.H + h) * a.Nq + row) * a.d;
#pragma unroll
    for (int f = 0; f < FPL; ++f) {
      const int c = f * 32 + lane;
      if (c < a.d) drow[c] = from_f32<T>(dq[i][f] * a.scale);
    }
  }
}

// dk, dv (image keys) or the per-sequence prompt-key gradients and gate parts (prompt keys):
// one block per (32 keys of one segment, head, sequence), queries streamed in tiles. Blocks
// [0, prompt_blocks) take prompt keys, the rest image keys.
template <typename T, int FPL>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    dkv_kernel(const BwdParams p, int prompt_blocks) {
  const AttnParams& a = p.a;
  extern __shared__ float smem[];
  const int ld = a.d + 1;
  float* ks = smem;
  float* vs = ks + kTile * ld;
  float* qs = vs + kTile * ld;
  float* dos = qs + kTile * ld;
  float* lse_s = dos + kTile * ld;
  float* delta_s = lse_s + kTile;
  const int b = blockIdx.z, h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = set_of(a, b);
  const bool prompt = static_cast<int>(blockIdx.x) < prompt_blocks;
  const int c0 = (prompt ? blockIdx.x : blockIdx.x - prompt_blocks) * kTile;
  const int n = prompt ? length_of(a, t) : a.Nk;
  const int valid_keys = min(kTile, n - c0);
  if (valid_keys <= 0) return;  // prompt keys past the set's length: gradients stay zero
  const View4 K = prompt ? a.pk : a.k;
  const View4 V = prompt ? a.pv : a.v;
  const int64_t owner = prompt ? t : b;
  load_tile<T>(ks, ld, row_ptr<T>(K, owner, h, c0), K.sr, kTile, valid_keys, a.d);
  load_tile<T>(vs, ld, row_ptr<T>(V, owner, h, c0), V.sr, kTile, valid_keys, a.d);

  float dk[kPerWarp][FPL], dv[kPerWarp][FPL], gate[kPerWarp];
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) {
    gate[i] = 0.0f;
#pragma unroll
    for (int f = 0; f < FPL; ++f) dk[i][f] = dv[i][f] = 0.0f;
  }
  const int64_t bh = static_cast<int64_t>(b) * a.H + h;
  for (int q0 = 0; q0 < a.Nq; q0 += kTile) {
    const int rows = min(kTile, a.Nq - q0);
    __syncthreads();
    load_tile<T>(qs, ld, row_ptr<T>(a.q, b, h, q0), a.q.sr, kTile, rows, a.d);
    load_tile<T>(dos, ld, row_ptr<T>(p.dout, b, h, q0), p.dout.sr, kTile, rows, a.d);
    if (threadIdx.x < kTile) {
      const bool ok = static_cast<int>(threadIdx.x) < rows;
      lse_s[threadIdx.x] = ok ? p.lse[bh * a.Nq + q0 + threadIdx.x] : neg_inf();
      delta_s[threadIdx.x] = ok ? p.delta[bh * a.Nq + q0 + threadIdx.x] : 0.0f;
    }
    __syncthreads();
    const float* qrow = qs + lane * ld;  // lane <-> query
    const float* dorow = dos + lane * ld;
#pragma unroll
    for (int i = 0; i < kPerWarp; ++i) {
      const int key = warp * kPerWarp + i;
      if (key >= valid_keys) continue;  // warp-uniform
      const float pr = prob_from_lse(dot_smem(qrow, ks + key * ld, a.d) * a.scale, lse_s[lane]);
      const float ds = dscore(pr, dot_smem(dorow, vs + key * ld, a.d), delta_s[lane]);
      gate[i] += warp_sum(ds);
      for (int j = 0; j < rows; ++j) {
        const float pj = __shfl_sync(kFullMask, pr, j);
        const float dsj = __shfl_sync(kFullMask, ds, j);
#pragma unroll
        for (int f = 0; f < FPL; ++f) {
          const int c = f * 32 + lane;
          if (c < a.d) {
            dv[i][f] = fmaf(pj, dos[j * ld + c], dv[i][f]);
            dk[i][f] = fmaf(dsj, qs[j * ld + c], dk[i][f]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kPerWarp; ++i) {
    const int key = warp * kPerWarp + i;
    if (key >= valid_keys) continue;
    if (prompt) {
      const int64_t at = (bh * a.P + c0 + key) * a.d;
#pragma unroll
      for (int f = 0; f < FPL; ++f) {
        const int c = f * 32 + lane;
        if (c < a.d) {
          p.dpk_seq[at + c] = dk[i][f] * a.scale;
          p.dpv_seq[at + c] = dv[i][f];
        }
      }
      if (lane == 0) p.gate_part[bh * a.P + c0 + key] = gate[i];
    } else {
      const int64_t at = (bh * a.Nk + c0 + key) * a.d;
      T* dkp = static_cast<T*>(p.dk);
      T* dvp = static_cast<T*>(p.dv);
#pragma unroll
      for (int f = 0; f < FPL; ++f) {
        const int c = f * 32 + lane;
        if (c < a.d) {
          dkp[at + c] = from_f32<T>(dk[i][f] * a.scale);
          dvp[at + c] = from_f32<T>(dv[i][f]);
        }
      }
    }
  }
}

// dprompt[t] = sum over sequences b of set t, in increasing b, of the per-sequence gradients.
__global__ void __launch_bounds__(256, 1) reduce_sets_kernel(const BwdParams p) {
  const AttnParams& a = p.a;
  const int64_t per_set = static_cast<int64_t>(a.H) * a.P * a.d;
  const int64_t total = a.T * per_set;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / per_set, rest = e - t * per_set;
    float sk = 0.0f, sv = 0.0f;
    for (int b = 0; b < a.B; ++b) {
      if (set_of(a, b) != t) continue;
      sk += p.dpk_seq[b * per_set + rest];
      sv += p.dpv_seq[b * per_set + rest];
    }
    p.dpk[e] = sk;
    p.dpv[e] = sv;
  }
}

// ---------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

size_t tile_bytes(int tiles, int d, int extra_floats = 0) {
  return (static_cast<size_t>(tiles) * kTile * (d + 1) + extra_floats) * sizeof(float);
}

template <typename T, int FPL>
cudaError_t fwd(const FwdParams& p, cudaStream_t stream) {
  const AttnParams& a = p.a;
  const dim3 grid((a.Nq + kTile - 1) / kTile, a.H, a.B);
  const size_t smem = tile_bytes(3, a.d);
  if (cudaError_t e = allow_smem(fwd_kernel<T, FPL>, smem); e != cudaSuccess) return e;
  fwd_kernel<T, FPL><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int FPL>
cudaError_t bwd(const BwdParams& p, cudaStream_t stream) {
  const AttnParams& a = p.a;
  const int64_t rows = static_cast<int64_t>(a.B) * a.H * a.Nq;
  if (rows > 0) {
    delta_kernel<T>
        <<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
    const dim3 grid((a.Nq + kTile - 1) / kTile, a.H, a.B);
    const size_t smem = tile_bytes(4, a.d);
    if (cudaError_t e = allow_smem(dq_kernel<T, FPL>, smem); e != cudaSuccess) return e;
    dq_kernel<T, FPL><<<grid, kThreads, smem, stream>>>(p);
  }
  const int prompt_blocks = (a.P + kTile - 1) / kTile;
  const int image_blocks = (a.Nk + kTile - 1) / kTile;
  if (prompt_blocks + image_blocks > 0) {
    const dim3 grid(prompt_blocks + image_blocks, a.H, a.B);
    const size_t smem = tile_bytes(4, a.d, 2 * kTile);
    if (cudaError_t e = allow_smem(dkv_kernel<T, FPL>, smem); e != cudaSuccess) return e;
    dkv_kernel<T, FPL><<<grid, kThreads, smem, stream>>>(p, prompt_blocks);
  }
  const int64_t total = static_cast<int64_t>(a.T) * a.H * a.P * a.d;
  if (total > 0) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 4096));
    reduce_sets_kernel<<<blocks, 256, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

// Instantiations: dtype x features per lane (head dims up to 32, 64, 96, 128).
#define FP_CUDA_DISPATCH(DTYPE, D, FN, ...)                    \
  [&]() -> cudaError_t {                                       \
    const int fpl = ((D) + 31) / 32;                           \
    switch (DTYPE) {                                           \
      case DType::f32:                                         \
        return fpl <= 1   ? FN<float, 1>(__VA_ARGS__)          \
               : fpl == 2 ? FN<float, 2>(__VA_ARGS__)          \
               : fpl == 3 ? FN<float, 3>(__VA_ARGS__)          \
                          : FN<float, 4>(__VA_ARGS__);         \
      case DType::f16:                                         \
        return fpl <= 1   ? FN<__half, 1>(__VA_ARGS__)         \
               : fpl == 2 ? FN<__half, 2>(__VA_ARGS__)         \
               : fpl == 3 ? FN<__half, 3>(__VA_ARGS__)         \
                          : FN<__half, 4>(__VA_ARGS__);        \
      case DType::bf16:                                        \
        return fpl <= 1   ? FN<__nv_bfloat16, 1>(__VA_ARGS__)  \
               : fpl == 2 ? FN<__nv_bfloat16, 2>(__VA_ARGS__)  \
               : fpl == 3 ? FN<__nv_bfloat16, 3>(__VA_ARGS__)  \
                          : FN<__nv_bfloat16, 4>(__VA_ARGS__); \
    }                                                          \
    return cudaErrorInvalidValue;                              \
  }()

}  // namespace

cudaError_t launch_prompt_attention_fwd(const FwdParams& p, cudaStream_t stream) {
  const AttnParams& a = p.a;
  if (a.d < 1 || a.d > 128) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(a.B) * a.H * a.Nq == 0) return cudaSuccess;
  return FP_CUDA_DISPATCH(a.dtype, a.d, fwd, p, stream);
}

cudaError_t launch_prompt_attention_bwd(const BwdParams& p, cudaStream_t stream) {
  const AttnParams& a = p.a;
  if (a.d < 1 || a.d > 128) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(a.B) * a.H == 0) return cudaSuccess;
  return FP_CUDA_DISPATCH(a.dtype, a.d, bwd, p, stream);
}

}  // namespace fastprompt::cuda
