// Elementwise functors for the MCF ops, shared by the CPU and CUDA launchers.
//
// Each functor reads `num_inputs` float32 values (already widened from the storage type) and writes `num_outputs`
// float32 values that are exactly representable in the output storage type, so the final narrowing is exact.
#pragma once

#include "leanops/eft.h"

namespace leanops {
namespace mcf {

template <typename F>
struct TwoSumOp {
  static constexpr int num_inputs = 2;
  static constexpr int num_outputs = 2;
  LEANOPS_HOST_DEVICE void operator()(const float* in, float* out) const {
    const eft::Pair r = eft::two_sum<F>(in[0], in[1]);
    out[0] = r.hi;
    out[1] = r.lo;
  }
};

template <typename F>
struct FastTwoSumOp {
  static constexpr int num_inputs = 2;
  static constexpr int num_outputs = 2;
  LEANOPS_HOST_DEVICE void operator()(const float* in, float* out) const {
    const eft::Pair r = eft::fast_two_sum<F>(in[0], in[1]);
    out[0] = r.hi;
    out[1] = r.lo;
  }
};

template <typename F>
struct TwoProdOp {
  static constexpr int num_inputs = 2;
  static constexpr int num_outputs = 2;
  LEANOPS_HOST_DEVICE void operator()(const float* in, float* out) const {
    const eft::Pair r = eft::two_prod<F>(in[0], in[1]);
    out[0] = r.hi;
    out[1] = r.lo;
  }
};

// inputs: hi, lo, v
template <typename F>
struct GrowOp {
  static constexpr int num_inputs = 3;
  static constexpr int num_outputs = 2;
  LEANOPS_HOST_DEVICE void operator()(const float* in, float* out) const {
    const eft::Pair r = eft::grow<F>(in[0], in[1], in[2]);
    out[0] = r.hi;
    out[1] = r.lo;
  }
};

// inputs: hi, lo, b_hi, b_lo
template <typename F>
struct ScaleOp {
  static constexpr int num_inputs = 4;
  static constexpr int num_outputs = 2;
  LEANOPS_HOST_DEVICE void operator()(const float* in, float* out) const {
    const eft::Pair r = eft::scale<F>(in[0], in[1], in[2], in[3]);
    out[0] = r.hi;
    out[1] = r.lo;
  }
};

// input: a float32 x; outputs in format F
template <typename F>
struct SplitOp {
  static constexpr int num_inputs = 1;
  static constexpr int num_outputs = 2;
  LEANOPS_HOST_DEVICE void operator()(const float* in, float* out) const {
    const eft::Pair r = eft::split<F>(in[0]);
    out[0] = r.hi;
    out[1] = r.lo;
  }
};

// inputs: hi, lo in format F; output float32
struct MergeOp {
  static constexpr int num_inputs = 2;
  static constexpr int num_outputs = 1;
  LEANOPS_HOST_DEVICE void operator()(const float* in, float* out) const { out[0] = eft::merge(in[0], in[1]); }
};

}  // namespace mcf
}  // namespace leanops
