// CPU kernels of the MCF ops: a blocked, multi-threaded loop over contiguous memory (at::parallel_for), compiled
// twice on x86-64 (baseline SSE2, and AVX2 + FMA, chosen at run time) since the rounding to bfloat16/float16 after
// every operation makes these loops compute-bound on a CPU: AVX2 halves their time.
#include <ATen/Parallel.h>

#include "leanops/mcf_host.h"

namespace leanops {
namespace mcf {
namespace {

template <bool AnyBroadcast, typename Op, typename InT, typename OutT, int NumIn, int NumOut>
inline __attribute__((always_inline)) void run_range_body(const ElementwiseProblem<InT, OutT, NumIn, NumOut>& problem,
                                                         Op op, int64_t begin, int64_t end) {
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

template <bool AnyBroadcast, typename Op, typename InT, typename OutT, int NumIn, int NumOut>
void run_range_baseline(const ElementwiseProblem<InT, OutT, NumIn, NumOut>& problem, Op op, int64_t begin,
                        int64_t end) {
  run_range_body<AnyBroadcast>(problem, op, begin, end);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define LEANOPS_HAVE_AVX2_CLONE 1
// -ffp-contract=off still holds here: the FMA instructions appear only where eft.h asks for one (std::fma).
template <bool AnyBroadcast, typename Op, typename InT, typename OutT, int NumIn, int NumOut>
__attribute__((target("avx2,fma"))) void run_range_avx2(const ElementwiseProblem<InT, OutT, NumIn, NumOut>& problem,
                                                         Op op, int64_t begin, int64_t end) {
  run_range_body<AnyBroadcast>(problem, op, begin, end);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <bool AnyBroadcast, typename Op, typename InT, typename OutT, int NumIn, int NumOut>
void run_range(const ElementwiseProblem<InT, OutT, NumIn, NumOut>& problem, Op op, int64_t begin, int64_t end) {
#ifdef LEANOPS_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) {
    run_range_avx2<AnyBroadcast>(problem, op, begin, end);
    return;
  }
#endif
  run_range_baseline<AnyBroadcast>(problem, op, begin, end);
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
