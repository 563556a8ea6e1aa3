// Host-side wiring of the MCF ops, shared by the CPU and CUDA kernels: argument checks, output allocation, dtype
// dispatch and in-place handling. A `Launcher` only has to run one ElementwiseProblem on its device:
//
//   struct Launcher {
//     template <typename Op, typename InT, typename OutT, int NumIn, int NumOut>
//     static void launch(const ElementwiseProblem<InT, OutT, NumIn, NumOut>& problem, Op op, at::Device device);
//   };
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <tuple>
#include <utility>

#include "leanops/common_host.h"
#include "leanops/mcf.h"

namespace leanops {
namespace mcf {

// One elementwise launch over `numel` elements of contiguous operands. An input marked `broadcast` holds a single
// element that every position reads (a scalar such as a split beta2).
template <typename InT, typename OutT, int NumIn, int NumOut>
struct ElementwiseProblem {
  const InT* in[NumIn];
  bool broadcast[NumIn];
  OutT* out[NumOut];
  int64_t numel;
};

// Calls fn(Format{}, Storage{}) for a storage dtype the kernels support, else raises TypeError naming the argument.
template <typename Fn>
void dispatch_storage(at::ScalarType dtype, const char* op, const char* arg, Fn&& fn) {
  const bool supported = dispatch_float_dtype<float, c10::Half, c10::BFloat16>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    fn(storage_format_t<T>{}, T{});
  });
  TORCH_CHECK_TYPE(supported, "leanops.mcf.", op, ": argument '", arg, "' has dtype ", dtype,
                   "; the kernels support torch.bfloat16, torch.float16 and torch.float32");
}

// `t` must match `like` in dtype, device and shape (or hold one element, where `scalar_ok`).
inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                       const at::Tensor& like, bool scalar_ok = false) {
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "leanops.mcf.", op, ": argument '", name, "' has dtype ",
                   t.scalar_type(), " but '", like_name, "' has dtype ", like.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), "leanops.mcf.", op, ": argument '", name, "' is on ", t.device(),
                    " but '", like_name, "' is on ", like.device());
  TORCH_CHECK_VALUE(t.sizes() == like.sizes() || (scalar_ok && t.numel() == 1), "leanops.mcf.", op, ": argument '",
                    name, "' has shape ", t.sizes(), " but '", like_name, "' has shape ", like.sizes(),
                    scalar_ok ? " (or pass a single element)" : "");
}

inline at::Tensor empty_output(const at::Tensor& like, at::ScalarType dtype) {
  return at::empty(like.sizes(), like.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
}

// Whether two tensors' spans of memory intersect (conservative for interleaved strided views of one buffer).
inline bool byte_ranges_intersect(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const at::Tensor& t) {
    int64_t extent = 1;
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
    const auto start = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return std::make_pair(start, start + static_cast<uintptr_t>(extent * t.element_size()));
  };
  const auto [a_start, a_end] = span(a);
  const auto [b_start, b_end] = span(b);
  return a_start < b_end && b_start < a_end;
}

template <typename InT, typename OutT, int NumIn, int NumOut>
ElementwiseProblem<InT, OutT, NumIn, NumOut> make_problem(const std::array<at::Tensor, NumIn>& inputs,
                                                         const std::array<at::Tensor, NumOut>& outputs) {
  ElementwiseProblem<InT, OutT, NumIn, NumOut> problem;
  problem.numel = outputs[0].numel();
  for (int k = 0; k < NumIn; ++k) {
    problem.in[k] = reinterpret_cast<const InT*>(inputs[k].const_data_ptr());
    problem.broadcast[k] = inputs[k].numel() != problem.numel;
  }
  for (int k = 0; k < NumOut; ++k) problem.out[k] = reinterpret_cast<OutT*>(outputs[k].mutable_data_ptr());
  return problem;
}

// Runs Op<Format> over same-dtype inputs, writing two outputs of that dtype.
template <typename Launcher, template <typename> class Op, size_t NumIn>
std::tuple<at::Tensor, at::Tensor> pair_op(const char* op, const char* first_name,
                                           const std::array<at::Tensor, NumIn>& inputs,
                                           const std::array<at::Tensor, 2>& outputs) {
  std::array<at::Tensor, NumIn> contiguous_inputs;
  for (size_t k = 0; k < NumIn; ++k) contiguous_inputs[k] = inputs[k].contiguous();
  dispatch_storage(inputs[0].scalar_type(), op, first_name, [&](auto format, auto storage) {
    using F = decltype(format);
    using T = decltype(storage);
    static_assert(Op<F>::num_inputs == NumIn, "operand count");
    if (outputs[0].numel() == 0) return;
    Launcher::launch(make_problem<T, T, NumIn, 2>(contiguous_inputs, outputs), Op<F>{}, outputs[0].device());
  });
  return {outputs[0], outputs[1]};
}

template <typename Launcher, template <typename> class Op>
std::tuple<at::Tensor, at::Tensor> binary_op(const char* op, const at::Tensor& a, const at::Tensor& b) {
  check_like(op, "b", b, "a", a);
  const auto dtype = a.scalar_type();
  return pair_op<Launcher, Op, 2>(op, "a", {a, b}, {empty_output(a, dtype), empty_output(a, dtype)});
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> two_sum(const at::Tensor& a, const at::Tensor& b) {
  return binary_op<Launcher, TwoSumOp>("two_sum", a, b);
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> fast_two_sum(const at::Tensor& a, const at::Tensor& b) {
  return binary_op<Launcher, FastTwoSumOp>("fast_two_sum", a, b);
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> two_prod(const at::Tensor& a, const at::Tensor& b) {
  return binary_op<Launcher, TwoProdOp>("two_prod", a, b);
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> grow(const at::Tensor& hi, const at::Tensor& lo, const at::Tensor& v) {
  check_like("grow", "lo", lo, "hi", hi);
  check_like("grow", "v", v, "hi", hi);
  const auto dtype = hi.scalar_type();
  return pair_op<Launcher, GrowOp, 3>("grow", "hi", {hi, lo, v}, {empty_output(hi, dtype), empty_output(hi, dtype)});
}

// In place: each element's inputs are read before its outputs are written, so hi and lo may serve as both.
template <typename Launcher>
void grow_(at::Tensor& hi, at::Tensor& lo, const at::Tensor& v) {
  check_like("grow_", "lo", lo, "hi", hi);
  check_like("grow_", "v", v, "hi", hi);
  at::assert_no_internal_overlap(hi);
  at::assert_no_internal_overlap(lo);
  TORCH_CHECK_VALUE(!byte_ranges_intersect(hi, lo), "leanops.mcf.grow_: arguments 'hi' and 'lo' must not share memory");
  if (hi.is_contiguous() && lo.is_contiguous()) {
    pair_op<Launcher, GrowOp, 3>("grow_", "hi", {hi, lo, v}, {hi, lo});
  } else {
    // Strided destinations: compute into contiguous buffers, then copy back through the strides.
    auto result = grow<Launcher>(hi, lo, v);
    hi.copy_(std::get<0>(result));
    lo.copy_(std::get<1>(result));
  }
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> scale(const at::Tensor& hi, const at::Tensor& lo, const at::Tensor& b_hi,
                                         const at::Tensor& b_lo) {
  check_like("scale", "lo", lo, "hi", hi);
  check_like("scale", "b_hi", b_hi, "hi", hi, /*scalar_ok=*/true);
  check_like("scale", "b_lo", b_lo, "hi", hi, /*scalar_ok=*/true);
  const auto dtype = hi.scalar_type();
  return pair_op<Launcher, ScaleOp, 4>("scale", "hi", {hi, lo, b_hi, b_lo},
                                       {empty_output(hi, dtype), empty_output(hi, dtype)});
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> split(const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "leanops.mcf.split: argument 'x' must be torch.float32, got ",
                   x.scalar_type());
  at::Tensor hi = empty_output(x, dtype);
  at::Tensor lo = empty_output(x, dtype);
  const std::array<at::Tensor, 1> inputs = {x.contiguous()};
  dispatch_storage(dtype, "split", "dtype", [&](auto format, auto storage) {
    using F = decltype(format);
    using T = decltype(storage);
    if (x.numel() == 0) return;
    Launcher::launch(make_problem<float, T, 1, 2>(inputs, {hi, lo}), SplitOp<F>{}, x.device());
  });
  return {hi, lo};
}

template <typename Launcher>
at::Tensor merge(const at::Tensor& hi, const at::Tensor& lo) {
  check_like("merge", "lo", lo, "hi", hi);
  at::Tensor out = empty_output(hi, at::kFloat);
  const std::array<at::Tensor, 2> inputs = {hi.contiguous(), lo.contiguous()};
  dispatch_storage(hi.scalar_type(), "merge", "hi", [&](auto /*format*/, auto storage) {
    using T = decltype(storage);
    if (hi.numel() == 0) return;
    Launcher::launch(make_problem<T, float, 2, 1>(inputs, {out}), MergeOp{}, hi.device());
  });
  return out;
}

// Registers every MCF kernel of one backend; called from TORCH_LIBRARY_IMPL(leanops, <dispatch key>, m).
template <typename Launcher>
void register_kernels(torch::Library& m) {
  m.impl("two_sum", &two_sum<Launcher>);
  m.impl("fast_two_sum", &fast_two_sum<Launcher>);
  m.impl("two_prod", &two_prod<Launcher>);
  m.impl("grow", &grow<Launcher>);
  m.impl("grow_", &grow_<Launcher>);
  m.impl("scale", &scale<Launcher>);
  m.impl("split", &split<Launcher>);
  m.impl("merge", &merge<Launcher>);
}

}  // namespace mcf
}  // namespace leanops
