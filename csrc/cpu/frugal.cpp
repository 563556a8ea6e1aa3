// CPU kernel of FRUGAL's fused split step (leanops::frugal_split_step_; the math and the oracle are in
// python/leanops/reference/frugal.py, the per-element step in leanops/frugal.h, the checks in leanops/frugal_host.h).
//
// Tensor by tensor; within a tensor at::parallel_for spreads the work over the threads: flat chunks of elements in
// ADAMW and FREE modes, whole rows of the matrix in COLUMNS and ROWS modes. Every element is independent, so the
// result does not depend on the thread count.
//
// Vectorised: a scalar loop over leanops/frugal.h's step_element (a branch per element on its mode and rule, libm
// square roots, c10 conversions) ran at about 3 ns an element, five times slower than the optimizer's plain-PyTorch
// step. Here each run of contiguous elements goes tile by tile (kTile elements): the tile's values are widened to
// float32 buffers, the step runs on eight-lane vectors (leanops/vector_cpu.h: GCC vector extensions, two SSE
// instructions an operation in the baseline build, one in the AVX2 clone chosen at run time), the square roots in
// sqrtps instructions, and the results are narrowed back. Each lane performs exactly frugal.h's float32 operations in
// its order (vector +, -, *, / are the IEEE operations, correctly rounded, and -ffp-contract=off holds for vectors
// too), so the bits are the scalar step's, the oracle's. In COLUMNS mode the state-full elements of a tile are
// gathered into compact buffers (their positions are the same on every row: listed once per task), stepped, and
// scattered back; the state-free rule runs on the whole tile under the state-full mask. 2-core x86-64 VM (AVX2),
// leanops.optim.FRUGAL on 8 x 512^2 parameters, density 0.25: float32 blockwise 0.95 ms (plain PyTorch 1.6 ms, the
// scalar loop 6.0 ms); bfloat16 with compensation 3.5 ms (5.9 ms); float16 with compensation 9.3 ms, still slower
// than plain PyTorch's 5.0 ms (whose conversions use F16C): its rounding is a dozen lane operations, ten per Grow.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "leanops/frugal_host.h"
#include "leanops/vector_cpu.h"

namespace leanops {
namespace frugal {
namespace {

namespace vec = cpu_vector;
using vec::vfloat;
using vec::vint;
typedef uint32_t vuint __attribute__((vector_size(vec::kWidth * sizeof(uint32_t))));

constexpr int64_t kGrain = 1 << 14;  // elements per unit of parallel work in the flat modes
constexpr int64_t kTile = 256;       // elements per tile: the buffers below stay in L1
constexpr int kWidth = vec::kWidth;
static_assert(kTile % kWidth == 0, "tiles of whole vectors");

// ---------------------------------------------------------------------------------------------------------------
// eft.h's formats and error-free transformations on vectors: the same operations lane by lane.

LEANOPS_INLINE vuint bits_of(const vfloat& x) { return reinterpret_cast<vuint>(x); }
LEANOPS_INLINE vfloat float_of(const vuint& x) { return reinterpret_cast<vfloat>(x); }

template <typename F>
struct VectorFormat;

template <>
struct VectorFormat<eft::Float32Format> {
  LEANOPS_INLINE static vfloat round(const vfloat& x) { return x; }
};

template <>
struct VectorFormat<eft::BFloat16Format> {
  // eft::BFloat16Format::round: nearest even on the bits (overflow carries into the exponent: infinity); NaN kept.
  LEANOPS_INLINE static vfloat round(const vfloat& x) {
    const vuint bits = bits_of(x);
    const vuint rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    return x != x ? x : float_of(rounded);
  }
};

template <>
struct VectorFormat<eft::Float16Format> {
  // eft::Float16Format::round's cases as lane selects (the subnormal case's rint(y), 0 <= y < 2^10, is
  // (y + 2^23) - 2^23 in round-to-nearest-even; scaling by powers of two is exact). Checked against
  // eft::Float16Format::round for every float32 when written. (GCC 12 lowers _Float16 vector conversions lane by
  // lane, which was slower still, and F16C intrinsics cannot be inlined into code compiled for two targets.)
  LEANOPS_INLINE static vfloat round(const vfloat& x) {
    const vuint bits = bits_of(x);
    const vuint sign = bits & 0x80000000u;
    const vfloat magnitude = float_of(bits & 0x7FFFFFFFu);
    const vfloat subnormal = ((magnitude * 16777216.0f + 8388608.0f) - 8388608.0f) * 5.9604644775390625e-08f;
    const vuint normal = (bits + 0xFFFu + ((bits >> 13) & 1u)) & 0xFFFFE000u;
    vuint rounded = magnitude < 6.103515625e-05f ? (bits_of(subnormal) | sign) : normal;
    rounded = magnitude >= 65520.0f ? (sign | 0x7F800000u) : rounded;
    return x != x ? x : float_of(rounded);
  }
};

template <typename R>
LEANOPS_INLINE vfloat add(const vfloat& a, const vfloat& b) { return R::round(a + b); }
template <typename R>
LEANOPS_INLINE vfloat sub(const vfloat& a, const vfloat& b) { return R::round(a - b); }

// eft::grow: (s, e) = two_sum(hi, v); fast_two_sum(s, e + lo), the operations in eft.h's order.
template <typename R>
LEANOPS_INLINE void grow(vfloat& hi, vfloat& lo, const vfloat& v) {
  const vfloat s = add<R>(hi, v);
  const vfloat b_virtual = sub<R>(s, hi);
  const vfloat a_virtual = sub<R>(s, b_virtual);
  const vfloat b_error = sub<R>(v, b_virtual);
  const vfloat a_error = sub<R>(hi, a_virtual);
  const vfloat e = add<R>(a_error, b_error);
  const vfloat t = add<R>(e, lo);
  const vfloat sum = add<R>(s, t);
  lo = sub<R>(t, sub<R>(sum, s));
  hi = sum;
}

// frugal.h's sign_keeping_nan: +-1, +0 for +-0, NaN for NaN.
LEANOPS_INLINE vfloat sign_keeping_nan(const vfloat& g) {
  const vfloat zero_or_nan = g != g ? g : vec::splat(0.0f);
  return g > 0.0f ? vec::splat(1.0f) : (g < 0.0f ? vec::splat(-1.0f) : zero_or_nan);
}

// ---------------------------------------------------------------------------------------------------------------
// Square roots of a buffer, correctly rounded, in vector instructions (a libm sqrtf call in a loop, which may set
// errno, keeps GCC from vectorising it). Chosen once per call: AVX2 where the CPU has it.

using SqrtBuffer = void (*)(float*, int64_t);

void sqrt_buffer_baseline(float* x, int64_t n) {
  int64_t j = 0;
#if defined(__x86_64__)
  for (; j + 4 <= n; j += 4) _mm_storeu_ps(x + j, _mm_sqrt_ps(_mm_loadu_ps(x + j)));
#endif
  for (; j < n; ++j) x[j] = eft::sqrt_rn(x[j]);
}

#ifdef LEANOPS_HAVE_AVX2_CLONE
__attribute__((target("avx2,fma"), noinline)) void sqrt_buffer_avx2(float* x, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, _mm256_sqrt_ps(_mm256_loadu_ps(x + j)));
  for (; j < n; ++j) x[j] = eft::sqrt_rn(x[j]);
}
#endif

SqrtBuffer choose_sqrt_buffer() {
#ifdef LEANOPS_HAVE_AVX2_CLONE
  if (vec::cpu_has_avx2()) return sqrt_buffer_avx2;
#endif
  return sqrt_buffer_baseline;
}

// ---------------------------------------------------------------------------------------------------------------
// Exact conversions between the storage types and float32, eight lanes at a time, the float16 ones as lane selects
// (c10's scalar conversions branch). Checked against c10's for every float16 when written. narrow's argument is a value of T's format, or NaN (which stays a NaN; its
// payload is not kept). `lanes` (1 .. kWidth) elements are read or written; the others read as 0.

typedef uint16_t vhalf __attribute__((vector_size(vec::kWidth * sizeof(uint16_t))));

LEANOPS_INLINE vuint load_bits16(const void* p, int64_t lanes) {
  vhalf v = {};
  if (lanes == vec::kWidth) {
    std::memcpy(&v, p, sizeof(v));  // a constant size: one load, not a call
  } else {
    std::memcpy(&v, p, static_cast<size_t>(lanes) * sizeof(uint16_t));
  }
  return __builtin_convertvector(v, vuint);
}

LEANOPS_INLINE void store_bits16(void* p, const vuint& bits, int64_t lanes) {
  const vhalf v = __builtin_convertvector(bits, vhalf);
  if (lanes == vec::kWidth) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    std::memcpy(p, &v, static_cast<size_t>(lanes) * sizeof(uint16_t));
  }
}

LEANOPS_INLINE vfloat widen(const float* p, int64_t lanes) { return vec::load_partial(p, lanes); }

LEANOPS_INLINE vfloat widen(const c10::BFloat16* p, int64_t lanes) { return float_of(load_bits16(p, lanes) << 16); }

LEANOPS_INLINE vfloat widen(const c10::Half* p, int64_t lanes) {
  const vuint h = load_bits16(p, lanes);
  const vuint sign = (h & 0x8000u) << 16;
  const vuint magnitude = h & 0x7FFFu;
  const vuint normal = sign | ((magnitude << 13) + (112u << 23));  // rebias the exponent, 15 -> 127
  const vuint special = sign | 0x7F800000u | ((magnitude & 0x3FFu) << 13);  // infinity, NaN
  const vfloat subnormal = __builtin_convertvector(reinterpret_cast<vint>(magnitude), vfloat) * 5.9604644775390625e-08f;
  const vuint small = bits_of(subnormal) | sign;  // exact: an integer below 2^10 times 2^-24
  return float_of(magnitude < 0x400u ? small : (magnitude >= 0x7C00u ? special : normal));
}

LEANOPS_INLINE void narrow(float* p, const vfloat& x, int64_t lanes) { vec::store_partial(p, x, lanes); }

LEANOPS_INLINE void narrow(c10::BFloat16* p, const vfloat& x, int64_t lanes) {
  store_bits16(p, x != x ? vuint{} + 0x7FC0u : bits_of(x) >> 16, lanes);
}

LEANOPS_INLINE void narrow(c10::Half* p, const vfloat& x, int64_t lanes) {
  const vuint bits = bits_of(x);
  const vuint sign = (bits >> 16) & 0x8000u;
  const vuint magnitude_bits = bits & 0x7FFFFFFFu;
  const vuint normal = (magnitude_bits - (112u << 23)) >> 13;
  const vint is_subnormal = float_of(magnitude_bits) < 6.103515625e-05f;
  // Only a subnormal's scaled magnitude (an integer below 2^10) is converted: no out-of-range conversion.
  const vfloat scaled = float_of(is_subnormal ? magnitude_bits : vuint{}) * 16777216.0f;
  const vuint subnormal = reinterpret_cast<vuint>(__builtin_convertvector(scaled, vint));
  vuint h = is_subnormal ? subnormal : normal;
  h = magnitude_bits == 0x7F800000u ? vuint{} + 0x7C00u : h;  // infinity
  h = magnitude_bits > 0x7F800000u ? vuint{} + 0x7E00u : h;   // NaN
  store_bits16(p, sign | h, lanes);
}

// ---------------------------------------------------------------------------------------------------------------
// One tile: up to kTile contiguous elements of a tensor, staged as float32 and padded with zeros to whole vectors
// (the padding lanes compute harmless values that are never stored).

struct alignas(64) Tile {
  float theta[kTile];
  float theta_lo[kTile];
  float g[kTile];
  float before[kTile];
  float work[kTile];
  // COLUMNS mode: the tile's state-full elements, gathered.
  float full_work[kTile];
  float full_g[kTile];
  float full_m[kTile];
  float full_v[kTile];
  float root[kTile];
};

LEANOPS_INLINE int64_t padded(int64_t n) { return (n + kWidth - 1) / kWidth * kWidth; }

// The step of one tile, for one parameter type T, gradient type G, format F, compensation and state-free rule.
template <typename T, typename G, typename F, bool Compensated, int64_t Rule>
struct TileStep {
  using R = VectorFormat<F>;
  const Operands<T, G>& o;
  const Scalars& s;
  const TensorScalars& t;
  SqrtBuffer sqrt_buffer;
  Tile& tile;

  // Widen elements [start, start + n) into the tile; work = before * decay, before = theta (+ theta_lo).
  LEANOPS_INLINE void load(int64_t start, int64_t n) const {
    const vfloat decay = vec::splat(s.decay);
    for (int64_t j = 0; j < n; j += kWidth) {
      const int64_t lanes = std::min<int64_t>(kWidth, n - j);
      const vfloat theta = widen(o.theta + start + j, lanes);
      vec::store(tile.theta + j, theta);
      vfloat before = theta;
      if (Compensated) {
        const vfloat theta_lo = widen(o.theta_lo + start + j, lanes);
        vec::store(tile.theta_lo + j, theta_lo);
        before = before + theta_lo;
      }
      vec::store(tile.g + j, widen(o.g + start + j, lanes));
      vec::store(tile.before + j, before);
      vec::store(tile.work + j, before * decay);
    }
  }

  // frugal.h's state_full_step on n elements: work[j] with gradient g[j] and the moments m[j], v[j] (updated in
  // place; n of them, not padded: the last vector is partial).
  LEANOPS_INLINE void adam(float* work, const float* g, float* m, float* v, int64_t n) const {
    const vfloat beta1 = vec::splat(s.beta1), one_minus_beta1 = vec::splat(s.one_minus_beta1);
    const vfloat beta2 = vec::splat(s.beta2), one_minus_beta2 = vec::splat(s.one_minus_beta2);
    for (int64_t j = 0; j < n; j += kWidth) {
      const int64_t lanes = std::min<int64_t>(kWidth, n - j);
      const vfloat g_j = vec::load(g + j);
      const vfloat m_j = beta1 * vec::load_partial(m + j, lanes) + one_minus_beta1 * g_j;
      const vfloat v_j = beta2 * vec::load_partial(v + j, lanes) + one_minus_beta2 * (g_j * g_j);
      vec::store_partial(m + j, m_j, lanes);
      vec::store_partial(v + j, v_j, lanes);
      vec::store(tile.root + j, v_j);
    }
    sqrt_buffer(tile.root, padded(n));
    const vfloat root = vec::splat(t.bias_correction2_root), eps = vec::splat(s.eps);
    const vfloat step_size = vec::splat(t.step_size);
    for (int64_t j = 0; j < n; j += kWidth) {
      const vfloat m_j = vec::load_partial(m + j, std::min<int64_t>(kWidth, n - j));
      const vfloat denominator = vec::load(tile.root + j) / root + eps;
      vec::store(work + j, vec::load(work + j) - step_size * (m_j / denominator));
    }
  }

  // work += addend[start + j].
  LEANOPS_INLINE void add_addend(int64_t start, int64_t n) const {
    if (o.addend == nullptr) return;
    for (int64_t j = 0; j < n; j += kWidth) {
      const vfloat a = vec::load_partial(o.addend + start + j, std::min<int64_t>(kWidth, n - j));
      vec::store(tile.work + j, vec::load(tile.work + j) + a);
    }
  }

  // frugal.h's state_free_step on the tile's elements, except those whose positions entry is >= 0 (positions null:
  // every element is state-free).
  LEANOPS_INLINE void state_free(int64_t n, const int32_t* positions) const {
    if (Rule == kNone) return;
    const vfloat free_lr = vec::splat(s.free_lr);
    for (int64_t j = 0; j < n; j += kWidth) {
      const vfloat g = vec::load(tile.g + j);
      const vfloat work = vec::load(tile.work + j);
      const vfloat step = Rule == kSignSGD ? sign_keeping_nan(g) : g;
      const vfloat updated = work - free_lr * step;
      if (positions == nullptr) {
        vec::store(tile.work + j, updated);
      } else {
        int32_t lanes[kWidth];
        const int64_t count = std::min<int64_t>(kWidth, n - j);
        for (int l = 0; l < kWidth; ++l) lanes[l] = l < count ? positions[j + l] : -1;
        const vint full = vec::load_int(lanes) >= 0;
        vec::store(tile.work + j, full ? work : updated);
      }
    }
  }

  // theta (theta_lo) from work, then narrowed into elements [start, start + n).
  LEANOPS_INLINE void store(int64_t start, int64_t n) const {
    for (int64_t j = 0; j < n; j += kWidth) {
      const int64_t lanes = std::min<int64_t>(kWidth, n - j);
      const vfloat work = vec::load(tile.work + j);
      if (Compensated) {
        // (theta, theta_lo) = Grow((theta, theta_lo), F(work - before))
        vfloat hi = vec::load(tile.theta + j);
        vfloat lo = vec::load(tile.theta_lo + j);
        grow<R>(hi, lo, R::round(work - vec::load(tile.before + j)));
        narrow(o.theta + start + j, hi, lanes);
        narrow(o.theta_lo + start + j, lo, lanes);
      } else {
        narrow(o.theta + start + j, R::round(work), lanes);
      }
    }
  }

  // Elements [start, start + n), all state-full with moments at [moment, moment + n) (full) or all state-free.
  LEANOPS_INLINE void run_uniform(int64_t start, int64_t n, bool full, int64_t moment) const {
    load(start, n);
    if (full) adam(tile.work, tile.g, o.m + moment, o.v + moment, n);
    add_addend(start, n);
    if (!full) state_free(n, nullptr);
    store(start, n);
  }

  // Elements [start, start + n) of a COLUMNS row: tile element j is state-full when positions[j] >= 0, with its
  // moments at moment_row + positions[j]; `full` lists those j (count of them).
  LEANOPS_INLINE void run_columns(int64_t start, int64_t n, const int32_t* positions, const int32_t* full,
                                  int64_t count, int64_t moment_row) const {
    load(start, n);
    if (count > 0) {
      for (int64_t q = 0; q < count; ++q) {
        const int32_t j = full[q];
        const int64_t moment = moment_row + positions[j];
        tile.full_work[q] = tile.work[j];
        tile.full_g[q] = tile.g[j];
        tile.full_m[q] = o.m[moment];
        tile.full_v[q] = o.v[moment];
      }
      for (int64_t q = count; q < padded(count); ++q) tile.full_g[q] = tile.full_work[q] = 0.0f;
      adam(tile.full_work, tile.full_g, tile.full_m, tile.full_v, count);
      for (int64_t q = 0; q < count; ++q) {
        const int32_t j = full[q];
        const int64_t moment = moment_row + positions[j];
        tile.work[j] = tile.full_work[q];
        o.m[moment] = tile.full_m[q];
        o.v[moment] = tile.full_v[q];
      }
    }
    add_addend(start, n);
    state_free(n, positions);
    store(start, n);
  }
};

// The work of one task, compiled twice (run_task): a flat range of elements, or a range of rows.
template <typename T, typename G, typename F, bool Compensated, int64_t Rule>
struct TaskLoop {
  const Operands<T, G>& o;
  const Scalars& s;
  const TensorScalars& t;
  SqrtBuffer sqrt_buffer;
  int64_t mode;
  MatrixShape shape;  // COLUMNS / ROWS
  int64_t begin, end;  // elements (ADAMW, FREE) or rows (COLUMNS, ROWS)

  LEANOPS_INLINE void operator()() const {
    Tile tile;
    const TileStep<T, G, F, Compensated, Rule> step{o, s, t, sqrt_buffer, tile};
    if (mode == kAdamW || mode == kFree) {
      for (int64_t start = begin; start < end; start += kTile) {
        step.run_uniform(start, std::min(kTile, end - start), mode == kAdamW, start);
      }
      return;
    }
    const int64_t columns = shape.columns;
    if (mode == kRows) {
      // Row i is state-full when positions[i] >= 0; its moments are row positions[i] of (k, columns).
      for (int64_t i = begin; i < end; ++i) {
        const int32_t p = o.positions[i];
        for (int64_t c = 0; c < columns; c += kTile) {
          step.run_uniform(i * columns + c, std::min(kTile, columns - c), p >= 0, static_cast<int64_t>(p) * columns + c);
        }
      }
      return;
    }
    // COLUMNS: column j is state-full when positions[j] >= 0; its moments sit in column positions[j] of (rows, k).
    // The state-full columns of each column tile, listed once for all the rows.
    std::vector<int32_t> full(static_cast<size_t>(columns));
    std::vector<int64_t> tile_first((columns + kTile - 1) / kTile + 1, 0);
    int64_t listed = 0;
    for (int64_t c = 0, index = 0; c < columns; c += kTile, ++index) {
      tile_first[index] = listed;
      for (int64_t j = c; j < std::min(columns, c + kTile); ++j) {
        if (o.positions[j] >= 0) full[listed++] = static_cast<int32_t>(j - c);
      }
      tile_first[index + 1] = listed;
    }
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t c = 0, index = 0; c < columns; c += kTile, ++index) {
        const int64_t first = tile_first[index];
        step.run_columns(i * columns + c, std::min(kTile, columns - c), o.positions + c, full.data() + first,
                         tile_first[index + 1] - first, i * shape.subspace);
      }
    }
  }
};

// One task's loop, in the AVX2 + FMA clone where the CPU has them, else in the baseline build.
template <typename T, typename G, typename F, bool Compensated, int64_t Rule>
void run_task(const Operands<T, G>& o, const Scalars& s, const TensorScalars& t, SqrtBuffer sqrt_buffer, int64_t mode,
              const MatrixShape& shape, int64_t begin, int64_t end) {
  vec::run_cloned(TaskLoop<T, G, F, Compensated, Rule>{o, s, t, sqrt_buffer, mode, shape, begin, end});
}

template <typename T, typename G, typename F, bool Compensated, int64_t Rule>
void step_tensor(const Operands<T, G>& o, int64_t numel, int64_t mode, int64_t positions_size, int64_t moments,
                 const Scalars& s, const TensorScalars& t, SqrtBuffer sqrt_buffer) {
  if (numel == 0) return;
  if (mode == kAdamW || mode == kFree) {
    at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
      run_task<T, G, F, Compensated, Rule>(o, s, t, sqrt_buffer, mode, MatrixShape{}, begin, end);
    });
    return;
  }
  const MatrixShape shape = matrix_shape(mode, numel, positions_size, moments);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, shape.columns));
  at::parallel_for(0, shape.rows, grain, [&](int64_t row_begin, int64_t row_end) {
    run_task<T, G, F, Compensated, Rule>(o, s, t, sqrt_buffer, mode, shape, row_begin, row_end);
  });
}

template <typename T, typename G, typename F, bool Compensated, int64_t Rule>
void step_all(const Call& call) {
  const SqrtBuffer sqrt_buffer = choose_sqrt_buffer();
  for (size_t i = 0; i < call.params.size(); ++i) {
    const int64_t mode = call.modes[i];
    const bool has_moments = mode != kFree;
    const bool has_positions = mode == kColumns || mode == kRows;
    Operands<T, G> o{call.params[i].data_ptr<T>(),
                     Compensated ? call.params_lo[i].data_ptr<T>() : nullptr,
                     has_moments ? call.exp_avgs[i].data_ptr<float>() : nullptr,
                     has_moments ? call.exp_avg_sqs[i].data_ptr<float>() : nullptr,
                     call.grads[i].const_data_ptr<G>(),
                     has_positions ? call.positions[i].const_data_ptr<int32_t>() : nullptr,
                     call.addends[i].numel() > 0 ? call.addends[i].const_data_ptr<float>() : nullptr};
    const TensorScalars t{static_cast<float>(call.step_sizes[i]), static_cast<float>(call.bias_correction2_roots[i])};
    step_tensor<T, G, F, Compensated, Rule>(o, call.params[i].numel(), mode,
                                            has_positions ? call.positions[i].numel() : 0,
                                            has_moments ? call.exp_avgs[i].numel() : 0, call.scalars, t, sqrt_buffer);
  }
}

void run_cpu(const Call& call) {
  dispatch_step_types(call, [&](auto param, auto grad, auto format, auto compensated) {
    using T = decltype(param);
    using G = decltype(grad);
    using F = decltype(format);
    constexpr bool kCompensated = decltype(compensated)::value;
    switch (call.scalars.rule) {
      case kSignSGD:
        step_all<T, G, F, kCompensated, kSignSGD>(call);
        break;
      case kSGD:
        step_all<T, G, F, kCompensated, kSGD>(call);
        break;
      default:
        step_all<T, G, F, kCompensated, kNone>(call);
        break;
    }
  });
}

}  // namespace
}  // namespace frugal
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CPU, m) {
  m.impl("frugal_split_step_", &leanops::frugal::split_step<leanops::frugal::run_cpu>);
}
