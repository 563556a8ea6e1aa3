// Elementwise functors for the MCF ops, shared by the CPU and CUDA launchers.
//
// Each functor reads `num_inputs` float32 values (already widened from the storage type) and writes `num_outputs`
// float32 values that are exactly representable in the output storage type, so the final narrowing is exact.
#pragma once

#include "leanops/eft.h"

namespace leanops {
namespace mcf {

// The functors of the ops that return a pair (hi, lo) of F values: Op::pair(in) computes it from NumIn inputs.
template <typename Op, int NumIn>
struct PairOp {
  static constexpr int num_inputs = NumIn;
  static constexpr int num_outputs = 2;
  LEANOPS_HOST_DEVICE void operator()(const float* in, float* out) const {
    const eft::Pair r = Op::pair(in);
    out[0] = r.hi;
    out[1] = r.lo;
  }
};

template <typename F>
struct TwoSumOp : PairOp<TwoSumOp<F>, 2> {
  LEANOPS_HOST_DEVICE static eft::Pair pair(const float* in) { return eft::two_sum<F>(in[0], in[1]); }
};

template <typename F>
struct FastTwoSumOp : PairOp<FastTwoSumOp<F>, 2> {
  LEANOPS_HOST_DEVICE static eft::Pair pair(const float* in) { return eft::fast_two_sum<F>(in[0], in[1]); }
};

template <typename F>
struct TwoProdOp : PairOp<TwoProdOp<F>, 2> {
  LEANOPS_HOST_DEVICE static eft::Pair pair(const float* in) { return eft::two_prod<F>(in[0], in[1]); }
};

// inputs: hi, lo, v
template <typename F>
struct GrowOp : PairOp<GrowOp<F>, 3> {
  LEANOPS_HOST_DEVICE static eft::Pair pair(const float* in) { return eft::grow<F>(in[0], in[1], in[2]); }
};

// inputs: hi, lo, b_hi, b_lo
template <typename F>
struct ScaleOp : PairOp<ScaleOp<F>, 4> {
  LEANOPS_HOST_DEVICE static eft::Pair pair(const float* in) { return eft::scale<F>(in[0], in[1], in[2], in[3]); }
};

// input: a float32 x; outputs in format F
template <typename F>
struct SplitOp : PairOp<SplitOp<F>, 1> {
  LEANOPS_HOST_DEVICE static eft::Pair pair(const float* in) { return eft::split<F>(in[0]); }
};

// inputs: hi, lo in format F; output float32
struct MergeOp {
  static constexpr int num_inputs = 2;
  static constexpr int num_outputs = 1;
  LEANOPS_HOST_DEVICE void operator()(const float* in, float* out) const { out[0] = eft::merge(in[0], in[1]); }
};

}  // namespace mcf
}  // namespace leanops
