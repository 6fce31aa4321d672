// CUDA twins of the cascade's small kernels (csrc/cascade/kernels.h): tensors in, launcher
// parameters out (csrc/cuda/params.h), launch errors raised with the kernel's name.
//
// Compiled by the host compiler (torch headers stay out of the .cu file).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/intrusive_ptr.h>

#include <mutex>
#include <vector>

#include "../cascade/kernels.h"
#include "fastprompt/launch.h"
#include "params.h"

namespace fastprompt::cuda {
namespace {

using at::Tensor;

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::f32;
    case at::kHalf:
      return DType::f16;
    case at::kBFloat16:
      return DType::bf16;
    default:
      break;
  }
  TORCH_CHECK(false, "fastprompt_ext: float32, float16 or bfloat16 expected, got ",
              t.scalar_type());
}

View4 view4(const Tensor& t) {
  if (!t.defined()) return {nullptr, 0, 0, 0, 0};
  return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

View3 view3(const Tensor& t) {
  if (!t.defined()) return {nullptr, 0, 0, 0};
  return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

launch::Rows rows_of(const Tensor& t) {
  if (!t.defined()) return {0, {0, 0, 0}, 1};
  return {reinterpret_cast<uintptr_t>(t.const_data_ptr()),
          {t.stride(0), t.stride(1), t.stride(2)},
          t.stride(3)};
}

const int64_t* i64_ptr(const Tensor& t, Tensor& keep_alive) {
  if (!t.defined()) return nullptr;
  keep_alive = t.to(at::kLong).contiguous();
  return keep_alive.const_data_ptr<int64_t>();
}

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "fastprompt_ext: launching ", kernel,
              " failed: ", cudaGetErrorString(err));
}

// Index and length tensors already checked, so that a model calling attention once per block
// with the same tensors launches the check once, not once per block. An entry holds a weak
// reference (a freed tensor whose memory is reused is not mistaken for it) and the version
// counter (an in-place change is checked again). Inference tensors have no version counter:
// they are checked at every call.
struct Checked {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  int64_t version;
  int64_t bound;
};

std::mutex checked_mutex;
std::vector<Checked> checked;

bool already_checked(const Tensor& t, int64_t bound) {
  if (t.is_inference()) return false;
  const std::lock_guard<std::mutex> lock(checked_mutex);
  for (const Checked& c : checked) {
    if (!c.impl.expired() && c.impl._unsafe_get_target() == t.unsafeGetTensorImpl() &&
        c.version == t._version() && c.bound == bound) {
      return true;
    }
  }
  return false;
}

void mark_checked(const Tensor& t, int64_t bound) {
  if (t.is_inference()) return;
  const std::lock_guard<std::mutex> lock(checked_mutex);
  if (checked.size() >= 32) checked.erase(checked.begin());
  checked.push_back({c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                         t.getIntrusivePtr()),
                     t._version(), bound});
}

// The values are checked on the device, and a bad one stops the stream with a device-side
// assertion: nothing synchronises with the host (a read-back of the flag would, once per new
// tensor: once per forward for a per-image index made each forward, once per block for a view
// taken per block), and a bad index is never used. The Python entry point checks the same way
// first, so the assertion's message names the argument there.
void check_sets(const std::optional<Tensor>& index, const std::optional<Tensor>& lengths,
                int64_t T, int64_t P, const char* op) {
  const bool do_index = index.has_value() && index->numel() > 0 && !already_checked(*index, T);
  const bool do_lengths =
      lengths.has_value() && lengths->numel() > 0 && !already_checked(*lengths, P);
  if (!do_index && !do_lengths) return;
  const Tensor& any = do_index ? *index : *lengths;
  const c10::cuda::CUDAGuard guard(any.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor idx, lens;
  const Tensor flag = at::zeros({1}, any.options().dtype(at::kInt));
  CheckSetsParams p{do_index ? i64_ptr(*index, idx) : nullptr,
                    do_index ? index->size(0) : 0,
                    T,
                    do_lengths ? i64_ptr(*lengths, lens) : nullptr,
                    P,
                    flag.data_ptr<int>()};
  check_launch(launch_check_sets(p, stream), "check_sets_kernel");
  const std::string message = std::string(op) + ": prompt_index values must lie in [0, " +
                              std::to_string(T) + ") and prompt_lengths values in [0, " +
                              std::to_string(P) + "]";
  at::_assert_async(flag.eq(0).all(), message);
  if (do_index) mark_checked(*index, T);
  if (do_lengths) mark_checked(*lengths, P);
}

void merge(const Tensor& o_p, const Tensor& lse_p, const Tensor& o_i, const Tensor& lse_i,
           const Tensor& counts, const Tensor& out, const Tensor& lse) {
  TORCH_CHECK(lse.is_contiguous(), "fastprompt_ext: merge writes a contiguous lse");
  const c10::cuda::CUDAGuard guard(out.device());
  Tensor cnt;
  const launch::Rows rows[] = {rows_of(o_p), rows_of(o_i), rows_of(out)};
  MergeParams p{dtype_of(out),
                launch::vector_elems(static_cast<int>(out.element_size()), out.size(3), rows, 3),
                out.size(0),
                out.size(1),
                out.size(2),
                out.size(3),
                view4(o_p),
                view4(o_i),
                view3(lse_p),
                view3(lse_i),
                i64_ptr(counts, cnt),
                view4(out),
                lse.data_ptr<float>()};
  check_launch(launch_merge(p, c10::cuda::getCurrentCUDAStream()), "merge_kernel");
}

Tensor reduce_sets(const Tensor& per_seq, const Tensor& order, const Tensor& offsets, int64_t T) {
  const c10::cuda::CUDAGuard guard(per_seq.device());
  Tensor out = at::empty({T, per_seq.size(1), per_seq.size(2), per_seq.size(3)},
                         per_seq.options().dtype(at::kFloat));
  Tensor ord, off;
  ReduceParams p{dtype_of(per_seq),     T,
                 per_seq.size(1),       per_seq.size(2),
                 per_seq.size(3),       view4(per_seq),
                 i64_ptr(order, ord),   i64_ptr(offsets, off),
                 out.data_ptr<float>()};
  check_launch(launch_reduce_sets(p, c10::cuda::getCurrentCUDAStream()), "reduce_sets_kernel");
  return out;
}

void score_terms(const Tensor& dk, const Tensor& dv, const Tensor& gate_src, double gate_mult,
                 const Tensor& u_k, const Tensor& u_v, const Tensor& index, const Tensor& terms,
                 const Tensor& gate) {
  TORCH_CHECK(terms.is_contiguous() && gate.is_contiguous() && u_k.is_contiguous() &&
                  u_v.is_contiguous() && u_k.scalar_type() == at::kFloat,
              "fastprompt_ext: score_terms takes contiguous fp32 u_k/u_v, terms and gate");
  TORCH_CHECK(dk.size(3) <= 256, "fastprompt_ext: score_terms takes head dims up to 256");
  const c10::cuda::CUDAGuard guard(dk.device());
  Tensor idx;
  TermsParams p{dtype_of(dk),
                dk.size(0),
                dk.size(1),
                dk.size(2),
                dk.size(3),
                u_k.size(0),
                u_k.size(1),
                view4(dk),
                view4(dv),
                view3(gate_src),
                static_cast<float>(gate_mult),
                u_k.const_data_ptr<float>(),
                u_v.const_data_ptr<float>(),
                i64_ptr(index, idx),
                terms.data_ptr<float>(),
                gate.data_ptr<float>()};
  check_launch(launch_score_terms(p, c10::cuda::getCurrentCUDAStream()), "score_terms_kernel");
}

}  // namespace
}  // namespace fastprompt::cuda

namespace fastprompt::cascade {
const Kernels kCudaKernels{&cuda::check_sets, &cuda::merge, &cuda::reduce_sets,
                           &cuda::score_terms};
}  // namespace fastprompt::cascade
