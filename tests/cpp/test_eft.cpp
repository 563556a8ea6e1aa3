// Host unit tests of the error-free transformations in csrc/include/leanops/eft.h, for float32, bfloat16 and float16.
//
// No test framework and no torch: this builds with any C++17 compiler, so the numerics core can be checked where
// libtorch is missing. Build it with the project's exactness flags (-ffp-contract=off, no fast-math), as CMake does.
//
// The reference for every check is independent of eft.h: `reference_round` below rounds a real number, given as an
// exact double-double hi + lo, to a format described only by its precision and exponent range, using frexp-free
// scaling and nearbyint (ties to even under the default rounding mode). Exactness is checked through canonical
// double-double sums: a + b == s + e exactly iff TwoSum in double of (a, b) equals TwoSum in double of (s, e),
// because TwoSum of two doubles is exact and its result (fl(x), x - fl(x)) depends only on the real x.
#include <algorithm>
#include <cfloat>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>

#include "leanops/eft.h"

namespace {

using leanops::eft::BFloat16Format;
using leanops::eft::Float16Format;
using leanops::eft::Float32Format;
using leanops::eft::Pair;

// ---------------------------------------------------------------------------------------------------------------
// Bookkeeping: every check counts; the first few failures of each kind are printed, the rest only counted.

struct Tally {
  long passed = 0;
  long failed = 0;
};
Tally tally;

constexpr int kFailuresPrintedPerCheck = 8;

struct Check {
  std::string name;
  int failures_printed = 0;

  explicit Check(std::string check_name) : name(std::move(check_name)) {}

  // Records one check; on failure prints `detail` (printf format) for the first few.
  bool expect(bool condition, const char* detail_format = nullptr, ...) __attribute__((format(printf, 3, 4)));
};

bool Check::expect(bool condition, const char* detail_format, ...) {
  if (condition) {
    ++tally.passed;
    return true;
  }
  ++tally.failed;
  if (failures_printed < kFailuresPrintedPerCheck) {
    ++failures_printed;
    std::printf("FAIL %s", name.c_str());
    if (detail_format != nullptr) {
      std::printf(": ");
      va_list arguments;
      va_start(arguments, detail_format);
      std::vprintf(detail_format, arguments);
      va_end(arguments);
    }
    std::printf("\n");
  } else if (failures_printed == kFailuresPrintedPerCheck) {
    ++failures_printed;
    std::printf("FAIL %s: further failures of this check are counted, not printed\n", name.c_str());
  }
  return false;
}

// Same value, treating all NaNs as equal and telling +0 from -0 apart (a rounding must keep the sign of zero).
bool same_float(double x, double y) {
  if (std::isnan(x) || std::isnan(y)) return std::isnan(x) && std::isnan(y);
  return x == y && std::signbit(x) == std::signbit(y);
}

// ---------------------------------------------------------------------------------------------------------------
// The reference: formats described by their parameters alone, and correct rounding of an exact double-double.

struct FormatParameters {
  const char* name;
  int precision;        // significand bits, the implicit one included
  int min_exponent;     // exponent of the smallest normal number: below it the quantum stays fixed (subnormals)
  double max_finite;    // largest finite value
};

template <typename F>
FormatParameters parameters_of();
template <>
FormatParameters parameters_of<Float32Format>() {
  return {"float32", 24, -126, static_cast<double>(FLT_MAX)};
}
template <>
FormatParameters parameters_of<BFloat16Format>() {
  return {"bfloat16", 8, -126, std::ldexp(255.0, 120)};  // (2 - 2^-7) * 2^127
}
template <>
FormatParameters parameters_of<Float16Format>() {
  return {"float16", 11, -14, 65504.0};
}

// The value of hi + lo rounded to nearest (ties to even) in `format`, where |lo| <= ulp_double(hi) / 2 (a canonical
// double-double; lo == 0 for a plain double). Rounding happens with an unbounded exponent first, then anything
// beyond the largest finite value becomes infinity: that is IEEE 754 overflow under round-to-nearest.
double reference_round(double hi, double lo, const FormatParameters& format) {
  if (std::isnan(hi) || std::isinf(hi) || hi == 0.0) return hi;
  const int exponent = std::max(std::ilogb(hi), format.min_exponent);
  const double quantum = std::ldexp(1.0, exponent - (format.precision - 1));
  const double in_quanta = hi / quantum;  // exact: division by a power of two, far from over- and underflow
  double rounded_quanta = std::nearbyint(in_quanta);
  // F's precision is far below double's, so lo can only matter when hi sits exactly half-way between two F values.
  if (lo != 0.0 && in_quanta - std::floor(in_quanta) == 0.5) {
    rounded_quanta = lo > 0.0 ? std::ceil(in_quanta) : std::floor(in_quanta);
  }
  const double rounded = rounded_quanta * quantum;
  if (std::fabs(rounded) > format.max_finite) return std::copysign(INFINITY, hi);
  return rounded;
}

double reference_round(double x, const FormatParameters& format) { return reference_round(x, 0.0, format); }

struct DoubleDouble {
  double hi;
  double lo;
};

// Knuth's TwoSum in double: hi + lo == a + b exactly (no overflow here: all operands are far below DBL_MAX).
DoubleDouble exact_sum(double a, double b) {
  const double sum = a + b;
  const double b_virtual = sum - a;
  const double a_virtual = sum - b_virtual;
  return {sum, (a - a_virtual) + (b - b_virtual)};
}

bool same_real(const DoubleDouble& x, const DoubleDouble& y) { return x.hi == y.hi && x.lo == y.lo; }

// Units in the last place of a nonzero F value x.
double ulp(double x, const FormatParameters& format) {
  const int exponent = std::max(std::ilogb(x), format.min_exponent);
  return std::ldexp(1.0, exponent - (format.precision - 1));
}

// ---------------------------------------------------------------------------------------------------------------
// Deterministic random numbers (splitmix64): the same operands on every run and every machine.

struct SplitMix64 {
  uint64_t state;

  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1p-53; }
  int integer_in(int low, int high) { return low + static_cast<int>(next() % static_cast<uint64_t>(high - low + 1)); }
  bool coin() { return (next() >> 63) != 0; }
};

// A random F value: sign, binary exponent in [min_exponent, max_exponent] and significand all uniform. Exponents
// below the format's normal range give subnormals (or zero), which the operand mix needs too.
template <typename F>
float random_value(SplitMix64& random, int min_exponent, int max_exponent) {
  const double magnitude = std::ldexp(1.0 + random.uniform(), random.integer_in(min_exponent, max_exponent));
  return static_cast<float>(reference_round(random.coin() ? -magnitude : magnitude, parameters_of<F>()));
}

// Operands for sums: a quarter are near-cancelling (b close to -a, agreeing in up to precision + 4 leading bits), a
// quarter are of the same magnitude, the rest independent (which also gives exponent gaps far beyond the precision).
template <typename F>
void random_sum_operands(SplitMix64& random, int min_exponent, int max_exponent, float* a, float* b) {
  const FormatParameters format = parameters_of<F>();
  *a = random_value<F>(random, min_exponent, max_exponent);
  switch (random.integer_in(0, 3)) {
    case 0: {
      const int agreeing_bits = random.integer_in(0, format.precision + 4);
      const double perturbation = std::ldexp(random.uniform() - 0.5, -agreeing_bits);
      *b = static_cast<float>(reference_round(-static_cast<double>(*a) * (1.0 + perturbation), format));
      break;
    }
    case 1: {
      const int exponent = *a == 0.0f ? min_exponent : std::ilogb(*a);
      *b = random_value<F>(random, exponent, exponent);
      break;
    }
    default:
      *b = random_value<F>(random, min_exponent, max_exponent);
  }
}

bool representable(float x, const FormatParameters& format) {
  return same_float(reference_round(x, format), x);
}

// ---------------------------------------------------------------------------------------------------------------
// Rounding functions at known values.

float float_from_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

template <typename F>
void expect_rounds_to(Check& check, float input, float expected) {
  const float got = F::round(input);
  check.expect(same_float(got, expected), "round(%.9g) = %.9g, expected %.9g", input, got, expected);
}

void test_bfloat16_round_known_values() {
  Check check("BFloat16Format::round known values");
  using F = BFloat16Format;
  // Near 1 the bfloat16 spacing is 2^-7: 1 + 2^-8 is the tie between 1 (even) and 1 + 2^-7 (odd significand).
  expect_rounds_to<F>(check, 1.0f + 0x1p-8f, 1.0f);
  expect_rounds_to<F>(check, -(1.0f + 0x1p-8f), -1.0f);
  expect_rounds_to<F>(check, 1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-6f);  // tie between 1 + 2^-7 (odd) and 1 + 2^-6 (even)
  expect_rounds_to<F>(check, -(1.0f + 3 * 0x1p-8f), -(1.0f + 0x1p-6f));
  expect_rounds_to<F>(check, 1.0f + 0x1p-8f + 0x1p-20f, 1.0f + 0x1p-7f);  // just above the tie
  expect_rounds_to<F>(check, 1.0f + 0x1p-8f - 0x1p-20f, 1.0f);            // just below the tie
  expect_rounds_to<F>(check, 1.0f + 0x1p-7f, 1.0f + 0x1p-7f);             // representable values stay
  expect_rounds_to<F>(check, 2.0f - 0x1p-9f, 2.0f);                       // rounding up into the next binade
  expect_rounds_to<F>(check, 3.14159265f, 3.140625f);
  expect_rounds_to<F>(check, -3.14159265f, -3.140625f);
  expect_rounds_to<F>(check, 0.0f, 0.0f);
  expect_rounds_to<F>(check, -0.0f, -0.0f);
  // Overflow near FLT_MAX: the largest bfloat16 is (2 - 2^-7) * 2^127 (bits 0x7F7F); the tie above it goes to the
  // even neighbour, which is infinity.
  const float bfloat16_max = float_from_bits(0x7F7F0000u);
  expect_rounds_to<F>(check, bfloat16_max, bfloat16_max);
  expect_rounds_to<F>(check, float_from_bits(0x7F7F7FFFu), bfloat16_max);
  expect_rounds_to<F>(check, float_from_bits(0x7F7F8000u), INFINITY);
  expect_rounds_to<F>(check, FLT_MAX, INFINITY);
  expect_rounds_to<F>(check, -FLT_MAX, -INFINITY);
  expect_rounds_to<F>(check, INFINITY, INFINITY);
  expect_rounds_to<F>(check, -INFINITY, -INFINITY);
  // Subnormal floats: bfloat16 keeps the top 7 fraction bits, ties to even as anywhere else.
  expect_rounds_to<F>(check, float_from_bits(0x00018000u), float_from_bits(0x00020000u));
  expect_rounds_to<F>(check, float_from_bits(0x00028000u), float_from_bits(0x00020000u));
  expect_rounds_to<F>(check, float_from_bits(0x00008000u), 0.0f);
  expect_rounds_to<F>(check, float_from_bits(0x80008001u), float_from_bits(0x80010000u));
  // NaN stays NaN, including a payload whose bit pattern a naive round-by-adding would carry into infinity.
  expect_rounds_to<F>(check, NAN, NAN);
  expect_rounds_to<F>(check, float_from_bits(0x7F800001u), NAN);
  expect_rounds_to<F>(check, float_from_bits(0xFFFFFFFFu), NAN);
}

void test_float16_round_known_values() {
  Check check("Float16Format::round known values");
  using F = Float16Format;
  // Near 1 the float16 spacing is 2^-10.
  expect_rounds_to<F>(check, 1.0f + 0x1p-11f, 1.0f);
  expect_rounds_to<F>(check, -(1.0f + 0x1p-11f), -1.0f);
  expect_rounds_to<F>(check, 1.0f + 3 * 0x1p-11f, 1.0f + 0x1p-9f);
  expect_rounds_to<F>(check, -(1.0f + 3 * 0x1p-11f), -(1.0f + 0x1p-9f));
  expect_rounds_to<F>(check, 1.0f + 0x1p-11f + 0x1p-20f, 1.0f + 0x1p-10f);
  expect_rounds_to<F>(check, 2047.5f, 2048.0f);  // tie between 2047 (odd) and 2048 (even)
  expect_rounds_to<F>(check, 2049.0f, 2048.0f);  // spacing 2 above 2048: tie between 2048 (even) and 2050 (odd)
  expect_rounds_to<F>(check, 2051.0f, 2052.0f);
  expect_rounds_to<F>(check, 0.1f, 0.0999755859375f);
  expect_rounds_to<F>(check, -0.0f, -0.0f);
  // Overflow: 65504 is the largest float16; 65520, half-way to 65536, rounds to the even neighbour 2^16 = infinity.
  expect_rounds_to<F>(check, 65504.0f, 65504.0f);
  expect_rounds_to<F>(check, 65519.99f, 65504.0f);
  expect_rounds_to<F>(check, 65520.0f, INFINITY);
  expect_rounds_to<F>(check, -65520.0f, -INFINITY);
  expect_rounds_to<F>(check, -65504.0f, -65504.0f);
  expect_rounds_to<F>(check, 1.0e6f, INFINITY);
  expect_rounds_to<F>(check, FLT_MAX, INFINITY);
  expect_rounds_to<F>(check, -INFINITY, -INFINITY);
  // Subnormals: a fixed spacing of 2^-24 below 2^-14.
  expect_rounds_to<F>(check, 0x1p-14f, 0x1p-14f);                         // smallest normal
  expect_rounds_to<F>(check, 1023 * 0x1p-24f, 1023 * 0x1p-24f);           // largest subnormal
  expect_rounds_to<F>(check, 1023.5f * 0x1p-24f, 0x1p-14f);               // tie up into the normal range
  expect_rounds_to<F>(check, 0x1p-24f, 0x1p-24f);                         // smallest subnormal
  expect_rounds_to<F>(check, 0x1p-25f, 0.0f);                             // tie between 0 (even) and 2^-24
  expect_rounds_to<F>(check, -0x1p-25f, -0.0f);
  expect_rounds_to<F>(check, 0x1p-25f + 0x1p-40f, 0x1p-24f);
  expect_rounds_to<F>(check, 3 * 0x1p-25f, 2 * 0x1p-24f);                 // tie between 1 and 2 quanta
  expect_rounds_to<F>(check, -3 * 0x1p-25f, -2 * 0x1p-24f);
  expect_rounds_to<F>(check, 5 * 0x1p-25f, 2 * 0x1p-24f);                 // tie between 2 and 3 quanta
  expect_rounds_to<F>(check, 1.0e-8f, 0.0f);
  expect_rounds_to<F>(check, FLT_TRUE_MIN, 0.0f);
  expect_rounds_to<F>(check, NAN, NAN);
  expect_rounds_to<F>(check, -NAN, NAN);
  expect_rounds_to<F>(check, float_from_bits(0x7F800001u), NAN);
}

// F::round against the reference on random float32 bit patterns: every binade, subnormals, infinities and NaNs.
template <typename F>
void test_round_matches_reference_on_random_bits(SplitMix64& random, int count) {
  const FormatParameters format = parameters_of<F>();
  Check check(std::string(format.name) + " round matches the reference on random float32 bit patterns");
  for (int i = 0; i < count; ++i) {
    uint32_t bits = static_cast<uint32_t>(random.next());
    // Half of the patterns land on or next to a tie of F, where rounding mistakes hide.
    const int dropped_bits = Float32Format::significand_bits - format.precision;
    if (random.coin() && dropped_bits > 0) {
      const uint32_t tie = 1u << (dropped_bits - 1);
      bits = (bits & ~((tie << 1) - 1u)) | tie;
      bits += static_cast<uint32_t>(random.integer_in(-1, 1));
    }
    const float x = float_from_bits(bits);
    const double expected = reference_round(x, format);
    const float got = F::round(x);
    check.expect(same_float(got, expected), "bits 0x%08" PRIx32 " (%.9g): got %.9g, expected %.9g", bits, x, got,
                 expected);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Error-free transformations on random operands.

// Binary exponent ranges for random sum operands: wide, subnormals included, and far enough below the largest
// finite value that a + b cannot overflow.
template <typename F>
void sum_exponent_range(int* low, int* high);
template <>
void sum_exponent_range<Float32Format>(int* low, int* high) { *low = -149, *high = 120; }
template <>
void sum_exponent_range<BFloat16Format>(int* low, int* high) { *low = -133, *high = 120; }
template <>
void sum_exponent_range<Float16Format>(int* low, int* high) { *low = -24, *high = 13; }

// Exponent ranges for product operands: the product stays finite and its rounding error stays above F's smallest
// subnormal, which TwoProd needs to be exact.
template <typename F>
void product_exponent_range(int* low, int* high);
template <>
void product_exponent_range<Float32Format>(int* low, int* high) { *low = -50, *high = 60; }
template <>
void product_exponent_range<BFloat16Format>(int* low, int* high) { *low = -55, *high = 60; }
template <>
void product_exponent_range<Float16Format>(int* low, int* high) { *low = -2, *high = 6; }

// Checks (s, e) for the operands (a, b) of an exact sum: s, e in F, s == fl_F(a + b), s + e == a + b exactly.
void expect_exact_sum(Check& check, const FormatParameters& format, float a, float b, Pair result) {
  const DoubleDouble exact = exact_sum(a, b);
  const double correctly_rounded = reference_round(exact.hi, exact.lo, format);
  const bool ok = representable(result.hi, format) && representable(result.lo, format) &&
                  result.hi == correctly_rounded && same_real(exact_sum(result.hi, result.lo), exact);
  check.expect(ok, "a=%a b=%a: s=%a e=%a; correctly rounded sum %a, exact sum %a + %a", a, b, result.hi, result.lo,
               correctly_rounded, exact.hi, exact.lo);
}

template <typename F>
void test_two_sum(SplitMix64& random, int count) {
  const FormatParameters format = parameters_of<F>();
  Check inputs_check(std::string("two_sum<") + format.name + "> operands are representable");
  Check check(std::string("two_sum<") + format.name + ">");
  int low, high;
  sum_exponent_range<F>(&low, &high);
  for (int i = 0; i < count; ++i) {
    float a, b;
    random_sum_operands<F>(random, low, high, &a, &b);
    inputs_check.expect(F::round(a) == a && F::round(b) == b, "a=%a b=%a", a, b);
    expect_exact_sum(check, format, a, b, leanops::eft::two_sum<F>(a, b));
  }
}

template <typename F>
void test_fast_two_sum(SplitMix64& random, int count) {
  const FormatParameters format = parameters_of<F>();
  Check check(std::string("fast_two_sum<") + format.name + "> with |a| >= |b|");
  int low, high;
  sum_exponent_range<F>(&low, &high);
  for (int i = 0; i < count; ++i) {
    float a, b;
    random_sum_operands<F>(random, low, high, &a, &b);
    if (std::fabs(a) < std::fabs(b)) std::swap(a, b);
    expect_exact_sum(check, format, a, b, leanops::eft::fast_two_sum<F>(a, b));
  }
}

template <typename F>
void test_two_prod(SplitMix64& random, int count) {
  const FormatParameters format = parameters_of<F>();
  Check inputs_check(std::string("two_prod<") + format.name + "> operands are representable");
  Check check(std::string("two_prod<") + format.name + ">");
  int low, high;
  product_exponent_range<F>(&low, &high);
  for (int i = 0; i < count; ++i) {
    const float a = random_value<F>(random, low, high);
    const float b = random_value<F>(random, low, high);
    inputs_check.expect(F::round(a) == a && F::round(b) == b, "a=%a b=%a", a, b);
    // A product of two floats is exact in double: 2 * 24 significand bits fit in 53, and the exponent range too.
    const double exact_product = static_cast<double>(a) * static_cast<double>(b);
    const double correctly_rounded = reference_round(exact_product, format);
    const Pair result = leanops::eft::two_prod<F>(a, b);
    const DoubleDouble recombined = exact_sum(result.hi, result.lo);
    const bool ok = representable(result.hi, format) && representable(result.lo, format) &&
                    result.hi == correctly_rounded && recombined.hi == exact_product && recombined.lo == 0.0;
    check.expect(ok, "a=%a b=%a: p=%a e=%a; correctly rounded product %a, exact product %a", a, b, result.hi,
                 result.lo, correctly_rounded, exact_product);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Collage's grow and scale in bfloat16: the pair keeps what plain bfloat16 loses.

// Collage's Grow computed with the reference rounding: (s, e) = TwoSum(hi, v); Fast2Sum(s, fl(e + lo)). Every
// intermediate is an exact double-double, so this pins down the bits grow<F> must produce.
Pair reference_grow(float hi, float lo, float update, const FormatParameters& format) {
  const DoubleDouble exact = exact_sum(hi, update);
  const double sum = reference_round(exact.hi, exact.lo, format);
  const DoubleDouble sum_error = exact_sum(exact_sum(exact.hi, -sum).hi, exact.lo);  // (hi + v) - s, exactly
  const DoubleDouble error_plus_lo = exact_sum(sum_error.hi, lo);
  const double tail = reference_round(error_plus_lo.hi, error_plus_lo.lo + sum_error.lo, format);
  const DoubleDouble renormalized = exact_sum(sum, tail);
  const double new_hi = reference_round(renormalized.hi, renormalized.lo, format);
  return {static_cast<float>(new_hi), static_cast<float>((renormalized.hi - new_hi) + renormalized.lo)};
}

// Adds `steps` updates of relative size about 1e-4 to x = 1 in bfloat16, where every update is below half an ulp of
// x, so plain bfloat16 addition never moves. Checks every step against the reference and the normalisation
// |lo| <= ulp(hi) / 2; returns the relative miss of the realised change against the exact sum of the updates.
template <typename NextUpdate>
double grow_relative_miss(Check& check, int steps, NextUpdate next_update) {
  using F = BFloat16Format;
  const FormatParameters format = parameters_of<F>();
  const float x = 1.0f;
  float plain = x;
  Pair pair{x, 0.0f};
  double intended_move = 0.0;
  for (int step = 0; step < steps; ++step) {
    const float update = next_update();
    intended_move += update;
    plain = F::round(plain + update);
    const Pair expected = reference_grow(pair.hi, pair.lo, update, format);
    const Pair got = leanops::eft::grow<F>(pair.hi, pair.lo, update);
    const bool ok = same_float(got.hi, expected.hi) && same_float(got.lo, expected.lo) &&
                    std::fabs(got.lo) <= ulp(got.hi, format) / 2;
    if (!check.expect(ok, "step %d: grow(%a, %a, %a) = (%a, %a), reference (%a, %a), ulp(hi)/2 = %a", step, pair.hi,
                      pair.lo, update, got.hi, got.lo, expected.hi, expected.lo, ulp(got.hi, format) / 2)) {
      break;
    }
    pair = got;
  }
  check.expect(plain == x, "plain bfloat16 addition moved from %g to %g", x, plain);
  const double realised_move = (static_cast<double>(pair.hi) + pair.lo) - x;
  return std::fabs(realised_move - intended_move) / intended_move;
}

void test_grow_accumulates_small_updates_in_bfloat16(SplitMix64& random) {
  using F = BFloat16Format;
  constexpr int steps = 1000;
  {
    // Updates of varying size, as gradients are: the pair's rounding errors average out.
    Check check("grow<bfloat16> realises 1000 varied updates of about 1e-4 within 1%");
    const double miss = grow_relative_miss(check, steps, [&] { return F::round(1e-4f * (0.5f + random.uniform())); });
    check.expect(miss <= 0.01, "relative miss %.3g%%", 100 * miss);
  }
  {
    // One constant update, the adversarial case: lo resolves the sum only to ulp(lo)/2, up to 2^-17 of hi, and with
    // the same update that rounding error repeats with the same sign step after step (2.6% here).
    Check check("grow<bfloat16> realises 1000 constant updates of 1e-4 within 5%");
    const float update = F::round(1e-4f);
    const double miss = grow_relative_miss(check, steps, [&] { return update; });
    check.expect(miss <= 0.05, "relative miss %.3g%%", 100 * miss);
  }
}

void test_scale_compounds_a_split_factor_in_bfloat16() {
  using F = BFloat16Format;
  Check check("scale<bfloat16> compounds beta2 = 0.999 over 1000 steps");
  constexpr int steps = 1000;
  // beta2 is not a bfloat16 value (bfloat16 rounds 0.999 to 1): split it into a bfloat16 pair.
  const float beta_hi = F::round(0.999f);
  const float beta_lo = F::round(0.999f - beta_hi);
  Pair pair{1.0f, 0.0f};
  for (int step = 0; step < steps; ++step) pair = leanops::eft::scale<F>(pair.hi, pair.lo, beta_hi, beta_lo);
  const double expected = std::pow(0.999, steps);
  const double got = static_cast<double>(pair.hi) + pair.lo;
  check.expect(std::fabs(got - expected) <= 2e-3 * expected, "hi + lo = %.9g, expected 0.999^1000 = %.9g", got,
               expected);
  // Plain bfloat16 cannot even represent the factor: the product never moves.
  float plain = 1.0f;
  for (int step = 0; step < steps; ++step) plain = F::round(plain * F::round(0.999f));
  check.expect(plain == 1.0f, "plain bfloat16 scaling gave %g", plain);
}

template <typename F>
void test_format(SplitMix64& random) {
  constexpr int count = 200000;
  test_round_matches_reference_on_random_bits<F>(random, count);
  test_two_sum<F>(random, count);
  test_fast_two_sum<F>(random, count);
  test_two_prod<F>(random, count);
}

}  // namespace

int main() {
  SplitMix64 random{0x1EA40F5u};
  test_bfloat16_round_known_values();
  test_float16_round_known_values();
  test_format<Float32Format>(random);
  test_format<BFloat16Format>(random);
  test_format<Float16Format>(random);
  test_grow_accumulates_small_updates_in_bfloat16(random);
  test_scale_compounds_a_split_factor_in_bfloat16();
  std::printf("test_eft: %ld passed, %ld failed\n", tally.passed, tally.failed);
  return tally.failed == 0 ? 0 : 1;
}
