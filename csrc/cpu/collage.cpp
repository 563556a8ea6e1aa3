// CPU kernel of Collage AdamW's fused multi-tensor step (leanops::collage_adamw_step_; the math and the oracle are in
// python/leanops/reference/collage.py, the per-element step in leanops/collage.h).
//
// Every tensor of the lists is cut into chunks of kChunk elements (the last chunk of a tensor may be shorter), and
// at::parallel_for spreads the chunks of all the tensors over the threads. The telemetry is deterministic: each chunk
// sums its own elements in a fixed order (eight interleaved lanes, combined in lane order), and the chunks' partial
// sums are added in chunk order after the parallel loop, so the thread count does not change a bit of it.
//
// Rounding to bfloat16/float16 after every operation makes the step compute-bound on a CPU, so it is vectorised.
// A chunk goes tile by tile (kTile elements): a loop over the moments (step_moments), the tile's square roots in
// sqrtps instructions, a loop over the parameter pairs (step_update), then the telemetry. GCC vectorises both loops,
// given two things: no libm sqrtf call in them (it may set errno, which GCC will not vectorise; hence the separate
// square roots), and no branch (under -ftrapping-math GCC will not speculate a float operation out of one): the
// float16 rounding and conversions are written as blended bit masks (Float16FormatSelect, load, store), bit for bit
// eft::Float16Format's rounding and c10's conversions (checked for every input when written). Like the MCF kernels
// (csrc/cpu/mcf.cpp), the loops are compiled twice on x86-64, baseline (SSE2) and AVX2, chosen at run time. One core
// of an x86-64 VM (AVX2), 2^22 elements: bfloat16 ~300 M elements/s light, ~150 M plus; float16 ~100 M / ~50 M; the
// scalar loops managed ~8 M / ~3.5 M.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "leanops/collage_host.h"

namespace leanops {
namespace collage {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per unit of parallel work; fixed, so the sums do not depend on threads
constexpr int64_t kTile = 512;       // elements per inner loop, whose telemetry goes through a small buffer
constexpr int kLanes = 8;            // interleaved partial sums of the telemetry
static_assert(kChunk % kTile == 0 && kTile % kLanes == 0, "tiles of whole lanes");

#define LEANOPS_COLLAGE_INLINE inline __attribute__((always_inline))

// One tensor's operands (v_lo is null unless plus).
template <typename T>
struct Operands {
  T* theta;
  T* theta_lo;
  T* m;
  T* v;
  T* v_lo;
  const T* g;
};

// A chunk: elements [begin, end) of tensor `tensor`.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// One chunk's telemetry: sum s * delta, sum delta^2, count of lost updates.
struct Partial {
  double stored_dot_delta = 0.0;
  double delta_square = 0.0;
  int64_t lost = 0;
};

// c ? a : b on bits, as masks: no branch for GCC to sink a computation into (under -ftrapping-math it would not
// speculate a float operation back out of one, and the loop would not vectorise).
LEANOPS_COLLAGE_INLINE uint32_t blend(bool c, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  return (a & mask) | (b & ~mask);
}

// eft::Float16Format's host rounding, every operation unconditional and the cases blended, so that GCC vectorises
// the loops. The same value for every float32: the subnormal case's rint(y), 0 <= y < 2^10, is (y + 2^23) - 2^23 in
// round-to-nearest-even.
struct Float16FormatSelect {
  static constexpr int significand_bits = eft::Float16Format::significand_bits;
  LEANOPS_COLLAGE_INLINE static float round(float x) {
    const uint32_t bits = eft::float_bits(x);
    const uint32_t sign = bits & 0x80000000u;
    const float magnitude = eft::float_from_bits(bits & 0x7FFFFFFFu);
    const float subnormal = ((magnitude * 16777216.0f + 8388608.0f) - 8388608.0f) * 5.9604644775390625e-08f;
    const uint32_t normal = (bits + 0xFFFu + ((bits >> 13) & 1u)) & 0xFFFFE000u;
    uint32_t rounded = blend(magnitude < 6.103515625e-05f, eft::float_bits(subnormal) | sign, normal);
    rounded = blend(magnitude >= 65520.0f, sign | 0x7F800000u, rounded);
    return eft::float_from_bits(blend(x != x, bits, rounded));
  }
};

// The format the CPU loops compute with: the same roundings as F.
template <typename F>
struct CpuFormat {
  using type = F;
};
template <>
struct CpuFormat<eft::Float16Format> {
  using type = Float16FormatSelect;
};

// Exact conversions between the storage types and float32, written with selects (c10's float16 conversions keep
// GCC from vectorising). store's argument is a value of T's format (every updated value is), or NaN.
LEANOPS_COLLAGE_INLINE float load(c10::BFloat16 x) { return eft::float_from_bits(uint32_t{x.x} << 16); }

LEANOPS_COLLAGE_INLINE float load(c10::Half x) {
  const uint32_t h = x.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t magnitude = h & 0x7FFFu;
  const uint32_t normal = sign | ((magnitude << 13) + (112u << 23));  // rebias the exponent, 15 -> 127
  const uint32_t special = sign | 0x7F800000u | ((magnitude & 0x3FFu) << 13);  // infinity, NaN
  const float subnormal = static_cast<float>(static_cast<int32_t>(magnitude)) * 5.9604644775390625e-08f;  // exact
  const uint32_t small = eft::float_bits(subnormal) | sign;
  return eft::float_from_bits(blend(magnitude < 0x400u, small, blend(magnitude >= 0x7C00u, special, normal)));
}

template <typename T>
LEANOPS_COLLAGE_INLINE T store(float x);

template <>
LEANOPS_COLLAGE_INLINE c10::BFloat16 store<c10::BFloat16>(float x) {
  return c10::BFloat16(static_cast<uint16_t>(eft::float_bits(x) >> 16), c10::BFloat16::from_bits());
}

template <>
LEANOPS_COLLAGE_INLINE c10::Half store<c10::Half>(float x) {
  const uint32_t bits = eft::float_bits(x);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude_bits = bits & 0x7FFFFFFFu;
  const float magnitude = eft::float_from_bits(magnitude_bits);
  const uint32_t normal = (magnitude_bits - (112u << 23)) >> 13;
  const bool is_subnormal = magnitude < 6.103515625e-05f;
  // Only a subnormal's scaled magnitude (an integer below 2^10) is converted: no out-of-range conversion.
  const float scaled = eft::float_from_bits(blend(is_subnormal, magnitude_bits, 0u)) * 16777216.0f;
  const uint32_t subnormal = static_cast<uint32_t>(static_cast<int32_t>(scaled));
  uint32_t h = blend(is_subnormal, subnormal, normal);
  h = blend(magnitude_bits == 0x7F800000u, 0x7C00u, h);  // infinity
  h = blend(magnitude_bits > 0x7F800000u, 0x7E00u, h);   // NaN, as c10 converts it
  return c10::Half(static_cast<uint16_t>(sign | h), c10::Half::from_bits());
}

// x[0, n) = sqrt(x[0, n)), correctly rounded: vector instructions where there are (in the step's loops the square
// root would be a libm call that may set errno, which GCC does not vectorise).
LEANOPS_COLLAGE_INLINE void sqrt_tile_baseline(float* x, int64_t n) {
  int64_t j = 0;
#if defined(__x86_64__)
  for (; j + 4 <= n; j += 4) _mm_storeu_ps(x + j, _mm_sqrt_ps(_mm_loadu_ps(x + j)));
#endif
  for (; j < n; ++j) x[j] = eft::sqrt_rn(x[j]);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define LEANOPS_COLLAGE_HAVE_AVX2_CLONE 1
__attribute__((target("avx2,fma"), noinline)) void sqrt_tile_avx2(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, _mm256_sqrt_ps(_mm256_loadu_ps(x + j)));
  for (; j < n; ++j) x[j] = eft::sqrt_rn(x[j]);
}
#endif

// One chunk [begin, end) of one tensor, tile by tile: the moments (vectorised), the square roots, the parameter pair
// (vectorised), then the tile's telemetry into eight interleaved lanes.
template <typename F, typename T, bool Plus, bool Metrics, bool Avx>
LEANOPS_COLLAGE_INLINE void run_chunk_body(const Operands<T>& operands, int64_t begin, int64_t end,
                                           const Scalars& scalars, Partial* partial) {
  using CF = typename CpuFormat<F>::type;
  T* __restrict__ theta = operands.theta;
  T* __restrict__ theta_lo = operands.theta_lo;
  T* __restrict__ m = operands.m;
  T* __restrict__ v = operands.v;
  T* __restrict__ v_lo = operands.v_lo;
  const T* __restrict__ g = operands.g;
  const Scalars s = scalars;
  double stored_dot_delta[kLanes] = {};
  double delta_square[kLanes] = {};
  int64_t lost[kLanes] = {};
  alignas(64) float m_buffer[kTile];
  alignas(64) float root_buffer[kTile];
  alignas(64) float stored_buffer[kTile];
  alignas(64) float delta_buffer[kTile];
  for (int64_t tile = begin; tile < end; tile += kTile) {
    const int64_t n = std::min(kTile, end - tile);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = tile + j;
      float m_i = load(m[i]);
      float v_i = load(v[i]);
      float v_lo_i = Plus ? load(v_lo[i]) : 0.0f;
      root_buffer[j] = step_moments<CF, Plus>(m_i, v_i, v_lo_i, load(g[i]), s);
      m_buffer[j] = m_i;
      // Every updated value is an F value, so these conversions are exact.
      m[i] = store<T>(m_i);
      v[i] = store<T>(v_i);
      if (Plus) v_lo[i] = store<T>(v_lo_i);
    }
#ifdef LEANOPS_COLLAGE_HAVE_AVX2_CLONE
    if constexpr (Avx) {
      sqrt_tile_avx2(root_buffer, n);
    } else {
      sqrt_tile_baseline(root_buffer, n);
    }
#else
    sqrt_tile_baseline(root_buffer, n);
#endif
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = tile + j;
      float theta_i = load(theta[i]);
      float theta_lo_i = load(theta_lo[i]);
      const Outcome outcome = step_update<CF>(theta_i, theta_lo_i, m_buffer[j], root_buffer[j], s);
      theta[i] = store<T>(theta_i);
      theta_lo[i] = store<T>(theta_lo_i);
      if (Metrics) {
        stored_buffer[j] = outcome.stored;
        delta_buffer[j] = outcome.delta;
      }
    }
    if (Metrics) {
      // Pad to whole lanes with zeros, which add nothing (and count as no lost update).
      const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
      for (int64_t j = n; j < padded; ++j) {
        stored_buffer[j] = 0.0f;
        delta_buffer[j] = 0.0f;
      }
      for (int64_t j = 0; j < padded; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          const double stored = stored_buffer[j + l];
          const double delta = delta_buffer[j + l];
          stored_dot_delta[l] += stored * delta;  // exact products of two floats
          delta_square[l] += delta * delta;
          lost[l] += (stored_buffer[j + l] == 0.0f) & (delta_buffer[j + l] != 0.0f);
        }
      }
    }
  }
  if (Metrics) {
    Partial result;
    for (int l = 0; l < kLanes; ++l) {
      result.stored_dot_delta += stored_dot_delta[l];
      result.delta_square += delta_square[l];
      result.lost += lost[l];
    }
    *partial = result;
  }
}

template <typename F, typename T, bool Plus, bool Metrics>
void run_chunk_baseline(const Operands<T>& operands, int64_t begin, int64_t end, const Scalars& scalars,
                        Partial* partial) {
  run_chunk_body<F, T, Plus, Metrics, false>(operands, begin, end, scalars, partial);
}

#ifdef LEANOPS_COLLAGE_HAVE_AVX2_CLONE
// -ffp-contract=off holds in the clone too: no FMA is contracted (the step asks for none).
template <typename F, typename T, bool Plus, bool Metrics>
__attribute__((target("avx2,fma"))) void run_chunk_avx2(const Operands<T>& operands, int64_t begin, int64_t end,
                                                         const Scalars& scalars, Partial* partial) {
  run_chunk_body<F, T, Plus, Metrics, true>(operands, begin, end, scalars, partial);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <typename F, typename T, bool Plus, bool Metrics>
void run_chunks(const std::vector<Operands<T>>& operands, const std::vector<Chunk>& chunks, const Scalars& scalars,
                std::vector<Partial>& partials) {
  // Small steps stay on one thread: four chunks (64K elements) per task at least.
  constexpr int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / kChunk);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), grain, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& chunk = chunks[c];
      Partial* partial = Metrics ? &partials[c] : nullptr;
#ifdef LEANOPS_COLLAGE_HAVE_AVX2_CLONE
      if (cpu_has_avx2()) {
        run_chunk_avx2<F, T, Plus, Metrics>(operands[chunk.tensor], chunk.begin, chunk.end, scalars, partial);
        continue;
      }
#endif
      run_chunk_baseline<F, T, Plus, Metrics>(operands[chunk.tensor], chunk.begin, chunk.end, scalars, partial);
    }
  });
}

void collage_adamw_step_cpu(at::TensorList params, at::TensorList params_lo, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::TensorList exp_avg_sqs_lo, at::TensorList grads, double lr,
                            double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                            double bias_correction2, bool plus, const std::optional<at::Tensor>& metrics) {
  check_arguments(params, params_lo, exp_avgs, exp_avg_sqs, exp_avg_sqs_lo, grads, plus, metrics);
  const size_t n = params.size();
  if (n == 0) return;
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    total += numel;
    for (int64_t begin = 0; begin < numel; begin += kChunk) {
      chunks.push_back({static_cast<int64_t>(i), begin, std::min(begin + kChunk, numel)});
    }
  }
  const bool with_metrics = metrics.has_value();
  std::vector<Partial> partials(with_metrics ? chunks.size() : 0);
  dispatch_storage(params[0].scalar_type(), [&](auto format, auto storage) {
    using F = decltype(format);
    using T = decltype(storage);
    const Scalars scalars = make_scalars<T>(lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2);
    std::vector<Operands<T>> operands(n);
    for (size_t i = 0; i < n; ++i) {
      operands[i] = {params[i].mutable_data_ptr<T>(), params_lo[i].mutable_data_ptr<T>(),
                     exp_avgs[i].mutable_data_ptr<T>(), exp_avg_sqs[i].mutable_data_ptr<T>(),
                     plus ? exp_avg_sqs_lo[i].mutable_data_ptr<T>() : nullptr, grads[i].const_data_ptr<T>()};
    }
    if (plus && with_metrics) run_chunks<F, T, true, true>(operands, chunks, scalars, partials);
    if (plus && !with_metrics) run_chunks<F, T, true, false>(operands, chunks, scalars, partials);
    if (!plus && with_metrics) run_chunks<F, T, false, true>(operands, chunks, scalars, partials);
    if (!plus && !with_metrics) run_chunks<F, T, false, false>(operands, chunks, scalars, partials);
  });
  if (with_metrics) {
    // Chunk order: the same sums for any number of threads.
    double stored_dot_delta = 0.0;
    double delta_square = 0.0;
    int64_t lost = 0;
    for (const Partial& partial : partials) {
      stored_dot_delta += partial.stored_dot_delta;
      delta_square += partial.delta_square;
      lost += partial.lost;
    }
    auto accessor = metrics->accessor<double, 1>();
    accessor[0] += stored_dot_delta;
    accessor[1] += delta_square;
    accessor[2] += static_cast<double>(lost);
    accessor[3] += static_cast<double>(total);
  }
}

}  // namespace
}  // namespace collage
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CPU, m) { m.impl("collage_adamw_step_", &leanops::collage::collage_adamw_step_cpu); }
