// Launch decisions of the CUDA kernels, on the host: plain C++ (no CUDA, no torch headers), so a
// test compiles and runs it on any machine.
//
// Every kernel is a grid-stride loop over a flat count of items on grid axis x, which takes
// 2^31 - 1 blocks (axes y and z stop at 65,535: a batch dimension there fails to launch past
// that). Vector loads are chosen from what the memory really allows: the base pointer's
// alignment and every row stride, not only the row length.
#pragma once

#include <cstdint>

namespace fastprompt::launch {

constexpr int kThreads = 256;
// Enough blocks to fill any current GPU several times over; beyond it each thread loops.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// Blocks on grid axis x for `work` items handled `per_block` at a time by a grid-stride loop
// (at least 1, so that a launch is always valid).
inline unsigned blocks_for(int64_t work, int64_t per_block = kThreads) {
  int64_t blocks = per_block > 0 ? (work + per_block - 1) / per_block : 1;
  if (blocks < 1) blocks = 1;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return static_cast<unsigned>(blocks);
}

// A strided matrix of rows the kernels read or write whole: base address and row strides in
// elements (its last dimension must have unit stride for any vector width above 1).
struct Rows {
  uintptr_t address;
  int64_t strides[3];
  int64_t last_stride;
};

// The number of elements (of elem_bytes each) per load or store, at most 16 bytes: the widest
// power of two that divides row_len and for which every base address and row stride is aligned.
// A null address (a part that is absent) is skipped.
inline int vector_elems(int elem_bytes, int64_t row_len, const Rows* rows, int n_rows) {
  for (int bytes = 16; bytes > elem_bytes; bytes /= 2) {
    const int elems = bytes / elem_bytes;
    bool ok = row_len % elems == 0;
    for (int r = 0; ok && r < n_rows; ++r) {
      if (rows[r].address == 0) continue;
      ok = rows[r].last_stride == 1 && rows[r].address % bytes == 0;
      for (int s = 0; ok && s < 3; ++s) ok = (rows[r].strides[s] * elem_bytes) % bytes == 0;
    }
    if (ok) return elems;
  }
  return 1;
}

}  // namespace fastprompt::launch
