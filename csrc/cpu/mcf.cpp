// CPU kernels of the MCF ops: a blocked, multi-threaded loop over contiguous memory (at::parallel_for), compiled
// twice on x86-64 (baseline SSE2, and AVX2 + FMA, chosen at run time: leanops/vector_cpu.h's run_cloned) since the
// rounding to bfloat16/float16 after every operation makes these loops compute-bound on a CPU: AVX2 halves their time.
#include <ATen/Parallel.h>

#include "leanops/mcf_host.h"
#include "leanops/vector_cpu.h"

namespace leanops {
namespace mcf {
namespace {

template <bool AnyBroadcast, typename Op, typename InT, typename OutT, int NumIn, int NumOut>
LEANOPS_INLINE void run_range_body(const ElementwiseProblem<InT, OutT, NumIn, NumOut>& problem, Op op, int64_t begin,
                                   int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float in[NumIn];
    float out[NumOut];
    for (int k = 0; k < NumIn; ++k) {
      const int64_t index = AnyBroadcast && problem.broadcast[k] ? 0 : i;
      in[k] = static_cast<float>(problem.in[k][index]);
    }
    op(in, out);
    // The functor's outputs are representable in OutT, so this conversion is exact.
    for (int k = 0; k < NumOut; ++k) problem.out[k][i] = static_cast<OutT>(out[k]);
  }
}

// Elements [begin, end) of one problem, compiled twice (cpu_vector::run_cloned).
template <bool AnyBroadcast, typename Op, typename InT, typename OutT, int NumIn, int NumOut>
struct RangeLoop {
  const ElementwiseProblem<InT, OutT, NumIn, NumOut>& problem;
  Op op;
  int64_t begin, end;

  LEANOPS_INLINE void operator()() const { run_range_body<AnyBroadcast>(problem, op, begin, end); }
};

template <bool AnyBroadcast, typename Op, typename InT, typename OutT, int NumIn, int NumOut>
void run_range(const ElementwiseProblem<InT, OutT, NumIn, NumOut>& problem, Op op, int64_t begin, int64_t end) {
  cpu_vector::run_cloned(RangeLoop<AnyBroadcast, Op, InT, OutT, NumIn, NumOut>{problem, op, begin, end});
}

struct CpuLauncher {
  template <typename Op, typename InT, typename OutT, int NumIn, int NumOut>
  static void launch(const ElementwiseProblem<InT, OutT, NumIn, NumOut>& problem, Op op, at::Device /*device*/) {
    // 64K elements per task keeps the threading overhead small against the loop.
    constexpr int64_t grain_size = 1 << 16;
    bool any_broadcast = false;
    for (int k = 0; k < NumIn; ++k) any_broadcast |= problem.broadcast[k];
    at::parallel_for(0, problem.numel, grain_size, [&](int64_t begin, int64_t end) {
      // The common case, every operand full-size, gets a loop without index selects, which the compiler vectorises.
      if (any_broadcast) {
        run_range<true>(problem, op, begin, end);
      } else {
        run_range<false>(problem, op, begin, end);
      }
    });
  }
};

}  // namespace
}  // namespace mcf
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CPU, m) { leanops::mcf::register_kernels<leanops::mcf::CpuLauncher>(m); }
