// The size of one panel of the loss plans (csrc/include/leanops/contrastive_plan_host.h: row panels of the B x B
// similarity matrix; csrc/include/leanops/cross_entropy_plan_host.h: vocabulary chunks of the N x V logits), shared
// by the CPU and CUDA providers, the panel loop's helpers, and the one ATen call through which both providers issue
// their GEMMs (matrix_product).
//
// The panel formula, for a rows x columns matrix that the plan never builds whole (B x B; for linear cross-entropy
// V x N: a chunk is Vc rows of W and holds N x Vc logits) and bytes_per_entry, what one panel entry costs in all of
// the provider's panel buffers (4 for a float32 panel, 6 when a 16-bit gradient panel sits beside it):
//
//   P = clamp(budget / (columns * bytes_per_entry), 1, rows), rounded down to a multiple of 64 when P >= 64;
//   on CUDA, P >= 512 rows (before the clamp) unless the budget is set explicitly.
//
// The budget is LEANOPS_PANEL_BUDGET_MIB (a positive number of MiB, fractions allowed, read on every call), else
// the device's default. CUDA: 64 MiB and at least 512 rows, python/leanops/plans.py's numbers, which the Triton
// provider sizes its panels with: a panel of P rows gives its float32 accumulation (grad_y += G^T x,
// grad_h += G W) P FLOPs per byte of traffic, and P >= 512 keeps that traffic a small part of the time (a
// 512 x 8192 output is also 256 cuBLAS tiles, about two waves of an H100). CPU: 8 MiB (plans.py's number too), so
// that a panel stays in the last-level cache between its GEMM and its fused step, which
// read and write it several times: measured on the 2-core development VM (32 MiB L3) at B = 4096, one CLIP
// forward + backward took 20-30 % less time with 8 MiB panels than with 32 MiB ones at D = 8, the same at D = 256.
// Rows in multiples of 64 keep the GEMM operands of consecutive panels equally aligned.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

namespace leanops {
namespace panel {

constexpr const char* kBudgetVariable = "LEANOPS_PANEL_BUDGET_MIB";
constexpr double kDefaultCudaBudgetMiB = 64.0;
constexpr double kDefaultCpuBudgetMiB = 8.0;
constexpr int64_t kCudaMinimumRows = 512;
constexpr int64_t kRowMultiple = 64;

// LEANOPS_PANEL_BUDGET_MIB in bytes, or -1 when it is not set; an error naming the variable if it is not a positive
// number.
inline int64_t budget_override_bytes() {
  const char* text = std::getenv(kBudgetVariable);
  if (text == nullptr || *text == '\0') return -1;
  char* end = nullptr;
  const double mebibytes = std::strtod(text, &end);
  TORCH_CHECK_VALUE(end != text && *end == '\0' && std::isfinite(mebibytes) && mebibytes > 0.0, "leanops: ",
                    kBudgetVariable, " must be a positive number of MiB, got '", text, "'");
  return static_cast<int64_t>(std::min(mebibytes * 1048576.0, 0x1p62));
}

// Rows per panel of a rows x columns matrix whose panel entries cost bytes_per_entry each, on a device of `device`'s
// type (see the file comment).
inline int64_t panel_rows(int64_t rows, int64_t columns, int64_t bytes_per_entry, at::DeviceType device) {
  TORCH_INTERNAL_ASSERT(rows >= 1 && bytes_per_entry >= 1);
  const bool cuda = device == at::DeviceType::CUDA;
  const int64_t override_bytes = budget_override_bytes();
  const double default_mebibytes = cuda ? kDefaultCudaBudgetMiB : kDefaultCpuBudgetMiB;
  const int64_t budget = override_bytes >= 0 ? override_bytes : static_cast<int64_t>(default_mebibytes * 1048576.0);
  int64_t count = budget / (std::max<int64_t>(columns, 1) * bytes_per_entry);
  if (cuda && override_bytes < 0) count = std::max(count, kCudaMinimumRows);
  count = std::clamp<int64_t>(count, 1, rows);
  if (count >= kRowMultiple) count = count / kRowMultiple * kRowMultiple;
  return count;
}

// A (rows, columns) view of the first rows * columns elements of a flat panel buffer: contiguous, and at the
// buffer's own (aligned) start for every panel.
inline at::Tensor panel_view(const at::Tensor& buffer, int64_t rows, int64_t columns) {
  return buffer.narrow(0, 0, rows * columns).view({rows, columns});
}

// Calls fn(first_row, rows) for the panels of rows_per_panel rows that cover [0, total_rows), in order.
template <typename Fn>
void for_each_panel(int64_t total_rows, int64_t rows_per_panel, Fn&& fn) {
  for (int64_t first = 0; first < total_rows; first += rows_per_panel) {
    fn(first, std::min(rows_per_panel, total_rows - first));
  }
}

// Bytes per panel entry of a backward: the float32 panel (S or the logits), and a gradient panel beside it unless
// the gradient is float32 and overwrites it.
inline int64_t backward_bytes_per_entry(at::ScalarType gradient_dtype) {
  return 4 + (gradient_dtype == at::kFloat ? 0 : static_cast<int64_t>(c10::elementSize(gradient_dtype)));
}

// out = a b, or out += a b (accumulate), with out float32: one aten::mm / aten::addmm call through the dispatcher,
// its .dtype overload for 16-bit a and b (float32 accumulation and output; CUDA only: the CPU plans multiply
// float32 copies). The providers' Steps::multiply issue their GEMMs through this.
inline void matrix_product(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == at::kFloat) {
    if (accumulate) {
      at::addmm_out(out, out, a, b);
    } else {
      at::mm_out(out, a, b);
    }
  } else if (accumulate) {
    at::addmm_out(out, out, a, b, at::kFloat);
  } else {
    at::mm_out(out, a, b, at::kFloat);
  }
}

}  // namespace panel
}  // namespace leanops
