// The cascade's small CUDA kernels (csrc/cascade/kernels.h): set checks, the log-sum-exp merge,
// the per-set reduction and the score epilogue. The heavy parts of the cascade run on PyTorch's
// fused attention kernels; these are memory-bound passes that replace several PyTorch
// elementwise launches (the merge reads each partial output once and writes the (B, N, H, d)
// output directly) or that PyTorch has no op for (the epilogue).
//
// Each is a grid-stride loop on grid axis x (fastprompt/launch.h), so no dimension of the
// problem meets the 65,535-block limit of axes y and z. Per-element arithmetic comes from
// fastprompt/arith.h, which the CPU twins (csrc/cpu/cascade_kernels.cpp) share. No atomics touch
// floating-point results: every output element has one writer and sums run in a fixed order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fastprompt/arith.h"
#include "fastprompt/launch.h"
#include "params.h"

namespace fastprompt::cuda {
namespace {

constexpr int kThreads = launch::kThreads;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Butterfly sum: every lane ends with the same value, in an order fixed by the lane pattern.
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

template <typename T>
__device__ __forceinline__ const T* at4(const View4& v, int64_t i, int64_t j, int64_t k) {
  return static_cast<const T*>(v.p) + i * v.s0 + j * v.s1 + k * v.s2;
}

template <typename T>
__device__ __forceinline__ const T* at3(const View3& v, int64_t i, int64_t j) {
  return static_cast<const T*>(v.p) + i * v.s0 + j * v.s1;
}

__device__ __forceinline__ int64_t first_item() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t item_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// VEC elements moved as one aligned word (the launcher checked the alignment).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// ---------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) check_sets_kernel(const CheckSetsParams p) {
  int bad = 0;
  for (int64_t i = first_item(); i < p.B; i += item_stride()) {
    if (p.index != nullptr && !set_index_ok(p.index[i], p.T)) bad |= 1;
  }
  for (int64_t t = first_item(); t < p.T; t += item_stride()) {
    if (p.lengths != nullptr && !set_length_ok(p.lengths[t], p.P)) bad |= 2;
  }
  if (bad != 0) atomicOr(p.flag, bad);  // an integer flag: the order of the ORs is immaterial
}

// One item: VEC features of one query row (b, h, n).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) merge_kernel(const MergeParams p) {
  const int64_t chunks = p.d / VEC;
  const int64_t total = p.B * p.H * p.N * chunks;
  for (int64_t e = first_item(); e < total; e += item_stride()) {
    const int64_t row = e / chunks, c = (e - row * chunks) * VEC;
    const int64_t n = row % p.N, h = (row / p.N) % p.H, b = row / (p.N * p.H);
    const bool use_p = p.o_p.p != nullptr && (p.counts == nullptr || p.counts[b] > 0);
    const bool use_i = p.o_i.p != nullptr;
    const float lp = use_p ? at3<float>(p.lse_p, b, h)[n * p.lse_p.s2] : neg_inf();
    const float li = use_i ? at3<float>(p.lse_i, b, h)[n * p.lse_i.s2] : neg_inf();
    const Merge w = merge_rows(lp, li);
    Pack<T, VEC> op{}, oi{}, o;
    if (w.wp > 0.0f) {
      const T* src = at4<T>(p.o_p, b, h, n) + c * p.o_p.s3;
      if constexpr (VEC > 1) {
        op = *reinterpret_cast<const Pack<T, VEC>*>(src);
      } else {
        op.v[0] = src[0];
      }
    }
    if (w.wi > 0.0f) {
      const T* src = at4<T>(p.o_i, b, h, n) + c * p.o_i.s3;
      if constexpr (VEC > 1) {
        oi = *reinterpret_cast<const Pack<T, VEC>*>(src);
      } else {
        oi.v[0] = src[0];
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float vp = w.wp > 0.0f ? to_f32(op.v[j]) : 0.0f;
      const float vi = w.wi > 0.0f ? to_f32(oi.v[j]) : 0.0f;
      o.v[j] = from_f32<T>(merge_value(w, vp, vi));
    }
    T* dst = const_cast<T*>(at4<T>(p.out, b, h, n)) + c * p.out.s3;
    if constexpr (VEC > 1) {
      *reinterpret_cast<Pack<T, VEC>*>(dst) = o;
    } else {
      dst[0] = o.v[0];
    }
    if (c == 0) p.lse[row] = w.lse;
  }
}

// One item: one element (t, h, i, j) of the per-set sums; consecutive items are consecutive
// features, so the reads of each member row are coalesced. Members in increasing sequence order.
template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_sets_kernel(const ReduceParams p) {
  const int64_t total = p.T * p.H * p.P * p.d;
  for (int64_t e = first_item(); e < total; e += item_stride()) {
    const int64_t j = e % p.d, i = (e / p.d) % p.P, h = (e / (p.d * p.P)) % p.H;
    const int64_t t = e / (p.d * p.P * p.H);
    float acc = 0.0f;
    for (int64_t m = p.offsets[t]; m < p.offsets[t + 1]; ++m) {
      acc += to_f32(at4<T>(p.src, p.order[m], h, i)[j * p.src.s3]);
    }
    p.out[e] = acc;
  }
}

// One warp per (sequence, prompt): lanes stride over features, then a butterfly sum.
template <typename T>
__global__ void __launch_bounds__(kThreads) score_terms_kernel(const TermsParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = item_stride() / 32;
  for (int64_t w = first_item() / 32; w < p.B * p.P; w += warps) {
    const int64_t b = w / p.P, i = w % p.P, t = p.index == nullptr ? 0 : p.index[b];
    float g = 0.0f;
    for (int64_t h = lane; h < p.H; h += 32) {
      g += to_f32(at3<T>(p.gate_src, b, h)[i * p.gate_src.s2]);
    }
    g = warp_sum(g);
    if (lane == 0) p.gate[w] = g * p.gate_mult;
    const int d = static_cast<int>(p.d);  // at most 256
    const int64_t u_set = ((t * p.H) * p.P + i) * p.d, u_head = p.P * p.d;
    for (int64_t s = 0; s < p.S; ++s) {
      const float* uk = p.uk + s * p.T * p.H * u_head + u_set;
      const float* uv = p.uv + s * p.T * p.H * u_head + u_set;
      float acc = 0.0f;
#pragma unroll 1
      for (int64_t h = 0; h < p.H; ++h, uk += u_head, uv += u_head) {
        const T* k = at4<T>(p.dk, b, h, i);
        const T* v = at4<T>(p.dv, b, h, i);
        for (int j = lane; j < d; j += 32) {
          acc = score_term_fma(acc, to_f32(k[j * p.dk.s3]), uk[j], to_f32(v[j * p.dv.s3]), uv[j]);
        }
      }
      acc = warp_sum(acc);
      if (lane == 0) p.terms[(s * p.B + b) * p.P + i] = acc;
    }
  }
}

// Calls fn with a value of the element type of `dtype`.
template <typename Fn>
cudaError_t with_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32:
      return fn(float{});
    case DType::f16:
      return fn(__half{});
    case DType::bf16:
      return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_check_sets(const CheckSetsParams& p, cudaStream_t stream) {
  const int64_t work = p.B > p.T ? p.B : p.T;
  if (work == 0) return cudaSuccess;
  check_sets_kernel<<<launch::blocks_for(work), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_merge(const MergeParams& p, cudaStream_t stream) {
  const int64_t rows = p.B * p.H * p.N;
  if (rows == 0 || p.d == 0) return cudaSuccess;
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int kWide = 16 / sizeof(T);
    if (p.vec == kWide) {
      merge_kernel<T, kWide><<<launch::blocks_for(rows * p.d / kWide), kThreads, 0, stream>>>(p);
    } else {
      merge_kernel<T, 1><<<launch::blocks_for(rows * p.d), kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_reduce_sets(const ReduceParams& p, cudaStream_t stream) {
  const int64_t total = p.T * p.H * p.P * p.d;
  if (total == 0) return cudaSuccess;
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    reduce_sets_kernel<T><<<launch::blocks_for(total), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch_score_terms(const TermsParams& p, cudaStream_t stream) {
  const int64_t pairs = p.B * p.P;
  if (pairs == 0) return cudaSuccess;
  return with_type(p.dtype, [&](auto zero) {
    using T = decltype(zero);
    score_terms_kernel<T><<<launch::blocks_for(pairs, kThreads / 32), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace fastprompt::cuda
