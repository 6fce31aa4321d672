// Pruned-prompt packing on CUDA: row copies by index (gather into the packed table, or scatter
// its gradient back into the kept rows). The kept-row list comes from the mask on the host side
// (dispatch.cpp); each destination row has exactly one writer.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "params.h"

namespace fastprompt::cuda {
namespace {

template <typename W>
__global__ void __launch_bounds__(256, 1)
    copy_rows_kernel(const W* src, W* dst, const int64_t* rows, int64_t n_rows, int64_t words,
                     bool scatter) {
  const int64_t total = n_rows * words;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e / words, w = e - j * words;
    const int64_t from = scatter ? j : rows[j], to = scatter ? rows[j] : j;
    dst[to * words + w] = src[from * words + w];
  }
}

template <typename W>
cudaError_t launch(const void* src, void* dst, const int64_t* rows, int64_t n_rows,
                   int64_t row_bytes, bool scatter, cudaStream_t stream) {
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(W));
  const int64_t total = n_rows * words;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 65535));
  copy_rows_kernel<W><<<blocks, 256, 0, stream>>>(static_cast<const W*>(src), static_cast<W*>(dst),
                                                  rows, n_rows, words, scatter);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_copy_rows(const void* src, void* dst, const int64_t* rows, int64_t n_rows,
                             int64_t row_bytes, bool scatter, cudaStream_t stream) {
  if (n_rows == 0 || row_bytes == 0) return cudaSuccess;
  // The widest word that divides the row keeps the copy coalesced.
  if (row_bytes % 16 == 0) return launch<uint4>(src, dst, rows, n_rows, row_bytes, scatter, stream);
  if (row_bytes % 8 == 0) return launch<uint2>(src, dst, rows, n_rows, row_bytes, scatter, stream);
  if (row_bytes % 4 == 0)
    return launch<uint32_t>(src, dst, rows, n_rows, row_bytes, scatter, stream);
  if (row_bytes % 2 == 0)
    return launch<uint16_t>(src, dst, rows, n_rows, row_bytes, scatter, stream);
  return launch<uint8_t>(src, dst, rows, n_rows, row_bytes, scatter, stream);
}

}  // namespace fastprompt::cuda
