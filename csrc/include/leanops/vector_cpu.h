// Eight-lane float vectors and branch-free vector math for the CPU kernels' tile epilogues (csrc/cpu/*.cpp), and
// run_cloned, which runs a loop compiled twice: baseline (SSE2 on x86-64) and an AVX2 + FMA clone chosen at run time.
// Everything is force-inlined into its caller, so each clone gets its own instructions.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace leanops {
namespace cpu_vector {

constexpr float kInfinity = std::numeric_limits<float>::infinity();

#define LEANOPS_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------------------------------
// Eight-lane float vectors (GCC/Clang vector extensions). The compiler's own vectoriser cannot be relied on here:
// under the default -ftrapping-math it refuses to if-convert the selects that exp needs, and leaves the loops scalar.
// Written with explicit vectors, the baseline build lowers each operation to two SSE instructions and the AVX2
// clone to one.

// Every function returning a vector is internal and force-inlined, so the ABI warning GCC gives for returning
// 32-byte vectors without AVX does not apply (GCC reports it when it emits code, so the pragma covers the rest of
// every file that includes this header). Vectors are passed by reference, which has no such note.
#pragma GCC diagnostic ignored "-Wpsabi"

constexpr int kWidth = 8;
typedef float vfloat __attribute__((vector_size(kWidth * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kWidth * sizeof(int32_t))));  // also the type of a comparison

LEANOPS_INLINE vfloat splat(float value) { return vfloat{} + value; }
LEANOPS_INLINE vint splat_int(int32_t value) { return vint{} + value; }

LEANOPS_INLINE vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

LEANOPS_INLINE vint load_int(const int32_t* p) {
  vint v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The first n (1 <= n <= kWidth) values at p; the other lanes read as 0.
LEANOPS_INLINE vfloat load_partial(const float* p, int64_t n) {
  if (n == kWidth) return load(p);
  float lanes[kWidth] = {};
  std::memcpy(lanes, p, n * sizeof(float));
  return load(lanes);
}

LEANOPS_INLINE void store(float* p, const vfloat& v) { std::memcpy(p, &v, sizeof(v)); }

LEANOPS_INLINE void store_partial(float* p, const vfloat& v, int64_t n) {
  if (n == kWidth) {
    store(p, v);
    return;
  }
  float lanes[kWidth];
  store(lanes, v);
  std::memcpy(p, lanes, n * sizeof(float));
}

// The lane numbers 0 .. kWidth - 1.
LEANOPS_INLINE vint lane_index() { return vint{0, 1, 2, 3, 4, 5, 6, 7}; }

// Lanes [0, n) set.
LEANOPS_INLINE vint lanes_below(int64_t n) { return lane_index() < splat_int(static_cast<int32_t>(n)); }

// With a NaN in either operand these return b; a NaN input still reaches every sum through exp.
LEANOPS_INLINE vfloat max(const vfloat& a, const vfloat& b) { return a > b ? a : b; }
LEANOPS_INLINE vfloat min(const vfloat& a, const vfloat& b) { return a < b ? a : b; }
LEANOPS_INLINE vfloat abs(const vfloat& a) {
  return reinterpret_cast<vfloat>(reinterpret_cast<vint>(a) & 0x7fffffff);
}

LEANOPS_INLINE float horizontal_sum(const vfloat& v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

LEANOPS_INLINE float horizontal_max(const vfloat& v) {
  float m = v[0];
  for (int l = 1; l < kWidth; ++l) m = std::max(m, v[l]);
  return m;
}

// ---------------------------------------------------------------------------------------------------------------
// Branch-free math on vectors.

// e^x, within about 1 ulp (Cephes expf: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-7 polynomial).
// e^x below e^-87 (1.6e-38, about FLT_MIN) flushes to 0: the kernels only add such terms to sums that hold an
// e^0 = 1, and the flush keeps subnormal arithmetic, slow on x86, out of the loop. x > log(FLT_MAX) gives +inf; NaN gives NaN.
LEANOPS_INLINE vfloat exp(const vfloat& x) {
  constexpr float kLow = -87.0f;
  constexpr float kLogMax = 88.72283935f;  // log(FLT_MAX)
  // The clamp keeps n in [-126, 128] for any x, NaN included (a comparison with NaN is false: it yields kLow).
  const vfloat xc = min(max(x, splat(kLow)), splat(kLogMax));
  // n = round(x / ln 2): adding and subtracting 1.5 * 2^23 rounds to an integer without a call.
  const vfloat n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // r = x - n ln2 in two steps (Cody-Waite): 0.693359375 has 10 significant bits, so n times it is exact.
  vfloat r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vfloat exp_r = (p * (r * r) + r) + 1.0f;
  // 2^n as two normal factors, so that n = 128 (x near log(FLT_MAX)) fits the exponent field.
  const vint n_int = __builtin_convertvector(n, vint);
  const vint n_half = n_int >> 1;
  const vfloat two_to_half = reinterpret_cast<vfloat>((n_half + 127) << 23);
  const vfloat two_to_rest = reinterpret_cast<vfloat>((n_int - n_half + 127) << 23);
  vfloat y = exp_r * two_to_half * two_to_rest;
  y = x > kLogMax ? splat(kInfinity) : y;
  y = x < kLow ? splat(0.0f) : y;
  return x != x ? x : y;
}

// log(1 + u) for u in [0, 1], to about 1 ulp: 2 atanh(s) with s = u / (2 + u) in [0, 1/3], whose odd series
// converges fast and keeps full relative accuracy for tiny u (no rounding of 1 + u).
LEANOPS_INLINE vfloat log1p_unit(const vfloat& u) {
  const vfloat s = u / (u + 2.0f);
  const vfloat s2 = s * s;
  vfloat p = splat(1.0f / 13.0f);
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  const vfloat two_s = s * 2.0f;
  return two_s + two_s * (s2 * p);
}

// softplus(t) = log(1 + e^t) = max(t, 0) + log1p(e^-|t|): no overflow for large t, full accuracy for very negative t.
LEANOPS_INLINE vfloat softplus(const vfloat& t) { return max(t, splat(0.0f)) + log1p_unit(exp(-abs(t))); }

// sigmoid(u) = 1 / (1 + e^-u), through e^-|u| so that neither side overflows.
LEANOPS_INLINE vfloat sigmoid(const vfloat& u) {
  const vfloat e = exp(-abs(u));
  return (u >= 0.0f ? splat(1.0f) : e) / (e + 1.0f);
}

// tanh(x) to a few ulp (Cephes tanhf): an odd polynomial for |x| < 0.625, where 1 - 2 / (e^2|x| + 1) would cancel;
// beyond, 1 - 2 / (e^2|x| + 1) with the sign of x (e^2|x| = inf gives exactly 1). NaN gives NaN.
LEANOPS_INLINE vfloat tanh(const vfloat& x) {
  const vfloat a = abs(x);
  const vfloat s = x * x;
  vfloat p = splat(-5.70498872745e-3f);
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  const vfloat small = (p * s) * x + x;
  const vfloat large_abs = 1.0f - 2.0f / (exp(a + a) + 1.0f);
  const vfloat large = x < 0.0f ? -large_abs : large_abs;
  return a < 0.625f ? small : large;
}

// ---------------------------------------------------------------------------------------------------------------
// Code compiled twice: a functor whose operator() is force-inlined into both of these (the tile epilogues of
// csrc/cpu/contrastive.cpp and csrc/cpu/cross_entropy.cpp, the elementwise loops of csrc/cpu/mcf.cpp).

template <typename Functor>
void run_baseline(const Functor& functor) {
  functor();
}

#if defined(__x86_64__) && defined(__GNUC__)
#define LEANOPS_HAVE_AVX2_CLONE 1
// -ffp-contract=off still holds here: FMA instructions appear only where the code asks for one (eft.h's std::fma).
template <typename Functor>
__attribute__((target("avx2,fma"))) void run_avx2(const Functor& functor) {
  functor();
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

// Runs functor() in its AVX2 + FMA clone where the CPU has both, else in its baseline build.
template <typename Functor>
void run_cloned(const Functor& functor) {
#ifdef LEANOPS_HAVE_AVX2_CLONE
  if (cpu_has_avx2()) {
    run_avx2(functor);
    return;
  }
#endif
  run_baseline(functor);
}

}  // namespace cpu_vector
}  // namespace leanops
