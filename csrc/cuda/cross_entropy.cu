// CUDA kernels of the chunked linear cross-entropy primitives (linear_ce_forward, linear_ce_backward). csrc/ops.cpp
// states the contract; python/leanops/reference/cross_entropy.py is the same math in plain PyTorch.
//
// Math. h = hidden (N, D), W = weight (V, D), b = bias (V,) or none, t = targets (N,) (t_n < 0: no target);
// z = h W^T + b; with a softcap c > 0, z' = c tanh(z / c) and dz'/dz = 1 - (z'/c)^2, else z' = z and dz'/dz = 1.
//   forward:  lse[n] = logsumexp_j z'[n, j], target_logit[n] = z'[n, t_n] (0 where t_n < 0),
//             logit_sum[n] = sum_j z'[n, j], logit_square_sum[n] = sum_j z'[n, j]^2
//   backward: G[n, j] = (grad_lse[n] exp(z'[n, j] - lse[n]) + grad_sum[n] + 2 grad_square_sum[n] z'[n, j]
//                        + grad_target[n] [j == t_n]) dz'/dz
//             grad_hidden = G W, grad_weight = G^T h, grad_bias = sum_n G[n, :]
//
// Tiling. The N x V logits never exist: a CTA of 256 threads computes one 64 x 64 tile of z at a time (64 tokens x
// 64 vocabulary entries) into shared memory (float32), staging 64 feature dimensions of the tile's 64 hidden rows
// and 64 weight rows per step. The stages are double buffered: the next step's rows are fetched with cp.async
// (16-bit features with D a multiple of 8 on aligned storage) while the tensor cores work on the current ones;
// other layouts fall back to plain loads in the same loop. bfloat16 / float16 features take the tensor cores
// through WMMA (16 x 16 x 16, float32 accumulators; products of 16-bit values are exact in float32). float32 features
// take a SIMT path with explicit fmaf, 4 x 4 entries per thread (no TF32: the results must match float32 arithmetic
// to ~1e-6; the project builds with --fmad=false, which only stops the compiler from contracting). Both paths sum
// each 64-dimension step into a fresh partial and add the partials with float32 adds, which confines the tensor
// cores' internal accumulation (truncating, not round-to-nearest) to one step (csrc/cuda/contrastive.cu does the
// same). Every statistic and every gradient accumulates in float32.
//
//   forward         one kernel, one CTA per 64-token block sweeping the vocabulary tiles: 4 threads share a token
//                   row (16 entries each) and keep its running max and rescaled sum of exponentials (online
//                   log-sum-exp), the target logit and the sum and sum of squares of z'. Each tile's sums are formed
//                   first (16 entries per thread, then two shuffles) and added to the running totals: two-level
//                   summation, so their rounding errors grow with V / 64 rather than V.
//   backward        two kernels, each output-stationary (every output element is written once, by one thread, in
//                   the input dtype): no atomics, no N x V buffer, no float32 copy of any gradient, bitwise
//                   reproducible.
//     grad_hidden   grid (token blocks, column chunks): a CTA owns 64 rows x C columns of grad_hidden, sweeps the
//                   vocabulary tiles, recomputes the z tile (over all of D), forms G in place (float32) and adds
//                   G_tile W_tile[:, its columns] to a float32 accumulator [64][C] in shared memory.
//     grad_weight   grid (vocabulary blocks, column chunks): a CTA owns 64 rows x C columns of grad_weight (and,
//     grad_bias     in column chunk 0, the 64 entries of grad_bias), sweeps the token tiles, recomputes the z tile,
//                   forms G and adds G_tile^T h_tile[:, its columns] to its accumulator; grad_bias sums G in
//                   float32 (a per-tile partial per thread, 4 partials per entry added in a fixed order at the end).
//     Column chunks: a CTA's accumulator holds C <= 512 columns (128 KB of the 227 KB of shared memory on an H100;
//     fewer where the device has less), so D > 512 is split into ceil(D / 512) column chunks of balanced width
//     (a multiple of 64), one CTA each, and each of them recomputes the z tile: for D = 4096 the logits are computed
//     8 times per backward kernel instead of once. The alternative that avoids the recomputation on sm_90 is a
//     thread-block cluster per token (vocabulary) block whose CTAs each compute a K-slice of z over their own
//     columns and add the partial tiles through distributed shared memory; it is left for later (it needs sm_90-only
//     code paths and a cluster launch).
//   The second products (G_tile W_tile, G_tile^T h_tile) for 16-bit features also take the tensor cores: G (float32)
//   is split into two 16-bit values, G = G_hi + G_lo + O(2^-16 |G| for bfloat16, 2^-22 |G| for float16), and both
//   halves are multiplied with the (exact) 16-bit features, so G is represented far more accurately than the output
//   dtype; rounding G to one 16-bit value would cost bfloat16 about 2^-8 relative error before the output rounding.
//   float16's narrow range (G can reach 1e5, or 1e-10 for tiny probabilities) is handled by scaling each G tile by a
//   power of two that puts its largest |G| in [2^14, 2^15) before the split, and the tile's product (in fresh
//   accumulators) by the inverse power of two after it. Both scalings are exact; G entries below 2^-28 of the
//   tile's largest one lose relative accuracy in float16 (absolute error at most ~2^-39 of the largest). bfloat16 has
//   float32's range and needs no scaling. float32 features multiply G in float32 SIMT loops (fmaf), each tile's 64
//   products into a fresh partial first.
//
// Shared memory (dynamic; the host opts in): the z tile 17 KB; stages 2 x 2 x 64 x 72 x 2 B = 36 KB (16-bit) or
// 2 x 2 x 64 x 65 x 4 B = 65 KB (float32); per-token and per-entry operands 2 KB; backward only: G_hi and G_lo 18 KB
// (16-bit), and the accumulator 64 x (C + 4) x 4 B (129 KB for C = 512). Totals: forward 55 KB (16-bit), 84 KB
// (float32); backward 90 + 0.25 C KB (16-bit; 202 KB for C = 512), 101 + 0.25 C KB (float32; 213 KB), under the
// H100's 227 KB. Registers (ptxas, sm_90, no spills): forward 117-128 (2 CTAs per multiprocessor), backward 154-178
// (16-bit) and 106-110 (float32), 1 CTA per multiprocessor (its shared memory allows no more for D > ~200 anyway).
// Index arithmetic on N, V and D is 64-bit. N = 0 returns empty statistics and zero grad_weight / grad_bias without
// a launch; D = 0 works (z = b).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "leanops/cross_entropy_host.h"

namespace leanops {
namespace cross_entropy {
namespace {

constexpr int kBlock = 64;    // tokens (rows) and vocabulary entries (columns) of one z tile
constexpr int kChunk = 64;    // feature dimensions staged per step; also the column width of one accumulator step
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Forward epilogue layout: 4 consecutive threads share one token row of the tile, 16 entries each, and combine
// their partial results with two warp shuffles.
constexpr int kLanesPerLine = kThreads / kBlock;
constexpr int kEntriesPerLane = kBlock / kLanesPerLine;
// Backward elementwise layout: thread t handles column t % 64 and rows t / 64 + 4 k of the tile (k < 16): a warp
// covers 32 consecutive columns of one row (conflict-free), and a thread keeps one column (grad_bias).
constexpr int kRowsPerPass = kThreads / kBlock;
constexpr int kEntriesPerThread = kBlock / kRowsPerPass;
// Leading dimension of the float32 tile: a multiple of 4 (16 bytes), as WMMA's store needs.
constexpr int kTileStride = kBlock + 4;
// Leading dimension of G_hi / G_lo: a multiple of 8 elements (WMMA), 144 bytes: 8 consecutive rows of a 16-byte
// ldmatrix read start on 8 different bank quadruples.
constexpr int kSplitStride = kBlock + 8;
// Widest accumulator (columns of grad_hidden / grad_weight per CTA) and its padding (a multiple of 4 floats).
constexpr int kMaxColumns = 512;
constexpr int kAccumulatorPad = 4;
// The float16 G scaling puts a tile's largest |G| in [2^(kScaleExponent - 1), 2^kScaleExponent): below 65504.
constexpr int kScaleExponent = 15;
constexpr float kInfinity = std::numeric_limits<float>::infinity();

static_assert(kLanesPerLine == 4 && kEntriesPerLane == 16, "line_sum / line_max combine 4 lanes");
static_assert(kBlock % kRowsPerPass == 0 && kThreads % kBlock == 0, "elementwise layout");
static_assert(kWarps == 8, "the WMMA layouts give each of 8 warps a 16 x 32 region of a 64 x 64 tile");
static_assert(kChunk == kBlock, "the second products stage 64 x 64 feature tiles in a z stage");
static_assert(kMaxColumns % kChunk == 0, "accumulator widths are multiples of the 64-column step");

// Leading dimension (in elements) of a staged feature chunk [kBlock][kChunk].
template <typename T>
struct Staging {
  // 16-bit features: a multiple of 8 elements (16 bytes: WMMA loads, cp.async and vector stores); 144 bytes per row
  // keeps ldmatrix conflict-free.
  static constexpr int kStride = kChunk + 8;
};
template <>
struct Staging<float> {
  // float32 features: an odd stride, so the SIMT loop's reads down a column of the chunk hit 16 different banks.
  static constexpr int kStride = kChunk + 1;
};

// Per-token operands (indexed by the tile's row) and per-entry operands (indexed by its column).
struct Operands {
  float lse[kBlock];
  float grad_lse[kBlock];
  float grad_target[kBlock];
  float grad_sum[kBlock];
  float grad_square_sum[kBlock];
  int64_t target[kBlock];  // -1 past N
  float bias[kBlock];      // 0 without a bias and past V
  float warp_max[kWarps];  // the float16 G scaling's block-wide max |G|
};

// The shared memory of the forward kernel, and the first part of the backward kernels'.
template <typename T>
struct TileStorage {
  // The current z tile [token][entry]; the backward kernels overwrite it in place with G.
  alignas(128) float tile[kBlock][kTileStride];
  // Double-buffered feature chunks: hidden rows and weight rows of the tile. stage_rows[0] also holds the feature
  // tile of the second products (W rows in grad_hidden, h rows in grad_weight).
  alignas(128) T stage_rows[2][kBlock][Staging<T>::kStride];
  alignas(128) T stage_cols[2][kBlock][Staging<T>::kStride];
  alignas(16) Operands operands;
};

// G split into two 16-bit matrices for the tensor cores; unused by float32 features.
template <typename T>
struct SplitStorage {
  alignas(128) T hi[kBlock][kSplitStride];
  alignas(128) T lo[kBlock][kSplitStride];
};
template <>
struct SplitStorage<float> {
  char unused;
};

template <typename T>
struct BackwardStorage {
  TileStorage<T> base;
  SplitStorage<T> split;
};

constexpr size_t round_up(size_t bytes, size_t multiple) { return (bytes + multiple - 1) / multiple * multiple; }

// Byte offset of the float32 accumulator [kBlock][columns + kAccumulatorPad] behind the backward storage.
template <typename T>
constexpr size_t accumulator_offset() {
  return round_up(sizeof(BackwardStorage<T>), 128);
}

template <typename T>
constexpr size_t backward_shared_bytes(int columns) {
  return accumulator_offset<T>() + sizeof(float) * kBlock * static_cast<size_t>(columns + kAccumulatorPad);
}

// ---------------------------------------------------------------------------------------------------------------
// Scalar helpers.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ T zero_value() {
  return from_float<T>(0.0f);
}

// max(a, b), but NaN when either is NaN: fmaxf would drop a NaN logit, and a NaN input must reach the output.
__device__ __forceinline__ float max_with_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// The sum (max) over the 4 lanes of a line, returned to all 4; every lane of the warp must call it. Each lane adds
// the same two pairs, so all 4 get bitwise the same value.
__device__ __forceinline__ float line_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}
__device__ __forceinline__ float line_max(float v) {
  v = max_with_nan(v, __shfl_xor_sync(0xffffffffu, v, 1));
  v = max_with_nan(v, __shfl_xor_sync(0xffffffffu, v, 2));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = max_with_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// A set of logits as (max, sum of exp(logit - max)); max = -inf is the empty set. Merges b into a.
__device__ __forceinline__ void merge_lse(float& max_a, float& sum_a, float max_b, float sum_b) {
  const float merged_max = max_with_nan(max_a, max_b);
  if (merged_max == -kInfinity) return;  // both empty (exp(-inf - -inf) would be NaN)
  const float part_a = max_a == -kInfinity ? 0.0f : sum_a * expf(max_a - merged_max);
  const float part_b = max_b == -kInfinity ? 0.0f : sum_b * expf(max_b - merged_max);
  sum_a = part_a + part_b;
  max_a = merged_max;
}

// z' = softcap tanh(z / softcap) for softcap > 0 (the reference's order of operations), else z.
__device__ __forceinline__ float capped(float z, float softcap) {
  return softcap > 0.0f ? softcap * tanhf(z / softcap) : z;
}

// 2^k for -126 <= k <= 127, exactly.
__device__ __forceinline__ float exp2_int(int k) { return __int_as_float((k + 127) << 23); }

// ---------------------------------------------------------------------------------------------------------------
// Asynchronous copies (sm_80+). Each thread waits for its own copies; a barrier after the wait makes every
// thread's copies visible to the CTA.

__device__ __forceinline__ void copy_async_16(void* shared_destination, const void* global_source, bool inside) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned destination = static_cast<unsigned>(__cvta_generic_to_shared(shared_destination));
  const int source_bytes = inside ? 16 : 0;  // 0: the 16 bytes are zero-filled and nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(destination), "l"(global_source),
               "r"(source_bytes)
               : "memory");
#else
  uint4 value = make_uint4(0u, 0u, 0u, 0u);
  if (inside) value = *reinterpret_cast<const uint4*>(global_source);
  *reinterpret_cast<uint4*>(shared_destination) = value;
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `kPending` of this thread's most recent copy groups are still in flight.
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

template <typename T, int N>
struct alignas(16) Vector {
  T value[N];
};

// dst[r][k] = src[first_row + r][first_col + k] for r < kBlock, k < kChunk; zero past `rows` rows and `dim` columns.
// `vectorized`: dim is a multiple of the 16-byte vector and src is 16-byte aligned, so a vector lies entirely inside
// or entirely outside [0, dim) and can be read with one 16-byte load. kAsync: with 16-byte aligned destination rows
// the vectors are copied with cp.async (the caller commits and waits); otherwise the loads are synchronous.
template <bool kAsync, typename T, int kStride>
__device__ __forceinline__ void load_chunk(T (&dst)[kBlock][kStride], const T* __restrict__ src, int64_t first_row,
                                           int64_t rows, int64_t dim, int64_t first_col, bool vectorized) {
  if (vectorized) {
    constexpr int kVector = 16 / static_cast<int>(sizeof(T));
    constexpr int kVectorsPerRow = kChunk / kVector;
    constexpr bool kAlignedRows = (kStride * sizeof(T)) % 16 == 0;
    for (int v = threadIdx.x; v < kBlock * kVectorsPerRow; v += kThreads) {
      const int r = v / kVectorsPerRow;
      const int k = (v % kVectorsPerRow) * kVector;
      const int64_t row = first_row + r;
      const int64_t col = first_col + k;
      const bool inside = row < rows && col < dim;
      if constexpr (kAsync && kAlignedRows) {
        copy_async_16(&dst[r][k], inside ? src + row * dim + col : src, inside);
      } else {
        Vector<T, kVector> vector;
        if (inside) {
          vector = *reinterpret_cast<const Vector<T, kVector>*>(src + row * dim + col);
        } else {
#pragma unroll
          for (int e = 0; e < kVector; ++e) vector.value[e] = zero_value<T>();
        }
        if constexpr (kAlignedRows) {
          *reinterpret_cast<Vector<T, kVector>*>(&dst[r][k]) = vector;
        } else {
#pragma unroll
          for (int e = 0; e < kVector; ++e) dst[r][k + e] = vector.value[e];
        }
      }
    }
  } else {
    // Consecutive threads read consecutive columns of a row: coalesced within a row.
    for (int v = threadIdx.x; v < kBlock * kChunk; v += kThreads) {
      const int r = v / kChunk;
      const int k = v % kChunk;
      const int64_t row = first_row + r;
      const int64_t col = first_col + k;
      dst[r][k] = (row < rows && col < dim) ? src[row * dim + col] : zero_value<T>();
    }
  }
}

template <typename T>
constexpr bool use_tensor_cores() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  return !std::is_same_v<T, float>;  // bfloat16 WMMA needs sm_80
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Tile building blocks. Every function below is called by all threads of the CTA (they contain __syncthreads).

// s.tile[r][c] = <hidden[row0 + r], weight[col0 + c]> for the 64 x 64 tile (0 where the token is past N or the entry
// past V). The caller must have finished with both stages (a barrier since their last use). Ends with a barrier:
// the tile (and whatever else was written to shared memory before the call) is visible to all.
template <typename T>
__device__ void logit_tile(TileStorage<T>& s, const T* __restrict__ hidden, const T* __restrict__ weight,
                           int64_t row0, int64_t tokens, int64_t col0, int64_t vocabulary, int64_t dim,
                           bool vectorized) {
  const int64_t steps = (dim + kChunk - 1) / kChunk;
  if (steps > 0) {
    load_chunk<true>(s.stage_rows[0], hidden, row0, tokens, dim, 0, vectorized);
    load_chunk<true>(s.stage_cols[0], weight, col0, vocabulary, dim, 0, vectorized);
    copy_async_commit();
  }
  // Step i computes from buffer i % 2 while step i + 1's chunk is copied into the other buffer, which the barrier
  // that ended step i - 1 released.
  if constexpr (use_tensor_cores<T>()) {
    namespace wmma = nvcuda::wmma;
    // 8 warps over 4 x 4 sub-tiles of 16 x 16: warp w takes sub-tile row w / 2 and two sub-tile columns.
    const int warp = threadIdx.x / 32;
    const int sub_row = (warp / 2) * 16;
    const int sub_col = (warp % 2) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> accumulator[2];
    wmma::fill_fragment(accumulator[0], 0.0f);
    wmma::fill_fragment(accumulator[1], 0.0f);
    for (int64_t step = 0; step < steps; ++step) {
      const int buffer = static_cast<int>(step & 1);
      if (step + 1 < steps) {
        load_chunk<true>(s.stage_rows[buffer ^ 1], hidden, row0, tokens, dim, (step + 1) * kChunk, vectorized);
        load_chunk<true>(s.stage_cols[buffer ^ 1], weight, col0, vocabulary, dim, (step + 1) * kChunk, vectorized);
        copy_async_commit();
        copy_async_wait<1>();
      } else {
        copy_async_wait<0>();
      }
      __syncthreads();  // this step's chunk is in shared memory
      // Each step sums into fresh fragments, added to the totals with float32 adds.
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> partial[2];
      wmma::fill_fragment(partial[0], 0.0f);
      wmma::fill_fragment(partial[1], 0.0f);
#pragma unroll
      for (int k = 0; k < kChunk; k += 16) {
        // A = hidden rows (row-major M x K); B = W^T, which is the staged weight rows read column-major (K x N).
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, &s.stage_rows[buffer][sub_row][k], Staging<T>::kStride);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, &s.stage_cols[buffer][sub_col + 16 * j][k], Staging<T>::kStride);
          wmma::mma_sync(partial[j], a, b, partial[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // Fragments of one type share their element layout, so elementwise adds are well defined.
#pragma unroll
        for (int e = 0; e < partial[j].num_elements; ++e) accumulator[j].x[e] += partial[j].x[e];
      }
      __syncthreads();  // every warp is done with this buffer before step + 2's chunk is copied into it
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(&s.tile[sub_row][sub_col + 16 * j], accumulator[j], kTileStride, wmma::mem_row_major);
    }
  } else {
    // Thread (ty, tx) computes rows ty + 16 i and columns tx + 16 j, i, j < 4. Within a warp ty takes 2 values
    // (broadcast reads of stage_rows) and tx 16 (conflict-free reads of stage_cols down its odd stride).
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    float accumulator[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) accumulator[i][j] = 0.0f;
    }
    for (int64_t step = 0; step < steps; ++step) {
      const int buffer = static_cast<int>(step & 1);
      if (step + 1 < steps) {
        load_chunk<true>(s.stage_rows[buffer ^ 1], hidden, row0, tokens, dim, (step + 1) * kChunk, vectorized);
        load_chunk<true>(s.stage_cols[buffer ^ 1], weight, col0, vocabulary, dim, (step + 1) * kChunk, vectorized);
        copy_async_commit();
        copy_async_wait<1>();
      } else {
        copy_async_wait<0>();
      }
      __syncthreads();
      // Two-level summation: 64 products into a fresh partial, then the partial into the total.
      float partial[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) partial[i][j] = 0.0f;
      }
#pragma unroll 8
      for (int k = 0; k < kChunk; ++k) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          a[i] = to_float(s.stage_rows[buffer][ty + 16 * i][k]);
          b[i] = to_float(s.stage_cols[buffer][tx + 16 * i][k]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) partial[i][j] = fmaf(a[i], b[j], partial[i][j]);
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) accumulator[i][j] += partial[i][j];
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) s.tile[ty + 16 * i][tx + 16 * j] = accumulator[i][j];
    }
  }
  __syncthreads();
}

// Overwrites the z tile (rows = tokens row0 + r, columns = vocabulary entries col0 + c) with G, 0 past N and V,
// using the per-token operands s.operands.{lse, grad_*, target}[r] and s.operands.bias[c]. Elementwise layout (see
// kRowsPerPass). Adds this thread's sum of its G entries (one column) to column_total, and returns the largest |G|
// among them (NaN if any is NaN). The caller places the barrier that completes G.
template <typename T>
__device__ float gradient_tile(TileStorage<T>& s, int64_t row0, int64_t tokens, int64_t col0, int64_t vocabulary,
                               float softcap, float& column_total) {
  const Operands& o = s.operands;
  const int c = threadIdx.x % kBlock;
  const int64_t col = col0 + c;
  const bool col_valid = col < vocabulary;
  const float bias = o.bias[c];
  float largest = 0.0f;
  float column = 0.0f;  // a fresh partial per tile: two-level summation of grad_bias
#pragma unroll 4
  for (int k = 0; k < kEntriesPerThread; ++k) {
    const int r = threadIdx.x / kBlock + kRowsPerPass * k;
    const float logit = capped(s.tile[r][c] + bias, softcap);
    // The reference's order: (grad_lse p + grad_sum) + 2 grad_square_sum z', then the target term, then dz'/dz.
    float g = o.grad_lse[r] * expf(logit - o.lse[r]) + o.grad_sum[r];
    g = g + 2.0f * o.grad_square_sum[r] * logit;
    if (o.target[r] == col) g = g + o.grad_target[r];
    if (softcap > 0.0f) {
      const float ratio = logit / softcap;
      g = g * (1.0f - ratio * ratio);
    }
    g = (col_valid && row0 + r < tokens) ? g : 0.0f;
    s.tile[r][c] = g;
    largest = max_with_nan(largest, fabsf(g));
    column += g;
  }
  column_total += column;
  return largest;
}

// Fills s.operands' per-token entries for tokens row0 .. row0 + 63 (threads 0..63; zeros and no target past N).
template <typename T>
__device__ __forceinline__ void stage_token_operands(TileStorage<T>& s, int64_t row0, int64_t tokens,
                                                     const int64_t* __restrict__ targets,
                                                     const float* __restrict__ lse, const float* __restrict__ grad_lse,
                                                     const float* __restrict__ grad_target,
                                                     const float* __restrict__ grad_sum,
                                                     const float* __restrict__ grad_square_sum) {
  if (threadIdx.x < kBlock) {
    const int r = threadIdx.x;
    const int64_t row = row0 + r;
    const bool valid = row < tokens;
    Operands& o = s.operands;
    o.lse[r] = valid ? lse[row] : 0.0f;
    o.grad_lse[r] = valid ? grad_lse[row] : 0.0f;
    o.grad_target[r] = valid ? grad_target[row] : 0.0f;
    o.grad_sum[r] = valid ? grad_sum[row] : 0.0f;
    o.grad_square_sum[r] = valid ? grad_square_sum[row] : 0.0f;
    o.target[r] = valid ? targets[row] : -1;
  }
}

// Fills s.operands.bias for vocabulary entries col0 .. col0 + 63 (threads 0..63; 0 without a bias and past V).
template <typename T>
__device__ __forceinline__ void stage_bias(TileStorage<T>& s, const T* __restrict__ bias, int64_t col0,
                                           int64_t vocabulary) {
  if (threadIdx.x < kBlock) {
    const int64_t col = col0 + threadIdx.x;
    s.operands.bias[threadIdx.x] = (bias != nullptr && col < vocabulary) ? to_float(bias[col]) : 0.0f;
  }
}

// The second product of a backward kernel for one tile, G complete in s.tile (float32) except for its barrier:
//   accumulator[o][d] += sum_e Gv[o][e] * features[other0 + e][column0 + d]   for o < 64, d < width,
// where Gv[o][e] = G[o][e] (kTransposed = false, grad_hidden: o = token, e = vocabulary entry) or G[e][o]
// (kTransposed = true, grad_weight: o = vocabulary entry, e = token). `largest` is this thread's max |G| (for the
// float16 scaling). Starts with the barrier that completes G; ends with a barrier (the stages and G are free).
// Every accumulator element is always updated by the same warp (tensor cores) or thread (SIMT): no races.
template <typename T, bool kTransposed>
__device__ void accumulate_tile_product(BackwardStorage<T>& storage, float largest, const T* __restrict__ features,
                                        int64_t other0, int64_t other_count, int64_t dim, int64_t column0, int width,
                                        bool vectorized, float* __restrict__ accumulator, int accumulator_stride) {
  TileStorage<T>& s = storage.base;
  auto& stage = s.stage_rows[0];
  if constexpr (use_tensor_cores<T>()) {
    namespace wmma = nvcuda::wmma;
    constexpr bool kScaled = std::is_same_v<T, __half>;
    float scale = 1.0f;
    float unscale = 1.0f;
    if constexpr (kScaled) {
      largest = warp_max(largest);
      if (threadIdx.x % 32 == 0) s.operands.warp_max[threadIdx.x / 32] = largest;
    }
    __syncthreads();  // G (and the warp maxima) complete
    if constexpr (kScaled) {
      largest = s.operands.warp_max[0];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) largest = max_with_nan(largest, s.operands.warp_max[w]);
      // largest = m 2^exponent with m in [0.5, 1) (exponent 0 for 0, inf and NaN); clamped so that both powers of
      // two are normal floats. Scaled, the largest |G| is m 2^15 < 65504.
      int exponent = 0;
      frexpf(largest, &exponent);
      exponent = min(max(exponent, -100), 100);
      scale = exp2_int(kScaleExponent - exponent);
      unscale = exp2_int(exponent - kScaleExponent);
    }
    // G = G_hi + G_lo in the feature dtype (scaled by a power of two for float16): G_lo holds G's rounding error,
    // which is exact in float32, rounded once more.
    const int c = threadIdx.x % kBlock;
#pragma unroll 4
    for (int k = 0; k < kEntriesPerThread; ++k) {
      const int r = threadIdx.x / kBlock + kRowsPerPass * k;
      const float g = s.tile[r][c] * scale;
      const T hi = from_float<T>(g);
      storage.split.hi[r][c] = hi;
      storage.split.lo[r][c] = from_float<T>(g - to_float(hi));
    }
    // The same layout as logit_tile: warp w owns output rows sub_row .. sub_row + 15 and columns sub_col .. + 31 of
    // each 64-column step.
    const int warp = threadIdx.x / 32;
    const int sub_row = (warp / 2) * 16;
    const int sub_col = (warp % 2) * 32;
    for (int step = 0; step * kChunk < width; ++step) {
      // Synchronous: this is the stage the last logit step read, which the barrier ending logit_tile released.
      load_chunk<false>(stage, features, other0, other_count, dim, column0 + step * kChunk, vectorized);
      __syncthreads();  // the feature tile (and, in the first step, G_hi / G_lo) complete
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> partial[2];
      wmma::fill_fragment(partial[0], 0.0f);
      wmma::fill_fragment(partial[1], 0.0f);
#pragma unroll
      for (int e = 0; e < kBlock; e += 16) {
        // A = Gv (M = own lines, K = e): G row-major, or G^T, which is G read column-major.
        using Layout = std::conditional_t<kTransposed, wmma::col_major, wmma::row_major>;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, Layout> a_hi;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, Layout> a_lo;
        const T* const hi = kTransposed ? &storage.split.hi[e][sub_row] : &storage.split.hi[sub_row][e];
        const T* const lo = kTransposed ? &storage.split.lo[e][sub_row] : &storage.split.lo[sub_row][e];
        wmma::load_matrix_sync(a_hi, hi, kSplitStride);
        wmma::load_matrix_sync(a_lo, lo, kSplitStride);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          // B = the staged feature rows (K = e x N = d), row-major.
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(b, &stage[e][sub_col + 16 * j], Staging<T>::kStride);
          wmma::mma_sync(partial[j], a_hi, b, partial[j]);
          wmma::mma_sync(partial[j], a_lo, b, partial[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // Columns past `width` belong to no output (their features are 0); the accumulator has room for them (width
        // rounds up to the CTA's column count, a multiple of 64).
        float* const target = accumulator + sub_row * accumulator_stride + step * kChunk + sub_col + 16 * j;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> total;
        wmma::load_matrix_sync(total, target, accumulator_stride, wmma::mem_row_major);
        // total + partial * 2^-k: the product is exact, so this is one float32 add.
#pragma unroll
        for (int x = 0; x < total.num_elements; ++x) total.x[x] = fmaf(partial[j].x[x], unscale, total.x[x]);
        wmma::store_matrix_sync(target, total, accumulator_stride, wmma::mem_row_major);
      }
      __syncthreads();  // every warp is done with the feature tile before the next step (or tile) overwrites it
    }
  } else {
    (void)largest;
    __syncthreads();  // G complete
    // Thread (ty, tx) owns lines ty + 16 i and columns tx + 16 j (i, j < 4) of each 64-column step. Within a warp,
    // ty takes 2 values: G reads are 2 distinct addresses 4 banks apart (rows of stride 68) or adjacent (columns);
    // feature reads are 16 consecutive floats (broadcast to the two half-warps).
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    for (int step = 0; step * kChunk < width; ++step) {
      load_chunk<false>(stage, features, other0, other_count, dim, column0 + step * kChunk, vectorized);
      __syncthreads();
      float partial[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) partial[i][j] = 0.0f;
      }
#pragma unroll 8
      for (int e = 0; e < kBlock; ++e) {
        float g[4], f[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          g[i] = kTransposed ? s.tile[e][ty + 16 * i] : s.tile[ty + 16 * i][e];
          f[i] = to_float(stage[e][tx + 16 * i]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) partial[i][j] = fmaf(g[i], f[j], partial[i][j]);
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float* const line = accumulator + (ty + 16 * i) * accumulator_stride + step * kChunk + tx;
#pragma unroll
        for (int j = 0; j < 4; ++j) line[16 * j] += partial[i][j];
      }
      __syncthreads();
    }
  }
}

// Sets the accumulator [kBlock][stride] to 0 (all threads; the caller's later barriers publish it).
__device__ __forceinline__ void zero_accumulator(float* __restrict__ accumulator, int stride) {
  for (int i = threadIdx.x; i < kBlock * stride; i += kThreads) accumulator[i] = 0.0f;
}

// out[(own0 + r) * dim + column0 + d] = accumulator[r][d] in T, for own0 + r < own_count and d < width. Coalesced:
// consecutive threads write consecutive columns. The accumulator must be complete (a barrier since its last update).
template <typename T>
__device__ __forceinline__ void write_accumulator(const float* __restrict__ accumulator, int stride,
                                                  T* __restrict__ out, int64_t own0, int64_t own_count, int64_t dim,
                                                  int64_t column0, int width) {
  if (width <= 0) return;
  for (int i = threadIdx.x; i < kBlock * width; i += kThreads) {
    const int r = i / width;
    const int d = i % width;
    const int64_t own = own0 + r;
    if (own < own_count) out[own * dim + column0 + d] = from_float<T>(accumulator[r * stride + d]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Kernels.

// linear_ce_forward: one CTA per 64-token block. Epilogue layout: thread t owns token row t / 4 of the tile and, in
// it, the 16 entries t % 4 + 4 j.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    linear_ce_forward_kernel(const T* __restrict__ hidden, const T* __restrict__ weight, const T* __restrict__ bias,
                             const int64_t* __restrict__ targets, int64_t tokens, int64_t vocabulary, int64_t dim,
                             float softcap, bool vectorized, float* __restrict__ lse,
                             float* __restrict__ target_logit, float* __restrict__ logit_sum,
                             float* __restrict__ logit_square_sum) {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  TileStorage<T>& s = *reinterpret_cast<TileStorage<T>*>(shared_bytes);
  const int line = threadIdx.x / kLanesPerLine;
  const int lane_in_line = threadIdx.x % kLanesPerLine;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlock;
  const int64_t row = row0 + line;
  const bool row_valid = row < tokens;
  const int64_t target = row_valid ? targets[row] : -1;
  float row_max = -kInfinity;
  float row_sum = 0.0f;
  float total = 0.0f;
  float squares = 0.0f;
  float picked = 0.0f;  // z'[row, target], held by the one lane whose entry it is

  for (int64_t col0 = 0; col0 < vocabulary; col0 += kBlock) {
    __syncthreads();  // every thread is done with the previous tile and its bias
    stage_bias(s, bias, col0, vocabulary);
    logit_tile(s, hidden, weight, row0, tokens, col0, vocabulary, dim, vectorized);
    float logits[kEntriesPerLane];
    float tile_max = -kInfinity;
    float tile_total = 0.0f;
    float tile_squares = 0.0f;
#pragma unroll
    for (int j = 0; j < kEntriesPerLane; ++j) {
      const int c = lane_in_line + kLanesPerLine * j;
      const int64_t col = col0 + c;
      logits[j] = capped(s.tile[line][c] + s.operands.bias[c], softcap);
      if (col < vocabulary) {
        tile_max = max_with_nan(tile_max, logits[j]);
        tile_total += logits[j];
        tile_squares = fmaf(logits[j], logits[j], tile_squares);
        if (col == target) picked = logits[j];
      }
    }
    tile_max = line_max(tile_max);
    float tile_sum = 0.0f;
    if (tile_max != -kInfinity) {  // a tile always has a valid column; -inf only if every logit is -inf
#pragma unroll
      for (int j = 0; j < kEntriesPerLane; ++j) {
        const int c = lane_in_line + kLanesPerLine * j;
        if (col0 + c < vocabulary) tile_sum += expf(logits[j] - tile_max);
      }
    }
    tile_sum = line_sum(tile_sum);
    merge_lse(row_max, row_sum, tile_max, tile_sum);
    total += line_sum(tile_total);
    squares += line_sum(tile_squares);
  }
  picked = line_sum(picked);  // one nonzero lane at most: exact
  if (lane_in_line == 0 && row_valid) {
    lse[row] = row_max + logf(row_sum);
    target_logit[row] = picked;
    logit_sum[row] = total;
    logit_square_sum[row] = squares;
  }
}

// linear_ce_backward, grad_hidden. Grid (token blocks, column chunks): the CTA owns grad_hidden[own0 .. own0 + 63,
// column0 .. column0 + width - 1] and sweeps the vocabulary tiles.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    linear_ce_grad_hidden_kernel(const T* __restrict__ hidden, const T* __restrict__ weight,
                                 const T* __restrict__ bias, const int64_t* __restrict__ targets,
                                 const float* __restrict__ lse, const float* __restrict__ grad_lse,
                                 const float* __restrict__ grad_target, const float* __restrict__ grad_sum,
                                 const float* __restrict__ grad_square_sum, int64_t tokens, int64_t vocabulary,
                                 int64_t dim, float softcap, bool vectorized, int columns,
                                 T* __restrict__ grad_hidden) {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  BackwardStorage<T>& storage = *reinterpret_cast<BackwardStorage<T>*>(shared_bytes);
  TileStorage<T>& s = storage.base;
  float* const accumulator = reinterpret_cast<float*>(shared_bytes + accumulator_offset<T>());
  const int stride = columns + kAccumulatorPad;
  const int64_t own0 = static_cast<int64_t>(blockIdx.x) * kBlock;
  const int64_t column0 = static_cast<int64_t>(blockIdx.y) * columns;
  const int width = static_cast<int>(std::min<int64_t>(columns, std::max<int64_t>(dim - column0, 0)));
  zero_accumulator(accumulator, stride);
  // The CTA's tokens are the tile's rows throughout: their operands are staged once.
  stage_token_operands(s, own0, tokens, targets, lse, grad_lse, grad_target, grad_sum, grad_square_sum);
  float unused_column_total = 0.0f;
  for (int64_t col0 = 0; col0 < vocabulary; col0 += kBlock) {
    __syncthreads();  // every thread is done with the previous tile's bias
    stage_bias(s, bias, col0, vocabulary);
    logit_tile(s, hidden, weight, own0, tokens, col0, vocabulary, dim, vectorized);
    const float largest = gradient_tile(s, own0, tokens, col0, vocabulary, softcap, unused_column_total);
    accumulate_tile_product<T, false>(storage, largest, weight, col0, vocabulary, dim, column0, width, vectorized,
                                      accumulator, stride);
  }
  __syncthreads();
  write_accumulator(accumulator, stride, grad_hidden, own0, tokens, dim, column0, width);
}

// linear_ce_backward, grad_weight and grad_bias. Grid (vocabulary blocks, column chunks): the CTA owns
// grad_weight[own0 .. own0 + 63, column0 .. column0 + width - 1] (and grad_bias[own0 .. own0 + 63] in column chunk
// 0) and sweeps the token tiles.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    linear_ce_grad_weight_kernel(const T* __restrict__ hidden, const T* __restrict__ weight,
                                 const T* __restrict__ bias, const int64_t* __restrict__ targets,
                                 const float* __restrict__ lse, const float* __restrict__ grad_lse,
                                 const float* __restrict__ grad_target, const float* __restrict__ grad_sum,
                                 const float* __restrict__ grad_square_sum, int64_t tokens, int64_t vocabulary,
                                 int64_t dim, float softcap, bool vectorized, int columns,
                                 T* __restrict__ grad_weight, T* __restrict__ grad_bias) {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  BackwardStorage<T>& storage = *reinterpret_cast<BackwardStorage<T>*>(shared_bytes);
  TileStorage<T>& s = storage.base;
  float* const accumulator = reinterpret_cast<float*>(shared_bytes + accumulator_offset<T>());
  const int stride = columns + kAccumulatorPad;
  const int64_t own0 = static_cast<int64_t>(blockIdx.x) * kBlock;
  const int64_t column0 = static_cast<int64_t>(blockIdx.y) * columns;
  const int width = static_cast<int>(std::min<int64_t>(columns, std::max<int64_t>(dim - column0, 0)));
  zero_accumulator(accumulator, stride);
  // The CTA's vocabulary entries are the tile's columns throughout: their bias is staged once.
  stage_bias(s, bias, own0, vocabulary);
  float column_total = 0.0f;  // this thread's part of grad_bias[own0 + threadIdx.x % 64]
  for (int64_t row0 = 0; row0 < tokens; row0 += kBlock) {
    __syncthreads();  // every thread is done with the previous tile's token operands
    stage_token_operands(s, row0, tokens, targets, lse, grad_lse, grad_target, grad_sum, grad_square_sum);
    logit_tile(s, hidden, weight, row0, tokens, own0, vocabulary, dim, vectorized);
    const float largest = gradient_tile(s, row0, tokens, own0, vocabulary, softcap, column_total);
    accumulate_tile_product<T, true>(storage, largest, hidden, row0, tokens, dim, column0, width, vectorized,
                                     accumulator, stride);
  }
  __syncthreads();
  write_accumulator(accumulator, stride, grad_weight, own0, vocabulary, dim, column0, width);
  if (grad_bias != nullptr && blockIdx.y == 0) {
    // Threads c, c + 64, c + 128, c + 192 hold column c's partials: added in that order (deterministic). The z tile
    // is free scratch space after the sweep.
    float* const partials = &s.tile[0][0];
    partials[threadIdx.x] = column_total;
    __syncthreads();
    if (threadIdx.x < kBlock && own0 + threadIdx.x < vocabulary) {
      float sum = partials[threadIdx.x];
#pragma unroll
      for (int p = 1; p < kRowsPerPass; ++p) sum += partials[threadIdx.x + kBlock * p];
      grad_bias[own0 + threadIdx.x] = from_float<T>(sum);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with the CUDA element type of the inputs (the dtype was checked before).
template <typename Fn>
void dispatch_features(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(TypeTag<float>{});
      break;
    case at::kHalf:
      fn(TypeTag<__half>{});
      break;
    case at::kBFloat16:
      fn(TypeTag<__nv_bfloat16>{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "leanops cross-entropy CUDA kernels: unsupported dtype ", dtype_name(dtype));
  }
}

template <typename T>
const T* data_of(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

template <typename T>
T* mutable_data_of(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// hidden and weight can be read in 16-byte vectors (see load_chunk).
template <typename T>
bool can_vectorize(const at::Tensor& hidden, const at::Tensor& weight, int64_t dim) {
  constexpr int64_t kVector = 16 / static_cast<int64_t>(sizeof(T));
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
  return dim % kVector == 0 && aligned(hidden) && aligned(weight);
}

void check_on_cuda(const char* op, const at::Tensor& hidden) {
  TORCH_CHECK_VALUE(hidden.is_cuda(), "leanops.", op, ": argument 'hidden' is on ", hidden.device(),
                    "; the CUDA kernels need CUDA tensors");
}

unsigned grid_size(int64_t blocks, const char* what) {
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int>::max(), "leanops cross-entropy CUDA kernels: ", what,
                    " too large");
  return static_cast<unsigned>(blocks);
}

int64_t num_blocks(int64_t count) { return (count + kBlock - 1) / kBlock; }

// Shared memory a block may opt into on the current device.
int shared_memory_limit(const at::Device& device) {
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
  return limit;
}

// Lets `kernel` use `bytes` of dynamic shared memory (past the default 48 KB; a cheap attribute call).
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes, const at::Device& device, const char* what) {
  TORCH_CHECK(bytes <= static_cast<size_t>(shared_memory_limit(device)), "leanops cross-entropy CUDA kernels: ",
              what, " needs ", bytes, " bytes of shared memory per block; the device allows ",
              shared_memory_limit(device));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// Columns of the backward accumulators per CTA: the widest multiple of 64 up to kMaxColumns that fits the device's
// shared memory, then balanced so that the ceil(D / widest) chunks are as even as multiples of 64 allow.
template <typename T>
int accumulator_columns(int64_t dim, const at::Device& device) {
  const int64_t available = static_cast<int64_t>(shared_memory_limit(device)) -
                            static_cast<int64_t>(accumulator_offset<T>());
  int64_t widest = available / static_cast<int64_t>(sizeof(float) * kBlock) - kAccumulatorPad;
  widest = std::min<int64_t>(widest / kChunk * kChunk, kMaxColumns);
  TORCH_CHECK(widest >= kChunk, "leanops cross-entropy CUDA kernels: the device's shared memory (",
              shared_memory_limit(device), " bytes per block) is too small");
  const int64_t chunks = std::max<int64_t>(1, (dim + widest - 1) / widest);
  const int64_t per_chunk = (dim + chunks - 1) / chunks;
  return static_cast<int>(std::max<int64_t>(kChunk, (per_chunk + kChunk - 1) / kChunk * kChunk));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_forward_cuda(const at::Tensor& hidden,
                                                                                  const at::Tensor& weight,
                                                                                  const at::Tensor& bias,
                                                                                  const at::Tensor& targets,
                                                                                  double softcap) {
  check_forward(hidden, weight, bias, targets);
  check_on_cuda("linear_ce_forward", hidden);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t tokens = hidden.size(0);
  const int64_t dim = hidden.size(1);
  const int64_t vocabulary = weight.size(0);
  const at::TensorOptions options = hidden.options().dtype(at::kFloat);
  at::Tensor lse = at::empty({tokens}, options);
  at::Tensor target_logit = at::empty({tokens}, options);
  at::Tensor logit_sum = at::empty({tokens}, options);
  at::Tensor logit_square_sum = at::empty({tokens}, options);
  if (tokens == 0) return {lse, target_logit, logit_sum, logit_square_sum};
  const at::Tensor h = hidden.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.contiguous();
  const at::Tensor t = targets.contiguous();
  const bool has_bias = b.numel() > 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_features(h.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto kernel = linear_ce_forward_kernel<T>;
    const size_t bytes = sizeof(TileStorage<T>);
    allow_shared_memory(kernel, bytes, hidden.device(), "linear_ce_forward");
    kernel<<<grid_size(num_blocks(tokens), "N"), kThreads, bytes, stream>>>(
        data_of<T>(h), data_of<T>(w), has_bias ? data_of<T>(b) : nullptr, t.const_data_ptr<int64_t>(), tokens,
        vocabulary, dim, static_cast<float>(softcap), can_vectorize<T>(h, w, dim), lse.mutable_data_ptr<float>(),
        target_logit.mutable_data_ptr<float>(), logit_sum.mutable_data_ptr<float>(),
        logit_square_sum.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {lse, target_logit, logit_sum, logit_square_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_backward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& targets,
    double softcap, const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& grad_target,
    const at::Tensor& grad_sum, const at::Tensor& grad_square_sum) {
  check_backward(hidden, weight, bias, targets, lse, grad_lse, grad_target, grad_sum, grad_square_sum);
  check_on_cuda("linear_ce_backward", hidden);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t tokens = hidden.size(0);
  const int64_t dim = hidden.size(1);
  const int64_t vocabulary = weight.size(0);
  const bool has_bias = bias.numel() > 0;
  at::Tensor grad_hidden = at::empty({tokens, dim}, hidden.options());
  at::Tensor grad_weight = at::empty({vocabulary, dim}, weight.options());
  at::Tensor grad_bias = at::empty({has_bias ? vocabulary : 0}, bias.options());
  if (tokens == 0) {  // no tokens: G is empty and its sums are 0
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_hidden, grad_weight, grad_bias};
  }
  const at::Tensor h = hidden.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.contiguous();
  const at::Tensor t = targets.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor grad_lse_c = grad_lse.contiguous();
  const at::Tensor grad_target_c = grad_target.contiguous();
  const at::Tensor grad_sum_c = grad_sum.contiguous();
  const at::Tensor grad_square_sum_c = grad_square_sum.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_features(h.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int columns = accumulator_columns<T>(dim, hidden.device());
    const int64_t column_chunks = std::max<int64_t>(1, (dim + columns - 1) / columns);
    TORCH_CHECK_VALUE(column_chunks <= 65535, "leanops cross-entropy CUDA kernels: D = ", dim, " too large");
    const size_t bytes = backward_shared_bytes<T>(columns);
    const bool vectorized = can_vectorize<T>(h, w, dim);
    const float cap = static_cast<float>(softcap);
    const T* const bias_data = has_bias ? data_of<T>(b) : nullptr;

    const auto hidden_kernel = linear_ce_grad_hidden_kernel<T>;
    allow_shared_memory(hidden_kernel, bytes, hidden.device(), "linear_ce_backward");
    const dim3 hidden_grid(grid_size(num_blocks(tokens), "N"), static_cast<unsigned>(column_chunks));
    hidden_kernel<<<hidden_grid, kThreads, bytes, stream>>>(
        data_of<T>(h), data_of<T>(w), bias_data, t.const_data_ptr<int64_t>(), lse_c.const_data_ptr<float>(),
        grad_lse_c.const_data_ptr<float>(), grad_target_c.const_data_ptr<float>(), grad_sum_c.const_data_ptr<float>(),
        grad_square_sum_c.const_data_ptr<float>(), tokens, vocabulary, dim, cap, vectorized, columns,
        mutable_data_of<T>(grad_hidden));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const auto weight_kernel = linear_ce_grad_weight_kernel<T>;
    allow_shared_memory(weight_kernel, bytes, hidden.device(), "linear_ce_backward");
    const dim3 weight_grid(grid_size(num_blocks(vocabulary), "V"), static_cast<unsigned>(column_chunks));
    weight_kernel<<<weight_grid, kThreads, bytes, stream>>>(
        data_of<T>(h), data_of<T>(w), bias_data, t.const_data_ptr<int64_t>(), lse_c.const_data_ptr<float>(),
        grad_lse_c.const_data_ptr<float>(), grad_target_c.const_data_ptr<float>(), grad_sum_c.const_data_ptr<float>(),
        grad_square_sum_c.const_data_ptr<float>(), tokens, vocabulary, dim, cap, vectorized, columns,
        mutable_data_of<T>(grad_weight), has_bias ? mutable_data_of<T>(grad_bias) : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cross_entropy
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CUDA, m) {
  m.impl("linear_ce_forward", &leanops::cross_entropy::linear_ce_forward_cuda);
  m.impl("linear_ce_backward", &leanops::cross_entropy::linear_ce_backward_cuda);
}
