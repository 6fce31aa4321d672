// Device helpers of the CUDA kernels: typed loads/stores in fp32 and warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "fastprompt/arith.h"
#include "params.h"

namespace fastprompt::cuda {

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

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// Butterfly sum: every lane ends with the same value, in an order fixed by the lane pattern
// (deterministic run to run).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

// Row r of matrix (i, h) of a View4, typed.
template <typename T>
__device__ __forceinline__ const T* row_ptr(const View4& v, int64_t i, int h, int64_t r) {
  return static_cast<const T*>(v.p) + i * v.si + h * v.sh + r * v.sr;
}

__device__ __forceinline__ int64_t set_of(const AttnParams& a, int b) {
  if (a.index == nullptr) return 0;
  const int64_t t = a.index[b];
  if (t < 0 || t >= a.T) __trap();  // an out-of-range set would read foreign memory
  return t;
}

__device__ __forceinline__ int length_of(const AttnParams& a, int64_t t) {
  if (a.lengths == nullptr) return a.P;
  const int64_t n = a.lengths[t];
  if (n < 0 || n > a.P) __trap();
  return static_cast<int>(n);
}

// Copies `rows` rows of d features (rows past `valid` as zeros) into shared memory as fp32,
// row stride ld (d + 1: lanes reading one column of different rows hit different banks).
template <typename T>
__device__ __forceinline__ void load_tile(float* dst, int ld, const T* src, int64_t src_ld,
                                          int rows, int valid, int d) {
  for (int e = threadIdx.x; e < rows * d; e += blockDim.x) {
    const int r = e / d, f = e - r * d;
    dst[r * ld + f] = r < valid ? to_f32(src[r * src_ld + f]) : 0.0f;
  }
}

}  // namespace fastprompt::cuda
