// CPU kernel of FRUGAL's fused split step (leanops::frugal_split_step_; the math and the oracle are in
// python/leanops/reference/frugal.py, the per-element step in leanops/frugal.h, the checks in leanops/frugal_host.h).
//
// Tensor by tensor; within a tensor at::parallel_for spreads the work over the threads: flat chunks of elements in
// ADAMW and FREE modes, whole rows of the matrix in COLUMNS and ROWS modes (a row reads its positions entry, or the
// positions of every column, and its moments, which are contiguous in both layouts). Every element is independent,
// so the result does not depend on the thread count. The step moves 8-12 bytes per state-free element and 16 more per
// state-full one against about a dozen float32 operations: memory-bound, so the loops are left scalar.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "leanops/frugal_host.h"

namespace leanops {
namespace frugal {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per unit of parallel work in the flat modes

template <typename T, typename G, typename F, bool Compensated>
void step_tensor(const Operands<T, G>& o, int64_t numel, int64_t mode, int64_t positions_size, int64_t moments,
                 const Scalars& s, const TensorScalars& t) {
  if (numel == 0) return;
  if (mode == kAdamW || mode == kFree) {
    const bool state_full = mode == kAdamW;
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) step_element<T, G, F, Compensated>(o, e, state_full, e, s, t);
    });
    return;
  }
  const MatrixShape shape = matrix_shape(mode, numel, positions_size, moments);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, shape.columns));
  at::parallel_for(0, shape.rows, grain, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t i = row_begin; i < row_end; ++i) {
      const int64_t row = i * shape.columns;
      if (mode == kColumns) {
        // Column j is state-full when positions[j] >= 0; its moments sit in column positions[j] of (rows, k).
        for (int64_t j = 0; j < shape.columns; ++j) {
          const int32_t p = o.positions[j];
          step_element<T, G, F, Compensated>(o, row + j, p >= 0, i * shape.subspace + p, s, t);
        }
      } else {
        // Row i is state-full when positions[i] >= 0; its moments are row positions[i] of (k, columns).
        const int32_t p = o.positions[i];
        const int64_t moment_row = static_cast<int64_t>(p) * shape.columns;
        for (int64_t j = 0; j < shape.columns; ++j) {
          step_element<T, G, F, Compensated>(o, row + j, p >= 0, moment_row + j, s, t);
        }
      }
    }
  });
}

template <typename T, typename G, typename F, bool Compensated>
void step_all(const Call& call) {
  for (size_t i = 0; i < call.params.size(); ++i) {
    const int64_t mode = call.modes[i];
    const bool has_moments = mode != kFree;
    const bool has_positions = mode == kColumns || mode == kRows;
    Operands<T, G> o{call.params[i].data_ptr<T>(),
                     Compensated ? call.params_lo[i].data_ptr<T>() : nullptr,
                     has_moments ? call.exp_avgs[i].data_ptr<float>() : nullptr,
                     has_moments ? call.exp_avg_sqs[i].data_ptr<float>() : nullptr,
                     call.grads[i].const_data_ptr<G>(),
                     has_positions ? call.positions[i].const_data_ptr<int32_t>() : nullptr,
                     call.addends[i].numel() > 0 ? call.addends[i].const_data_ptr<float>() : nullptr};
    const TensorScalars t{static_cast<float>(call.step_sizes[i]), static_cast<float>(call.bias_correction2_roots[i])};
    step_tensor<T, G, F, Compensated>(o, call.params[i].numel(), mode,
                                      has_positions ? call.positions[i].numel() : 0,
                                      has_moments ? call.exp_avgs[i].numel() : 0, call.scalars, t);
  }
}

void run_cpu(const Call& call) {
  dispatch_step_types(call, [&](auto param, auto grad, auto format, auto compensated) {
    step_all<decltype(param), decltype(grad), decltype(format), decltype(compensated)::value>(call);
  });
}

}  // namespace
}  // namespace frugal
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CPU, m) {
  m.impl("frugal_split_step_", &leanops::frugal::split_step<leanops::frugal::run_cpu>);
}
