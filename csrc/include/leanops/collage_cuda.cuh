// Collage AdamW's per-element step for the CUDA kernel (csrc/cuda/collage.cu), two neighbouring elements at a time:
// the same operations as leanops/collage.h's step, in the same order, on each of the two lanes, with cheaper
// conversions between the 16-bit storage formats and float32. Bit for bit collage::step: tests/collage/
// test_collage_sass.py compiles this header for the host, where the conversions fall back to collage.h's own, and
// compares step_pair with collage::step on every input class; on the device the conversions are the same
// round-to-nearest-even conversions collage.h's device F::round takes (__float2bfloat16_rn / __float2half_rn),
// two at a time or into a word, and NaN comes out as the same canonical NaN.
//
// Why (SASS for sm_90, ptxas of CUDA 13): collage.h's device F::round is a conversion then a widening (F2F.BF16.F32
// + SHL: two instructions per rounding, 13 (light) to 32 (plus) roundings per element), and packing eight 16-bit
// results into a 16-byte store took a PRMT and a shift per value. Here:
//   - bfloat16: F(x) = the word of cvt.rn.bf16x2.f32 d, x, 0 (x rounded into the high half, +0 in the low half),
//     read as a float32: ONE instruction (F2FP) per rounding, and no more conversions than before on Hopper's
//     conversion unit, whose throughput is low; a stored word is one PRMT of two F values;
//   - float16: the two lanes rounded by one cvt.rn.f16x2.f32 (the word the kernel stores) and widened by HADD2.F32
//     (which reads either half in place): one and a half instructions per rounding;
//   - a loaded word's two values widen with one instruction each (a shift or a mask; HADD2.F32 for float16).
// The kernel's vector loop went from 108 (bfloat16 light) / 167 (bfloat16 plus) SASS instructions per element to 85
// / 124 (collage.cu's header has every variant). Below about 122 for plus, the arithmetic itself would have to change:
// each F operation is a float32 operation and a rounding (32 of them in plus), and the divisions and the square root
// take about 40 instructions; computing the F operations in 16-bit instructions (HADD2.BF16 and the like, exact by the
// same double-rounding argument as eft.h's) would, but it is not what collage.h does.
#pragma once

#include <cstdint>

#include "leanops/collage.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace leanops {
namespace collage {
namespace pairs {

// Two neighbouring elements: lo is the even one (the low half of a 32-bit word of two 16-bit values), hi the odd one.
struct Lanes {
  float lo;
  float hi;
};

LEANOPS_HOST_DEVICE Lanes add_rn(Lanes a, Lanes b) { return {eft::add_rn(a.lo, b.lo), eft::add_rn(a.hi, b.hi)}; }
LEANOPS_HOST_DEVICE Lanes sub_rn(Lanes a, Lanes b) { return {eft::sub_rn(a.lo, b.lo), eft::sub_rn(a.hi, b.hi)}; }
LEANOPS_HOST_DEVICE Lanes mul_rn(Lanes a, Lanes b) { return {eft::mul_rn(a.lo, b.lo), eft::mul_rn(a.hi, b.hi)}; }
LEANOPS_HOST_DEVICE Lanes mul_rn(float a, Lanes b) { return {eft::mul_rn(a, b.lo), eft::mul_rn(a, b.hi)}; }
LEANOPS_HOST_DEVICE Lanes add_rn(Lanes a, float b) { return {eft::add_rn(a.lo, b), eft::add_rn(a.hi, b)}; }
LEANOPS_HOST_DEVICE Lanes div_rn(Lanes a, float b) { return {eft::div_rn(a.lo, b), eft::div_rn(a.hi, b)}; }
LEANOPS_HOST_DEVICE Lanes div_rn(Lanes a, Lanes b) { return {eft::div_rn(a.lo, b.lo), eft::div_rn(a.hi, b.hi)}; }
LEANOPS_HOST_DEVICE Lanes sqrt_rn(Lanes a) { return {eft::sqrt_rn(a.lo), eft::sqrt_rn(a.hi)}; }

// ---------------------------------------------------------------------------------------------------------------
// Storage formats as 32-bit words of two values. widen: the word's two values as float32 (exact). round: F of each
// lane, as float32 (Format::round's value). rounded: F of each lane, and the word of the two (what the kernel
// stores). word: the word of two F values (exact).

#if !defined(__CUDA_ARCH__)
// Host fallbacks (the host test of this header): IEEE binary16 bits <-> float, for F values (exact).
inline float half_bits_to_float(uint32_t bits) {
  const uint32_t sign = (bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  const uint32_t mantissa = bits & 0x3FFu;
  float magnitude;
  if (exponent == 0x1Fu) {
    magnitude = mantissa == 0 ? eft::float_from_bits(0x7F800000u) : eft::float_from_bits(0x7FC00000u);
  } else if (exponent == 0) {
    magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;  // subnormal: mantissa * 2^-24, exact
  } else {
    magnitude = eft::float_from_bits(((exponent + 112u) << 23) | (mantissa << 13));
  }
  return eft::float_from_bits(eft::float_bits(magnitude) | sign);
}

inline uint32_t float_to_half_bits(float x) {  // x is a float16 value (or NaN, which becomes 0x7E00)
  const uint32_t bits = eft::float_bits(x);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return 0x7E00u;
  if (magnitude == 0x7F800000u) return sign | 0x7C00u;
  const int exponent = static_cast<int>(magnitude >> 23) - 127;
  if (exponent < -14) {  // subnormal or zero: a whole number of 2^-24
    return sign | static_cast<uint32_t>(eft::float_from_bits(magnitude) * 16777216.0f);
  }
  return sign | (static_cast<uint32_t>(exponent + 15) << 10) | ((magnitude >> 13) & 0x3FFu);
}
#endif

struct BFloat16Words {
  using Format = eft::BFloat16Format;

  LEANOPS_HOST_DEVICE static Lanes widen(uint32_t word) {
    return {eft::float_from_bits(word << 16), eft::float_from_bits(word & 0xFFFF0000u)};
  }

  LEANOPS_HOST_DEVICE static float round(float x) {
#if defined(__CUDA_ARCH__)
    // cvt.rn.bf16x2.f32 d, x, 0: bfloat16(x) (round to nearest even) in the high half, +0 in the low half.
    uint32_t word;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(word) : "f"(x), "f"(0.0f));
    return __uint_as_float(word);
#else
    return Format::round(x);
#endif
  }

  LEANOPS_HOST_DEVICE static Lanes round(Lanes x) { return {round(x.lo), round(x.hi)}; }

  // The high halves of the two float32 (bfloat16 values: their low halves are zero), by one PRMT (an integer
  // instruction: it leaves the conversion unit, whose throughput is low on Hopper, to the roundings).
  LEANOPS_HOST_DEVICE static uint32_t word(Lanes x) {
#if defined(__CUDA_ARCH__)
    return __byte_perm(__float_as_uint(x.lo), __float_as_uint(x.hi), 0x7632);
#else
    return (eft::float_bits(x.hi) & 0xFFFF0000u) | (eft::float_bits(x.lo) >> 16);
#endif
  }

  LEANOPS_HOST_DEVICE static Lanes rounded(Lanes x, uint32_t& stored) {
    const Lanes value = round(x);
    stored = word(value);
    return value;
  }
};

struct Float16Words {
  using Format = eft::Float16Format;

  LEANOPS_HOST_DEVICE static Lanes widen(uint32_t word) {
#if defined(__CUDA_ARCH__)
    __half2 pair;
    memcpy(&pair, &word, sizeof word);
    const float2 value = __half22float2(pair);  // HADD2.F32 reads either half in place
    return {value.x, value.y};
#else
    return {half_bits_to_float(word & 0xFFFFu), half_bits_to_float(word >> 16)};
#endif
  }

  LEANOPS_HOST_DEVICE static Lanes rounded(Lanes x, uint32_t& stored) {
#if defined(__CUDA_ARCH__)
    const __half2 pair = __floats2half2_rn(x.lo, x.hi);  // cvt.rn.f16x2.f32: lo in the low half
    memcpy(&stored, &pair, sizeof stored);
    return widen(stored);
#else
    const Lanes value = {Format::round(x.lo), Format::round(x.hi)};
    stored = float_to_half_bits(value.lo) | (float_to_half_bits(value.hi) << 16);
    return value;
#endif
  }

  LEANOPS_HOST_DEVICE static Lanes round(Lanes x) {
    uint32_t unused;
    return rounded(x, unused);
  }

  LEANOPS_HOST_DEVICE static uint32_t word(Lanes x) {
    uint32_t stored;
    rounded(x, stored);  // exact: x holds float16 values
    return stored;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Arithmetic in F on both lanes, and the error-free transformations of leanops/eft.h (the same operations in the
// same order).

template <typename W>
LEANOPS_HOST_DEVICE Lanes add(Lanes a, Lanes b) { return W::round(add_rn(a, b)); }
template <typename W>
LEANOPS_HOST_DEVICE Lanes sub(Lanes a, Lanes b) { return W::round(sub_rn(a, b)); }
template <typename W>
LEANOPS_HOST_DEVICE Lanes mul(Lanes a, Lanes b) { return W::round(mul_rn(a, b)); }

struct Pair {
  Lanes hi;
  Lanes lo;
};

// eft::two_sum.
template <typename W>
LEANOPS_HOST_DEVICE Pair two_sum(Lanes a, Lanes b) {
  const Lanes s = add<W>(a, b);
  const Lanes b_virtual = sub<W>(s, a);
  const Lanes a_virtual = sub<W>(s, b_virtual);
  const Lanes b_error = sub<W>(b, b_virtual);
  const Lanes a_error = sub<W>(a, a_virtual);
  return {s, add<W>(a_error, b_error)};
}

// eft::fast_two_sum.
template <typename W>
LEANOPS_HOST_DEVICE Pair fast_two_sum(Lanes a, Lanes b) {
  const Lanes s = add<W>(a, b);
  const Lanes b_virtual = sub<W>(s, a);
  return {s, sub<W>(b, b_virtual)};
}

// eft::fast_two_sum whose results the kernel stores: also their words.
template <typename W>
LEANOPS_HOST_DEVICE Pair fast_two_sum_stored(Lanes a, Lanes b, uint32_t& hi_word, uint32_t& lo_word) {
  const Lanes s = W::rounded(add_rn(a, b), hi_word);
  const Lanes b_virtual = sub<W>(s, a);
  return {s, W::rounded(sub_rn(b, b_virtual), lo_word)};
}

// eft::grow, storing the result.
template <typename W>
LEANOPS_HOST_DEVICE Pair grow_stored(Lanes hi, Lanes lo, Lanes v, uint32_t& hi_word, uint32_t& lo_word) {
  const Pair sum = two_sum<W>(hi, v);
  return fast_two_sum_stored<W>(sum.hi, add<W>(sum.lo, lo), hi_word, lo_word);
}

// collage::scale (with collage::two_prod_exact).
template <typename W>
LEANOPS_HOST_DEVICE Pair scale(Lanes hi, Lanes lo, float b_hi, float b_lo) {
  const Lanes exact = mul_rn(hi, Lanes{b_hi, b_hi});
  const Lanes p = W::round(exact);
  const Lanes e = W::round(sub_rn(exact, p));
  const Lanes cross = add<W>(mul<W>(hi, Lanes{b_lo, b_lo}), mul<W>(lo, Lanes{b_hi, b_hi}));
  return fast_two_sum<W>(p, add<W>(e, cross));
}

// The words of one step's state, read and written in place: theta, theta_lo, m, v, v_lo (unused unless Plus) hold
// two storage values each; g is the gradient's word.
struct Words {
  uint32_t theta;
  uint32_t theta_lo;
  uint32_t m;
  uint32_t v;
  uint32_t v_lo;
};

struct Outcomes {
  Lanes stored;
  Lanes delta;
};

// collage::step (step_moments, then step_update) on two elements.
template <typename W, bool Plus>
LEANOPS_HOST_DEVICE Outcomes step_pair(Words& words, uint32_t g_word, const Scalars& s) {
  const Lanes g = W::widen(g_word);
  // m32 = beta1 * m + (1 - beta1) * g; m = F(m32)
  const Lanes m = W::rounded(add_rn(mul_rn(s.beta1, W::widen(words.m)), mul_rn(s.one_minus_beta1, g)), words.m);
  // square_update = (1 - beta2) * (g * g)
  const Lanes square_update = mul_rn(s.one_minus_beta2, mul_rn(g, g));
  Lanes second;
  if (Plus) {
    // (v, v_lo) = scale((v, v_lo), (b_hi, b_lo)); (v, v_lo) = grow((v, v_lo), F(square_update))
    const Pair scaled = scale<W>(W::widen(words.v), W::widen(words.v_lo), s.beta2_hi, s.beta2_lo);
    const Pair grown = grow_stored<W>(scaled.hi, scaled.lo, W::round(square_update), words.v, words.v_lo);
    second = add_rn(grown.hi, grown.lo);
  } else {
    // v = F(beta2 * v + square_update)
    second = W::rounded(add_rn(mul_rn(s.beta2, W::widen(words.v)), square_update), words.v);
  }
  // first = m / c1; denominator = sqrt(second / c2) + eps
  const Lanes first = div_rn(m, s.bias_correction1);
  const Lanes denominator = add_rn(sqrt_rn(div_rn(second, s.bias_correction2)), s.eps);
  const Lanes quotient = div_rn(first, denominator);
  // before = theta + theta_lo; delta = -lr * (first / denominator + weight_decay * before). The parameter pair is
  // widened after the divisions: their slow paths are calls, across which the compiler keeps few values alive.
  const Lanes theta = W::widen(words.theta);
  const Lanes theta_lo = W::widen(words.theta_lo);
  const Lanes before = add_rn(theta, theta_lo);
  const Lanes delta = mul_rn(s.neg_lr, add_rn(quotient, mul_rn(s.weight_decay, before)));
  // (theta, theta_lo) = grow((theta, theta_lo), F(delta))
  const Pair updated = grow_stored<W>(theta, theta_lo, W::round(delta), words.theta, words.theta_lo);
  // stored = (theta' + theta_lo') - before
  return {sub_rn(add_rn(updated.hi, updated.lo), before), delta};
}

}  // namespace pairs
}  // namespace collage
}  // namespace leanops
