// CPU kernels of the MCF ops: a blocked, multi-threaded loop over contiguous memory (at::parallel_for).
#include <ATen/Parallel.h>

#include "leanops/mcf_host.h"

namespace leanops {
namespace mcf {
namespace {

struct CpuLauncher {
  template <typename Op, typename InT, typename OutT, int NumIn, int NumOut>
  static void launch(const ElementwiseProblem<InT, OutT, NumIn, NumOut>& problem, Op op, at::Device /*device*/) {
    // 64K elements per task keeps the threading overhead small against a memory-bound loop.
    constexpr int64_t grain_size = 1 << 16;
    at::parallel_for(0, problem.numel, grain_size, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float in[NumIn];
        float out[NumOut];
        for (int k = 0; k < NumIn; ++k) in[k] = static_cast<float>(problem.in[k][problem.broadcast[k] ? 0 : i]);
        op(in, out);
        // The functor's outputs are representable in OutT, so this conversion is exact.
        for (int k = 0; k < NumOut; ++k) problem.out[k][i] = static_cast<OutT>(out[k]);
      }
    });
  }
};

}  // namespace
}  // namespace mcf
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CPU, m) { leanops::mcf::register_kernels<leanops::mcf::CpuLauncher>(m); }
