// Host-side helpers shared by every op family (csrc/cpu/*.cpp and the host code of csrc/cuda/*.cu): dtype names and
// argument checks common to several ops, and the one dispatch from a floating at::ScalarType to a C++ element type,
// which every kernel's dtype switch goes through.
//
// Header names: <topic>.h host+device, <topic>_host.h ATen host code of both backends, <topic>_cpu.h, <topic>_cuda.cuh.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "leanops/eft.h"

namespace leanops {

// "torch.float32" for at::kFloat: the spelling Python users see.
inline std::string dtype_name(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

// The floating dtypes of the loss kernels' inputs.
inline bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// "list[index]": one tensor of a list argument, as the messages name it.
inline std::string item_name(const char* list, size_t index) {
  return std::string(list) + "[" + std::to_string(index) + "]";
}

// Whether the byte spans [begin, end) of two contiguous tensors' elements intersect.
inline bool spans_intersect(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto a_begin = reinterpret_cast<uintptr_t>(a.const_data_ptr());
  const auto b_begin = reinterpret_cast<uintptr_t>(b.const_data_ptr());
  const auto a_end = a_begin + static_cast<uintptr_t>(a.numel() * a.element_size());
  const auto b_end = b_begin + static_cast<uintptr_t>(b.numel() * b.element_size());
  return a_begin < b_end && b_begin < a_end;
}

// `t` (argument `name` of op `op`) is float32 on the device of `like` (argument `like_name`).
inline void check_float32_beside(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                                 const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, "leanops.", op, ": argument '", name, "' has dtype ",
                   dtype_name(t.scalar_type()), "; expected torch.float32");
  TORCH_CHECK_VALUE(t.device() == like.device(), "leanops.", op, ": argument '", name, "' is on ", t.device(),
                    " but '", like_name, "' is on ", like.device());
}

// `t` holds one float32 value per row of `like`: shape (like.size(0),), beside it.
inline void check_per_row(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                          const at::Tensor& like) {
  check_float32_beside(op, name, t, like_name, like);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == like.size(0), "leanops.", op, ": argument '", name,
                    "' has shape ", t.sizes(), "; expected (", like.size(0), ",), one value per row of '", like_name,
                    "'");
}

// Contiguous versions of tensors (one that is contiguous already comes back as itself), to bind by name:
//   const auto [x, y] = contiguous(image, text);
template <typename... Tensors>
std::array<at::Tensor, sizeof...(Tensors)> contiguous(const Tensors&... tensors) {
  return {tensors.contiguous()...};
}

template <typename T>
struct TypeTag {
  using type = T;
};

// The dtype dispatch. Calls fn(TypeTag<Float32>{}), fn(TypeTag<Float16>{}) or fn(TypeTag<BFloat16>{}) for
// at::kFloat, at::kHalf or at::kBFloat16, with the element types the caller pairs with them (float, c10::Half,
// c10::BFloat16 on the host; float, __half, __nv_bfloat16 in CUDA kernels), and returns true. Returns false, calling
// nothing, for any other dtype and for one the caller pairs with void (a dtype its kernels do not take): the caller
// raises its own error.
template <typename Float32, typename Float16, typename BFloat16, typename Fn>
bool dispatch_float_dtype(at::ScalarType dtype, Fn&& fn) {
  const auto call = [&](auto tag) {
    if constexpr (std::is_void_v<typename decltype(tag)::type>) {
      return false;
    } else {
      fn(tag);
      return true;
    }
  };
  switch (dtype) {
    case at::kFloat:
      return call(TypeTag<Float32>{});
    case at::kHalf:
      return call(TypeTag<Float16>{});
    case at::kBFloat16:
      return call(TypeTag<BFloat16>{});
    default:
      return false;
  }
}

// The eft storage format (leanops/eft.h) of a host element type.
template <typename T>
struct StorageFormat;
template <>
struct StorageFormat<float> {
  using type = eft::Float32Format;
};
template <>
struct StorageFormat<c10::BFloat16> {
  using type = eft::BFloat16Format;
};
template <>
struct StorageFormat<c10::Half> {
  using type = eft::Float16Format;
};
template <typename T>
using storage_format_t = typename StorageFormat<T>::type;

}  // namespace leanops
