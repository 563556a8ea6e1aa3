// Collage AdamW's per-element step for the CUDA kernel (csrc/cuda/collage.cu), two neighbouring elements at a time:
// the same operations as leanops/collage.h's step, in the same order, on each of the two lanes, with cheaper
// conversions between the 16-bit storage formats and float32, and the arithmetic in F of the MCF algorithms on
// 32-bit words of two F values. Bit for bit collage::step: tests/collage/test_collage_sass.py compiles this header
// for the host, where every packed helper falls back to collage.h's own operation (the float32 operation, then
// F::round), and compares step_pair with collage::step on every input class; on the device the conversions are the
// same round-to-nearest-even conversions collage.h's device F::round takes (__float2bfloat16_rn / __float2half_rn),
// two at a time or into a word, and NaN comes out as a NaN (payloads are not part of the contract).
//
// Arithmetic in F (collage.h / eft.h: an operation of two F values in float32, then rounded to F) is, on the device,
// one packed 16-bit instruction for both lanes: add.rn / sub.rn / mul.rn on bf16x2 (sm_90) or f16x2, which rounds
// the exact result once to F. The same bits: an add, sub or mul of two F values computed in float32 (p' = 24 bits)
// then rounded to F (p = 8 for bfloat16, 11 for float16) is correctly rounded whenever p' >= 2p + 2 (Figueroa, "When
// is double rounding innocuous?", 1995; products of two F values are even exact in float32), overflow to infinity,
// subnormals (neither instruction flushes them without .ftz) and signed zeros included;
// tests/collage/test_collage_packed_rounding.py checks the equivalence on every class of operands with exact
// arithmetic. Each chain of such operations keeps its two lanes in one 32-bit word: two_sum, fast_two_sum, grow, and
// scale's cross terms, which is every F operation of the step. What is not an F operation of two F values stays
// float32, as collage.h has it: scale's two_prod_exact (the exact float32 product and round(exact - p)), the moments
// (F(beta1 * m + (1 - beta1) * g), F(beta2 * v + square_update): float32 expressions rounded once), the divisions, the
// square root and delta. No expression becomes a packed fma (the double rounding of an fma is not covered): ptxas
// only turns an add or sub into HFMA2 a, 1, b and a mul into HFMA2 a, b, -0, exact rewrites.
//
// Why (SASS for sm_90, ptxas of CUDA 13):
//   - one packed instruction does the operation and the rounding of two elements, where a float32 operation and a
//     rounding took two instructions per element (four per pair): the plus step has 27 F operations per element;
//   - bfloat16: F(x) of a float32 = the word of cvt.rn.bf16x2.f32 d, x, 0 (x rounded into the high half, +0 in the
//     low half), read as a float32: ONE instruction (F2FP) per rounding; the word of two roundings is one
//     cvt.rn.bf16x2.f32 of both (round_word); a stored word of two F values is one PRMT;
//   - float16: the two lanes rounded by one cvt.rn.f16x2.f32 (the word the kernel stores) and widened by HADD2.F32
//     (which reads either half in place);
//   - a loaded word's two values widen with one instruction each (a shift or a mask; HADD2.F32 for float16).
// SASS instructions per element of the kernel's vector loop, hot (without the division / square-root slow-path
// stubs), without telemetry (collage.cu's header has every variant):
//                      float32 ops + F::round   packed conversions (before)   packed arithmetic (now)
//     bfloat16 light   108.2                    85.3                          68.8
//     bfloat16 plus    167.0                    124.4                         81.4
//     float16 light    100.2                    89.2                          68.8
//     float16 plus     157.2                    138.3                         81.4
// The rest is mostly the three divisions and the square root (about 40 instructions per element, nothing shared
// between the lanes) and the float32 expressions of the moments and of delta.
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

// add / sub / mul of two words of two F values, each lane rounded once to F: one packed PTX instruction on the
// device (`type` "bf16x2" or "f16x2": add.rn / sub.rn / mul.rn, sm_90, no .ftz: subnormals kept); on the host the
// float32 operation then the rounding, which is what collage.h computes and what the device instruction equals
// (the header comment; tests/collage/test_collage_packed_rounding.py). Expanded inside each storage format's struct,
// which provides widen and round_word.
#if defined(__CUDA_ARCH__)
#define LEANOPS_PACKED_F_OPERATION(name, type)                                     \
  LEANOPS_HOST_DEVICE static uint32_t name(uint32_t a, uint32_t b) {               \
    uint32_t d;                                                                    \
    asm(#name ".rn." type " %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));              \
    return d;                                                                      \
  }
#else
#define LEANOPS_PACKED_F_OPERATION(name, type)                                     \
  LEANOPS_HOST_DEVICE static uint32_t name(uint32_t a, uint32_t b) {               \
    return round_word(name##_rn(widen(a), widen(b)));                              \
  }
#endif
#define LEANOPS_PACKED_F_ARITHMETIC(type) \
  LEANOPS_PACKED_F_OPERATION(add, type)   \
  LEANOPS_PACKED_F_OPERATION(sub, type)   \
  LEANOPS_PACKED_F_OPERATION(mul, type)

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

  // The word of F(x.lo), F(x.hi): one cvt.rn.bf16x2.f32 for both lanes (its first operand goes to the high half).
  LEANOPS_HOST_DEVICE static uint32_t round_word(Lanes x) {
#if defined(__CUDA_ARCH__)
    uint32_t stored;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(stored) : "f"(x.hi), "f"(x.lo));
    return stored;
#else
    return word(round(x));
#endif
  }

  // Arithmetic in F on words of two F values, each lane rounded once to bfloat16: add.rn / sub.rn / mul.rn.bf16x2
  // (sm_90; subnormals kept), the same bits as the float32 operation then the rounding (the host's fallback, and
  // collage.h's arithmetic): the header comment, and tests/collage/test_collage_packed_rounding.py.
  LEANOPS_PACKED_F_ARITHMETIC("bf16x2")
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

  // The word of F(x.lo), F(x.hi): one cvt.rn.f16x2.f32.
  LEANOPS_HOST_DEVICE static uint32_t round_word(Lanes x) {
    uint32_t stored;
    rounded(x, stored);
    return stored;
  }

  // Arithmetic in F on words of two F values, each lane rounded once to float16: add.rn / sub.rn / mul.rn.f16x2
  // (no .ftz: subnormals kept), the same bits as the float32 operation then the rounding (the host's fallback).
  LEANOPS_PACKED_F_ARITHMETIC("f16x2")
};

// ---------------------------------------------------------------------------------------------------------------
// The error-free transformations of leanops/eft.h (the same operations in the same order) on words of two F values:
// every operation of these chains is an operation in F of two F values, one packed instruction for both lanes.

struct Pair {
  uint32_t hi;
  uint32_t lo;
};

// eft::two_sum.
template <typename W>
LEANOPS_HOST_DEVICE Pair two_sum(uint32_t a, uint32_t b) {
  const uint32_t s = W::add(a, b);
  const uint32_t b_virtual = W::sub(s, a);
  const uint32_t a_virtual = W::sub(s, b_virtual);
  const uint32_t b_error = W::sub(b, b_virtual);
  const uint32_t a_error = W::sub(a, a_virtual);
  return {s, W::add(a_error, b_error)};
}

// eft::fast_two_sum.
template <typename W>
LEANOPS_HOST_DEVICE Pair fast_two_sum(uint32_t a, uint32_t b) {
  const uint32_t s = W::add(a, b);
  const uint32_t b_virtual = W::sub(s, a);
  return {s, W::sub(b, b_virtual)};
}

// eft::grow.
template <typename W>
LEANOPS_HOST_DEVICE Pair grow(uint32_t hi, uint32_t lo, uint32_t v) {
  const Pair sum = two_sum<W>(hi, v);
  return fast_two_sum<W>(sum.hi, W::add(sum.lo, lo));
}

// collage::scale (with collage::two_prod_exact, whose product and error stay float32: the exact product of two F
// values, and exact - p, each rounded once to F). b_hi, b_lo: the words of (b_hi, b_hi) and (b_lo, b_lo).
template <typename W>
LEANOPS_HOST_DEVICE Pair scale(uint32_t hi, uint32_t lo, float b_hi, uint32_t b_hi_word, uint32_t b_lo_word) {
  const Lanes hi_value = W::widen(hi);
  const Lanes exact = mul_rn(hi_value, Lanes{b_hi, b_hi});
  const uint32_t p = W::round_word(exact);
  const uint32_t e = W::round_word(sub_rn(exact, W::widen(p)));
  const uint32_t cross = W::add(W::mul(hi, b_lo_word), W::mul(lo, b_hi_word));
  return fast_two_sum<W>(p, W::add(e, cross));
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
    // (v, v_lo) = scale((v, v_lo), (b_hi, b_lo)); (v, v_lo) = grow((v, v_lo), F(square_update)). The words of the
    // scalars are the same for every pair (the compiler hoists them out of the loop).
    const Pair scaled = scale<W>(words.v, words.v_lo, s.beta2_hi, W::word(Lanes{s.beta2_hi, s.beta2_hi}),
                                 W::word(Lanes{s.beta2_lo, s.beta2_lo}));
    const Pair grown = grow<W>(scaled.hi, scaled.lo, W::round_word(square_update));
    words.v = grown.hi;
    words.v_lo = grown.lo;
    second = add_rn(W::widen(grown.hi), W::widen(grown.lo));
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
  const Lanes before = add_rn(W::widen(words.theta), W::widen(words.theta_lo));
  const Lanes delta = mul_rn(s.neg_lr, add_rn(quotient, mul_rn(s.weight_decay, before)));
  // (theta, theta_lo) = grow((theta, theta_lo), F(delta))
  const Pair updated = grow<W>(words.theta, words.theta_lo, W::round_word(delta));
  words.theta = updated.hi;
  words.theta_lo = updated.lo;
  // stored = (theta' + theta_lo') - before
  return {sub_rn(add_rn(W::widen(updated.hi), W::widen(updated.lo)), before), delta};
}

}  // namespace pairs
}  // namespace collage
}  // namespace leanops
