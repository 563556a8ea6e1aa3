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
// cores' internal accumulation (truncating, not round-to-nearest) to one step. Every statistic and every gradient
// accumulates in float32. The staging, the tile product and the epilogue's line reductions are leanops/tile_cuda.cuh's,
// shared with csrc/cuda/contrastive.cu.
//
//   forward         one kernel, one CTA per 64-token block sweeping the vocabulary tiles: 4 threads share a token
//                   row (16 entries each) and keep its running max and rescaled sum of exponentials (online
//                   log-sum-exp), the target logit and the sum and sum of squares of z'. Each tile's sums are formed
//                   first (16 entries per thread, then two shuffles) and added to the running totals: two-level
//                   summation, so their rounding errors grow with V / 64 rather than V.
//   backward        two kernels (one template, for the two sides), each output-stationary (every output element is
//                   written once, by one thread, in the input dtype): no atomics, no N x V buffer, no float32 copy of
//                   any gradient, bitwise reproducible.
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
// H100's 227 KB. Registers (ptxas, sm_90, no spills): forward 116-128 (2 CTAs per multiprocessor), backward 154-178
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
#include <tuple>
#include <type_traits>

#include "leanops/cross_entropy_host.h"
#include "leanops/tile_cuda.cuh"

namespace leanops {
namespace cross_entropy {
namespace {

using namespace cuda_tile;  // NOLINT: the kernels are written in its vocabulary (kBlock: tokens and vocabulary entries)

constexpr int kChunk = 64;  // feature dimensions staged per step; also the column width of one accumulator step
// Leading dimension (in elements) of a staged feature chunk: 144 bytes per row for 16-bit features.
template <typename T>
constexpr int kStageStride = Staging<T, kChunk>::kStride;
// Backward elementwise layout: thread t handles column t % 64 and rows t / 64 + 4 k of the tile (k < 16): a warp
// covers 32 consecutive columns of one row (conflict-free), and a thread keeps one column (grad_bias).
constexpr int kRowsPerPass = kThreads / kBlock;
constexpr int kEntriesPerThread = kBlock / kRowsPerPass;
// Leading dimension of G_hi / G_lo: a multiple of 8 elements (WMMA), 144 bytes: 8 consecutive rows of a 16-byte
// ldmatrix read start on 8 different bank quadruples.
constexpr int kSplitStride = kBlock + 8;
// Widest accumulator (columns of grad_hidden / grad_weight per CTA) and its padding (a multiple of 4 floats).
constexpr int kMaxColumns = 512;
constexpr int kAccumulatorPad = 4;
// The float16 G scaling puts a tile's largest |G| in [2^(kScaleExponent - 1), 2^kScaleExponent): below 65504.
constexpr int kScaleExponent = 15;

static_assert(kBlock % kRowsPerPass == 0 && kThreads % kBlock == 0, "elementwise layout");
static_assert(kChunk == kBlock, "the second products stage 64 x 64 feature tiles in a z stage");
static_assert(kMaxColumns % kChunk == 0, "accumulator widths are multiples of the 64-column step");

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
  alignas(128) T stage_rows[2][kBlock][kStageStride<T>];
  alignas(128) T stage_cols[2][kBlock][kStageStride<T>];
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
// Scalar helpers (and leanops/tile_cuda.cuh's).

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = max_with_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// z' = softcap tanh(z / softcap) for softcap > 0 (the reference's order of operations), else z.
__device__ __forceinline__ float capped(float z, float softcap) {
  return softcap > 0.0f ? softcap * tanhf(z / softcap) : z;
}

// 2^k for -126 <= k <= 127, exactly.
__device__ __forceinline__ float exp2_int(int k) { return __int_as_float((k + 127) << 23); }

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
    load_chunk<kChunk, true>(s.stage_rows[0], hidden, row0, tokens, dim, 0, vectorized);
    load_chunk<kChunk, true>(s.stage_cols[0], weight, col0, vocabulary, dim, 0, vectorized);
    copy_async_commit();
  }
  // Step i computes from buffer i % 2 while step i + 1's chunk is copied into the other buffer, which the barrier
  // that ended step i - 1 released.
  TileProduct<T> product;
  for (int64_t step = 0; step < steps; ++step) {
    const int buffer = static_cast<int>(step & 1);
    if (step + 1 < steps) {
      const int64_t next = (step + 1) * kChunk;
      load_chunk<kChunk, true>(s.stage_rows[buffer ^ 1], hidden, row0, tokens, dim, next, vectorized);
      load_chunk<kChunk, true>(s.stage_cols[buffer ^ 1], weight, col0, vocabulary, dim, next, vectorized);
      copy_async_commit();
      copy_async_wait<1>();
    } else {
      copy_async_wait<0>();
    }
    __syncthreads();  // this step's chunk is in shared memory
    product.template add<kChunk>(s.stage_rows[buffer], s.stage_cols[buffer]);
    __syncthreads();  // every warp is done with this buffer before step + 2's chunk is copied into it
  }
  product.store(s.tile);
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
      load_chunk<kChunk>(stage, features, other0, other_count, dim, column0 + step * kChunk, vectorized);
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
          wmma::load_matrix_sync(b, &stage[e][sub_col + 16 * j], kStageStride<T>);
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
      load_chunk<kChunk>(stage, features, other0, other_count, dim, column0 + step * kChunk, vectorized);
      __syncthreads();
      float partial[4][4];
      register_tile_product<kBlock>(
          partial, [&](int i, int e) { return kTransposed ? s.tile[e][ty + 16 * i] : s.tile[ty + 16 * i][e]; },
          [&](int j, int e) { return to_float(stage[e][tx + 16 * j]); });
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
  const auto [line, lane_in_line, row0, row, row_valid] = own_line(tokens);
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
    float tile_total = 0.0f;
    float tile_squares = 0.0f;
#pragma unroll
    for (int j = 0; j < kEntriesPerLane; ++j) {
      const int c = lane_in_line + kLanesPerLine * j;
      const int64_t col = col0 + c;
      logits[j] = capped(s.tile[line][c] + s.operands.bias[c], softcap);
      if (col < vocabulary) {
        tile_total += logits[j];
        tile_squares = fmaf(logits[j], logits[j], tile_squares);
        if (col == target) picked = logits[j];
      }
    }
    // A tile always has a valid column: its max is -inf only if every logit is -inf.
    float tile_max, tile_sum;
    line_lse(logits, lane_in_line, col0, vocabulary, tile_max, tile_sum);
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

// linear_ce_backward. Grid (own blocks, column chunks): the CTA owns grad_out[own0 .. own0 + 63, column0 .. column0 +
// width - 1] and sweeps the other side's tiles, "own" and "other" being
//   kWeightSide = false: tokens and vocabulary entries; grad_out = grad_hidden;
//   kWeightSide = true:  vocabulary entries and tokens; grad_out = grad_weight, and in column chunk 0 the CTA also
//                        writes grad_bias[own0 .. own0 + 63] (without a bias grad_bias is null).
template <typename T, bool kWeightSide>
__global__ void __launch_bounds__(kThreads, 1)
    linear_ce_backward_kernel(const T* __restrict__ hidden, const T* __restrict__ weight, const T* __restrict__ bias,
                              const int64_t* __restrict__ targets, const float* __restrict__ lse,
                              const float* __restrict__ grad_lse, const float* __restrict__ grad_target,
                              const float* __restrict__ grad_sum, const float* __restrict__ grad_square_sum,
                              int64_t tokens, int64_t vocabulary, int64_t dim, float softcap, bool vectorized,
                              int columns, T* __restrict__ grad_out, T* __restrict__ grad_bias) {
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  BackwardStorage<T>& storage = *reinterpret_cast<BackwardStorage<T>*>(shared_bytes);
  TileStorage<T>& s = storage.base;
  float* const accumulator = reinterpret_cast<float*>(shared_bytes + accumulator_offset<T>());
  const int stride = columns + kAccumulatorPad;
  const int64_t own0 = static_cast<int64_t>(blockIdx.x) * kBlock;
  const int64_t own_count = kWeightSide ? vocabulary : tokens;
  const int64_t other_count = kWeightSide ? tokens : vocabulary;
  const int64_t column0 = static_cast<int64_t>(blockIdx.y) * columns;
  const int width = static_cast<int>(std::min<int64_t>(columns, std::max<int64_t>(dim - column0, 0)));
  zero_accumulator(accumulator, stride);
  // The CTA's own side is the same side of the tile throughout, so its operands are staged once: the vocabulary
  // entries' bias (the tile's columns), or the tokens' operands (its rows).
  if (kWeightSide) {
    stage_bias(s, bias, own0, vocabulary);
  } else {
    stage_token_operands(s, own0, tokens, targets, lse, grad_lse, grad_target, grad_sum, grad_square_sum);
  }
  float column_total = 0.0f;  // grad_weight: this thread's part of grad_bias[own0 + threadIdx.x % 64]
  for (int64_t other0 = 0; other0 < other_count; other0 += kBlock) {
    __syncthreads();  // every thread is done with the previous tile's operands
    if (kWeightSide) {
      stage_token_operands(s, other0, tokens, targets, lse, grad_lse, grad_target, grad_sum, grad_square_sum);
    } else {
      stage_bias(s, bias, other0, vocabulary);
    }
    const int64_t row0 = kWeightSide ? other0 : own0;
    const int64_t col0 = kWeightSide ? own0 : other0;
    logit_tile(s, hidden, weight, row0, tokens, col0, vocabulary, dim, vectorized);
    const float largest = gradient_tile(s, row0, tokens, col0, vocabulary, softcap, column_total);
    accumulate_tile_product<T, kWeightSide>(storage, largest, kWeightSide ? hidden : weight, other0, other_count,
                                            dim, column0, width, vectorized, accumulator, stride);
  }
  __syncthreads();
  write_accumulator(accumulator, stride, grad_out, own0, own_count, dim, column0, width);
  if (kWeightSide && grad_bias != nullptr && blockIdx.y == 0) {
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

constexpr const char* kKernels = "leanops cross-entropy CUDA kernels";
constexpr const char* kUnsupported = "leanops cross-entropy CUDA kernels: unsupported dtype ";

template <typename T>
T* mutable_data_of(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// Shared memory a block may opt into on the current device.
int shared_memory_limit(const at::Device& device) {
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index()));
  return limit;
}

// Lets `kernel` use `bytes` of dynamic shared memory (past the default 48 KB; a cheap attribute call).
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes, const at::Device& device, const char* what) {
  TORCH_CHECK(bytes <= static_cast<size_t>(shared_memory_limit(device)), kKernels, ": ", what, " needs ", bytes,
              " bytes of shared memory per block; the device allows ", shared_memory_limit(device));
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
  TORCH_CHECK(widest >= kChunk, kKernels, ": the device's shared memory (", shared_memory_limit(device),
              " bytes per block) is too small");
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
  const c10::cuda::CUDAGuard guard = device_guard("linear_ce_forward", "hidden", hidden);
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
  dispatch_features(h.scalar_type(), kUnsupported, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto kernel = linear_ce_forward_kernel<T>;
    const size_t bytes = sizeof(TileStorage<T>);
    allow_shared_memory(kernel, bytes, hidden.device(), "linear_ce_forward");
    kernel<<<grid_size(num_blocks(tokens), kKernels, "N"), kThreads, bytes, stream>>>(
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
  const c10::cuda::CUDAGuard guard = device_guard("linear_ce_backward", "hidden", hidden);
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
  dispatch_features(h.scalar_type(), kUnsupported, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int columns = accumulator_columns<T>(dim, hidden.device());
    const int64_t column_chunks = std::max<int64_t>(1, (dim + columns - 1) / columns);
    TORCH_CHECK_VALUE(column_chunks <= 65535, kKernels, ": D = ", dim, " too large");
    const size_t bytes = backward_shared_bytes<T>(columns);
    const bool vectorized = can_vectorize<T>(h, w, dim);
    const float cap = static_cast<float>(softcap);
    const T* const bias_data = has_bias ? data_of<T>(b) : nullptr;

    // grad_hidden (one CTA per token block and column chunk), then grad_weight and grad_bias (per vocabulary block).
    const auto launch = [&](auto weight_side, int64_t own_count, const char* own_name, T* grad_out, T* grad_bias_out) {
      const auto kernel = linear_ce_backward_kernel<T, decltype(weight_side)::value>;
      allow_shared_memory(kernel, bytes, hidden.device(), "linear_ce_backward");
      const dim3 grid(grid_size(num_blocks(own_count), kKernels, own_name), static_cast<unsigned>(column_chunks));
      kernel<<<grid, kThreads, bytes, stream>>>(
          data_of<T>(h), data_of<T>(w), bias_data, t.const_data_ptr<int64_t>(), lse_c.const_data_ptr<float>(),
          grad_lse_c.const_data_ptr<float>(), grad_target_c.const_data_ptr<float>(),
          grad_sum_c.const_data_ptr<float>(), grad_square_sum_c.const_data_ptr<float>(), tokens, vocabulary, dim, cap,
          vectorized, columns, grad_out, grad_bias_out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch(std::false_type{}, tokens, "N", mutable_data_of<T>(grad_hidden), nullptr);
    launch(std::true_type{}, vocabulary, "V", mutable_data_of<T>(grad_weight),
           has_bias ? mutable_data_of<T>(grad_bias) : nullptr);
  });
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cross_entropy
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CUDA, m) {
  namespace k = leanops::cross_entropy;
  k::register_kernels(m, &k::linear_ce_forward_cuda, &k::linear_ce_backward_cuda);
}
