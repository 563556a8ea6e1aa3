// Error-free transformations (EFTs) in a storage format F ∈ {float32, bfloat16, float16}.
//
// Every value lives in a `float` register; "arithmetic in F" means: compute the operation in float32, then round
// the result to F (round to nearest, ties to even). For bfloat16 (p = 8 significand bits) and float16 (p = 11) this
// is the correctly rounded F operation, because the float32 result (p' = 24) is either exact (products: 2p <= 24)
// or double rounding from p' >= 2p + 1 bits is innocuous for addition (Figueroa, "When is double rounding
// innocuous?", 1995). So the textbook algorithms below, run in F arithmetic, are exact in F:
//
//   two_sum(a, b)      -> (s, e): s = fl(a + b), a + b == s + e exactly      (Knuth, TAOCP vol. 2, 4.2.2)
//   fast_two_sum(a, b) -> (s, e): the same when |a| >= |b|                     (Dekker 1971)
//   two_prod(a, b)     -> (p, e): p = fl(a * b), a * b == p + e exactly      (one FMA; exact unless e underflows)
//   grow(hi, lo, v)    -> (hi', lo'): hi' + lo' ~= hi + lo + v, |lo'| <= ulp(hi')/2   (Collage's Grow)
//   scale(hi, lo, bh, bl) -> (hi', lo') ~= (hi + lo) * (bh + bl)              (double-word product, Dekker's mul2)
//
// The same header compiles for the host (C++ CPU kernels, unit tests) and the device (CUDA kernels). Compilers must
// neither contract a*b+c into an FMA nor reassociate: host code is built with -ffp-contract=off and no fast-math; device
// code uses the round-to-nearest intrinsics (__fadd_rn, ...), which nvcc never contracts.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define LEANOPS_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced inlining keeps each EFT inside the caller's loop, where it vectorises; left to itself GCC may emit an
// out-of-line copy and call it through the PLT of the shared library, five times slower.
#define LEANOPS_HOST_DEVICE inline __attribute__((always_inline))
#else
#define LEANOPS_HOST_DEVICE inline
#endif

namespace leanops {
namespace eft {

// ---------------------------------------------------------------------------------------------------------------
// float32 operations, each rounded once to nearest-even (division and square root IEEE-rounded on both sides).
LEANOPS_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

LEANOPS_HOST_DEVICE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

LEANOPS_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// a*b + c with a single rounding.
LEANOPS_HOST_DEVICE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

LEANOPS_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

LEANOPS_HOST_DEVICE float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);
#endif
}

LEANOPS_HOST_DEVICE uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

LEANOPS_HOST_DEVICE float float_from_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// ---------------------------------------------------------------------------------------------------------------
// Storage formats: `round` maps a float32 to the nearest F value (ties to even), returned as a float32.

struct Float32Format {
  static constexpr int significand_bits = 24;
  LEANOPS_HOST_DEVICE static float round(float x) { return x; }
};

struct BFloat16Format {
  static constexpr int significand_bits = 8;
  LEANOPS_HOST_DEVICE static float round(float x) {
#if defined(__CUDA_ARCH__)
    return __bfloat162float(__float2bfloat16_rn(x));
#else
    const uint32_t bits = float_bits(x);
    const uint32_t rounded = bits + 0x7FFFu + ((bits >> 16) & 1u);  // overflow carries into the exponent: inf
    // A select, not a branch, so that loops over this vectorise. NaN stays NaN (the bit trick could turn a NaN
    // whose payload sits in the low 16 bits into infinity).
    return x != x ? x : float_from_bits(rounded & 0xFFFF0000u);
#endif
  }
};

struct Float16Format {
  static constexpr int significand_bits = 11;
  LEANOPS_HOST_DEVICE static float round(float x) {
#if defined(__CUDA_ARCH__)
    return __half2float(__float2half_rn(x));
#else
    if (x != x) return x;
    const float magnitude = std::fabs(x);
    if (magnitude >= 65520.0f) return std::copysign(INFINITY, x);  // 65520 is the tie above the largest, 65504
    if (magnitude < 6.103515625e-05f) {
      // Subnormal float16: a fixed quantum of 2^-24. Scaling by powers of two is exact; rint rounds to even.
      return std::copysign(std::rint(magnitude * 16777216.0f) * 5.9604644775390625e-08f, x);
    }
    const uint32_t bits = float_bits(x);
    const uint32_t rounded = bits + 0xFFFu + ((bits >> 13) & 1u);
    return float_from_bits(rounded & 0xFFFFE000u);
#endif
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Arithmetic in format F.
template <typename F>
LEANOPS_HOST_DEVICE float add(float a, float b) { return F::round(add_rn(a, b)); }
template <typename F>
LEANOPS_HOST_DEVICE float sub(float a, float b) { return F::round(sub_rn(a, b)); }
template <typename F>
LEANOPS_HOST_DEVICE float mul(float a, float b) { return F::round(mul_rn(a, b)); }

// An unevaluated sum hi + lo of two F values.
struct Pair {
  float hi;
  float lo;
};

// Knuth's TwoSum: no precondition on the operands.
template <typename F>
LEANOPS_HOST_DEVICE Pair two_sum(float a, float b) {
  const float s = add<F>(a, b);
  const float b_virtual = sub<F>(s, a);
  const float a_virtual = sub<F>(s, b_virtual);
  const float b_error = sub<F>(b, b_virtual);
  const float a_error = sub<F>(a, a_virtual);
  return {s, add<F>(a_error, b_error)};
}

// Dekker's Fast2Sum: exact when |a| >= |b| (more precisely, when exponent(a) >= exponent(b)) or a == 0.
template <typename F>
LEANOPS_HOST_DEVICE Pair fast_two_sum(float a, float b) {
  const float s = add<F>(a, b);
  const float b_virtual = sub<F>(s, a);
  return {s, sub<F>(b, b_virtual)};
}

// TwoProd with one FMA. For bfloat16/float16 the float32 product a*b is exact, so the FMA returns the exact error,
// which is representable in F (no rounding happens in F::round). Exact unless the error underflows F.
template <typename F>
LEANOPS_HOST_DEVICE Pair two_prod(float a, float b) {
  const float p = mul<F>(a, b);
  return {p, F::round(fma_rn(a, b, -p))};
}

// Collage's Grow: add v into the pair (hi, lo), renormalised with Fast2Sum so that |lo'| <= ulp(hi')/2.
template <typename F>
LEANOPS_HOST_DEVICE Pair grow(float hi, float lo, float v) {
  const Pair sum = two_sum<F>(hi, v);
  return fast_two_sum<F>(sum.hi, add<F>(sum.lo, lo));
}

// Double-word times double-word: (hi + lo) * (b_hi + b_lo), dropping lo * b_lo (below the pair's precision).
template <typename F>
LEANOPS_HOST_DEVICE Pair scale(float hi, float lo, float b_hi, float b_lo) {
  const Pair product = two_prod<F>(hi, b_hi);
  const float cross = add<F>(mul<F>(hi, b_lo), mul<F>(lo, b_hi));
  return fast_two_sum<F>(product.hi, add<F>(product.lo, cross));
}

// Split a float32 into hi = fl_F(x) and lo = fl_F(x - hi); x - hi is exact in float32 (Sterbenz).
template <typename F>
LEANOPS_HOST_DEVICE Pair split(float x) {
  const float hi = F::round(x);
  return {hi, F::round(sub_rn(x, hi))};
}

// The float32 nearest to hi + lo.
LEANOPS_HOST_DEVICE float merge(float hi, float lo) { return add_rn(hi, lo); }

}  // namespace eft
}  // namespace leanops
