// Pruned-prompt packing on the CPU: the kept rows of every layer, packed layer after layer with
// no padding (per-layer counts differ), and the backward that scatters into the kept rows only.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstring>
#include <vector>

#include "../ops.h"

namespace fastprompt {
namespace {

void check_gather(const at::Tensor& table_or_grad, int64_t table_dim, const at::Tensor& keep,
                  const char* op, const char* name) {
  TORCH_CHECK(table_or_grad.dim() == table_dim, op, ": ", name, " must be ", table_dim,
              "-D, got shape ", table_or_grad.sizes());
  TORCH_CHECK(keep.dim() == 2 && keep.scalar_type() == at::kBool, op,
              ": keep must be a 2-D bool tensor (L, P), got ", keep.scalar_type(), " ",
              keep.sizes());
  TORCH_CHECK(keep.device() == table_or_grad.device(), op, ": keep is on ", keep.device(), ", ",
              name, " on ", table_or_grad.device());
}

// Source row (layer * P + index) of each packed row, and the per-layer counts.
void kept_rows(const at::Tensor& keep, std::vector<int64_t>& rows, int64_t* counts) {
  const at::Tensor k = keep.contiguous();
  const bool* p = k.const_data_ptr<bool>();
  const int64_t L = k.size(0), P = k.size(1);
  for (int64_t l = 0; l < L; ++l) {
    int64_t c = 0;
    for (int64_t i = 0; i < P; ++i) {
      if (p[l * P + i]) {
        rows.push_back(l * P + i);
        ++c;
      }
    }
    counts[l] = c;
  }
}

// dst row j <- src row rows[j] (direction 0) or dst row rows[j] <- src row j (direction 1).
void copy_rows(const at::Tensor& src, at::Tensor& dst, const std::vector<int64_t>& rows,
               bool scatter) {
  const int64_t bytes = src.size(1) * src.element_size();
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  const int64_t n = static_cast<int64_t>(rows.size());
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t from = scatter ? j : rows[j], to = scatter ? rows[j] : j;
      std::memcpy(d + to * bytes, s + from * bytes, bytes);
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> gather_prompts_cpu(const Tensor& table, const Tensor& keep) {
  constexpr const char* op = "fastprompt_ext::gather_prompts";
  check_gather(table, 3, keep, op, "table");
  TORCH_CHECK(keep.size(0) == table.size(0) && keep.size(1) == table.size(1), op,
              ": keep must be (L, P) = (", table.size(0), ", ", table.size(1), "), got ",
              keep.sizes());
  const int64_t L = table.size(0), P = table.size(1), D = table.size(2);
  at::Tensor counts = at::empty({L}, keep.options().dtype(at::kLong));
  std::vector<int64_t> rows;
  rows.reserve(L * P);
  kept_rows(keep, rows, counts.data_ptr<int64_t>());
  const at::Tensor src = table.reshape({L * P, D}).contiguous();
  at::Tensor packed = at::empty({static_cast<int64_t>(rows.size()), D}, table.options());
  copy_rows(src, packed, rows, /*scatter=*/false);
  return {packed, counts};
}

Tensor gather_prompts_backward_cpu(const Tensor& grad_packed, const Tensor& keep) {
  constexpr const char* op = "fastprompt_ext::gather_prompts_backward";
  check_gather(grad_packed, 2, keep, op, "grad_packed");
  const int64_t L = keep.size(0), P = keep.size(1), D = grad_packed.size(1);
  std::vector<int64_t> rows;
  rows.reserve(L * P);
  std::vector<int64_t> counts(L);
  kept_rows(keep, rows, counts.data());
  TORCH_CHECK(grad_packed.size(0) == static_cast<int64_t>(rows.size()), op, ": grad_packed has ",
              grad_packed.size(0), " rows but keep selects ", rows.size());
  at::Tensor grad = at::zeros({L * P, D}, grad_packed.options());
  copy_rows(grad_packed.contiguous(), grad, rows, /*scatter=*/true);
  return grad.view({L, P, D});
}

}  // namespace fastprompt
