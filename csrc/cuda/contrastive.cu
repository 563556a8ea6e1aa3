// CUDA kernels of the blockwise contrastive losses: CLIP/InfoNCE (clip_forward, clip_backward) and SigLIP
// (siglip_forward, siglip_backward). csrc/ops.cpp states each op's contract; python/leanops/reference/contrastive.py
// is the same math in plain PyTorch.
//
// Math. x = image, y = text, both (B, D); S[i, j] = <x_i, y_j>; s = scale.
//   clip_forward:    row_lse[i] = logsumexp_j(s[i] S[i, j]),  col_lse[j] = logsumexp_i(s[j] S[i, j])
//   clip_backward:   p = exp(s[i] S - row_lse[i]) (row softmax), q = exp(s[j] S - col_lse[j]) (column softmax),
//                    G[i, j] = row_weight[i] s[i] p[i, j] + col_weight[j] s[j] q[i, j]
//                    grad_image = G y, grad_text = G^T x,
//                    grad_scale[i] = row_weight[i] sum_j p[i, j] S[i, j] + col_weight[i] sum_k q[k, i] S[k, i]
//   siglip_forward:  z = s S + bias (s, bias scalars), label = +1 where groups[i] == groups[j] else -1,
//                    row_loss[i] = sum_j softplus(-label z)
//   siglip_backward: D[i, j] = -row_weight[i] label sigmoid(-label z),
//                    grad_image = s D y, grad_text = s D^T x, grad_scale = sum D S, grad_bias = sum D
//
// Tiling. S is never stored: a CTA of 256 threads computes one 64 x 64 tile of it at a time into shared memory
// (float32), staging 32 feature dimensions of the tile's 64 image rows and 64 text rows per step (zero padded past
// B and D). float32 features take a plain SIMT path, 4 x 4 entries per thread with float32 fused multiply-adds (no
// TF32: the results must match float32 arithmetic to ~1e-6). bfloat16 / float16 features take the tensor cores
// through WMMA (16 x 16 x 16, float32 accumulators): their products are exact in float32, so S is as accurate as for
// float32 features. Both paths sum each 32-dimension chunk into a fresh partial and add the partials with float32
// adds, which confines the tensor cores' internal accumulation (not round-to-nearest on every add) to one chunk and
// makes S at least as accurate as a plain float32 dot product. The "epilogue" then runs over the tile in shared
// memory; every statistic accumulates in float32. B = 0 returns empty outputs (zero scalars) without a launch. The
// staging, the tile product and the epilogue's line reductions are leanops/tile_cuda.cuh's, shared with
// csrc/cuda/cross_entropy.cu.
//
//   clip_forward   one kernel over row blocks; a CTA sweeps every column block, keeping each row's running max
//                  and sum of exponentials, and from the same tile each column's max and sum over the tile's 64 rows.
//                  Both directions therefore come from one pass over S. The column partials of a CTA are merged in
//                  place across the row blocks it owns (a grid-stride loop), one slot per CTA and column of a
//                  float32 workspace partial[2][slots][B]; a second small kernel merges the slots into col_lse.
//   clip_backward  two kernels, run one after the other on the stream: the row kernel (one CTA per row block,
//                  sweeping the column blocks) forms the G tile in shared memory and adds G_tile y_block to its own
//                  rows of grad_image, and writes the row part of grad_scale; the column kernel (one CTA per column
//                  block, sweeping the row blocks) recomputes the tile and adds G_tile^T x_block to its own rows of
//                  grad_text, and adds the column part of grad_scale. Every output row belongs to one CTA and every
//                  element to one thread of it: no atomics, and the results are bitwise reproducible.
//   siglip_forward one kernel over row blocks.
//   siglip_backward the two-kernel structure of clip_backward with D in place of G; the row kernel also writes the
//                  per-row sums of D and D S, which one ATen reduction turns into grad_bias and grad_scale
//                  (deterministic: no atomics).
//
// The second products (G_tile y_block, G_tile^T x_block) are float32 SIMT loops (fmaf) with G kept in float32:
// rounding G to the feature dtype for the tensor cores would cost bfloat16 inputs about 1e-2 of relative accuracy.
//
// Memory, besides the inputs and outputs (O(B D)): clip_forward's workspace, 2 x slots x B floats with
// slots = min(ceil(B / 64), 2 x multiprocessors), i.e. at most B^2 / 8 bytes and at most 2.1 KB per row of the batch
// on an H100 (132 multiprocessors: 138 MB at B = 64K, against 16 GB for the B x B float32 logits);
// siglip_backward's 2 x B floats; contiguous copies of non-contiguous inputs. Shared memory is static (35.6 KB per CTA
// for float32 features, 28.9 KB for 16-bit ones: under the 48 KB that needs no opt-in). Index arithmetic on B and D
// is 64-bit.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "leanops/contrastive_host.h"
#include "leanops/tile_cuda.cuh"

namespace leanops {
namespace contrastive {
namespace {

using namespace cuda_tile;  // NOLINT: the kernels are written in its vocabulary (kBlock: rows and columns of S)

constexpr int kChunk = 32;  // feature dimensions staged in shared memory per step
// Resident CTAs per multiprocessor the tile kernels are compiled for (at most 128 registers per thread; without the
// hint ptxas chose 64 registers and spilled in clip_forward). clip_forward launches exactly this many CTAs per
// multiprocessor (one wave), each owning one row of the column-partial workspace.
constexpr int kCtasPerMultiprocessor = 2;
// Leading dimension (in elements) of a staged feature chunk: 40 elements = 80 bytes per row for 16-bit features.
template <typename T>
constexpr int kStageStride = Staging<T, kChunk>::kStride;

static_assert(kChunk == 32, "the tile products give each lane of a warp one feature dimension of the chunk");
static_assert(kBlock % kWarps == 0, "the tile products give each warp kBlock / kWarps output rows");

// Everything a CTA keeps in shared memory (static: 35.6 KB for float32 features, 28.9 KB for 16-bit ones).
template <typename T>
struct SharedStorage {
  // The current S tile [row][column]; the backward kernels overwrite it in place with G (or D).
  alignas(32) float tile[kBlock][kTileStride];
  // Staged feature chunks: the tile's image rows and text rows while S is computed; stage_a also holds the
  // other side's feature chunk during the tile product.
  alignas(32) T stage_a[kBlock][kStageStride<T>];
  alignas(32) T stage_b[kBlock][kStageStride<T>];
  // Per-index operands of the tile's "other" side (its columns in a row kernel, its rows in a column kernel).
  float other_scale[kBlock];
  float other_lse[kBlock];
  float other_coefficient[kBlock];
  int64_t other_group[kBlock];
};

// ---------------------------------------------------------------------------------------------------------------
// Scalar helpers (and leanops/tile_cuda.cuh's).

// softplus(t) = log(1 + e^t) = max(t, 0) + log1p(e^-|t|): no overflow for large t, full accuracy for very negative t.
__device__ __forceinline__ float softplus(float t) { return fmaxf(t, 0.0f) + log1pf(expf(-fabsf(t))); }

// sigmoid(u) = 1 / (1 + e^-u), through e^-|u| so that nothing overflows.
__device__ __forceinline__ float sigmoid(float u) {
  const float e = expf(-fabsf(u));
  const float r = 1.0f / (1.0f + e);
  return u >= 0.0f ? r : e * r;
}

// ---------------------------------------------------------------------------------------------------------------
// Tile building blocks. Every function below is called by all threads of the CTA (they contain __syncthreads).

// s.tile[r][c] = <image[row0 + r], text[col0 + c]> for the 64 x 64 tile (0 where the row or column is past B).
// Ends with a barrier: the tile (and whatever else was written to shared memory before the call) is visible to all.
template <typename T>
__device__ void similarity_tile(SharedStorage<T>& s, const T* __restrict__ image, const T* __restrict__ text,
                                int64_t row0, int64_t col0, int64_t batch, int64_t dim, bool vectorized) {
  TileProduct<T> product;
  for (int64_t k0 = 0; k0 < dim; k0 += kChunk) {
    load_chunk<kChunk>(s.stage_a, image, row0, batch, dim, k0, vectorized);
    load_chunk<kChunk>(s.stage_b, text, col0, batch, dim, k0, vectorized);
    __syncthreads();
    product.template add<kChunk>(s.stage_a, s.stage_b);
    __syncthreads();  // before the next chunk overwrites the stages
  }
  product.store(s.tile);
  __syncthreads();
}

// out[own0 + o][d] += alpha * sum_e W[o][e] * features[other0 + e][d] for the tile's 64 own lines o, where
// W[o][e] = s.tile[o][e] (kTransposed = false: own lines are the tile's rows) or s.tile[e][o] (kTransposed = true:
// own lines are its columns). Only this CTA writes rows own0 .. own0 + 63 of `out`, and each of their elements is
// always updated by the same thread (warp w, lane l: lines w + 8 a, dimension d0 + l), so the read-modify-write
// needs no atomics. Entries of s.tile past B must be 0. The tile must be complete (a barrier since it was written).
template <typename T, bool kTransposed>
__device__ void accumulate_tile_product(SharedStorage<T>& s, const T* __restrict__ features, int64_t other0,
                                        float* __restrict__ out, int64_t own0, int64_t batch, int64_t dim,
                                        float alpha, bool vectorized) {
  constexpr int kLinesPerWarp = kBlock / kWarps;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
    load_chunk<kChunk>(s.stage_a, features, other0, batch, dim, d0, vectorized);
    __syncthreads();
    float accumulator[kLinesPerWarp];
#pragma unroll
    for (int a = 0; a < kLinesPerWarp; ++a) accumulator[a] = 0.0f;
#pragma unroll 2
    for (int e = 0; e < kBlock; ++e) {
      const float feature = to_float(s.stage_a[e][lane]);
#pragma unroll
      for (int a = 0; a < kLinesPerWarp; ++a) {
        const int o = warp + kWarps * a;  // the same for the whole warp: a broadcast read
        const float weight = kTransposed ? s.tile[e][o] : s.tile[o][e];
        accumulator[a] = fmaf(weight, feature, accumulator[a]);
      }
    }
    const int64_t d = d0 + lane;
#pragma unroll
    for (int a = 0; a < kLinesPerWarp; ++a) {
      const int64_t own = own0 + warp + kWarps * a;
      if (own < batch && d < dim) out[own * dim + d] += alpha * accumulator[a];
    }
    __syncthreads();  // before the next chunk (or the next tile) overwrites stage_a
  }
}

// The sweep of a backward kernel (clip_backward, siglip_backward): the CTA owns one block of lines of S (rows in the
// row kernel, kColumnSide = false; columns in the column kernel) and sweeps the blocks of the other side. For each,
// stage(other, valid) puts the other side's operands of entry other = other0 + threadIdx.x into shared memory (threads
// 0..63; valid: other < B); then S's tile is computed; each thread replaces its 16 entries e of its own line (the
// epilogue layout) by their gradient weights, weight(similarity, e, valid), which must be 0 where not valid (valid:
// both the own and the other index < B); and the tile product adds alpha times the weights times the other side's
// features to the CTA's own rows of grad_out.
template <typename T, bool kColumnSide, typename Stage, typename Weight>
__device__ __forceinline__ void backward_sweep(SharedStorage<T>& s, const T* __restrict__ image,
                                               const T* __restrict__ text, int64_t batch, int64_t dim, bool vectorized,
                                               float* __restrict__ grad_out, float alpha, Stage stage, Weight weight) {
  const OwnLine own = own_line(batch);
  for (int64_t other0 = 0; other0 < batch; other0 += kBlock) {
    __syncthreads();  // every thread is done with the previous tile and its operands
    if (threadIdx.x < kBlock) {
      const int64_t other = other0 + threadIdx.x;
      stage(other, other < batch);
    }
    const int64_t row0 = kColumnSide ? other0 : own.first;
    const int64_t col0 = kColumnSide ? own.first : other0;
    similarity_tile(s, image, text, row0, col0, batch, dim, vectorized);
#pragma unroll 4
    for (int j = 0; j < kEntriesPerLane; ++j) {
      const int e = own.lane + kLanesPerLine * j;
      float& cell = kColumnSide ? s.tile[e][own.line] : s.tile[own.line][e];
      cell = weight(cell, e, own.valid && other0 + e < batch);
    }
    __syncthreads();  // the weights complete
    accumulate_tile_product<T, kColumnSide>(s, kColumnSide ? image : text, other0, grad_out, own.first, batch, dim,
                                            alpha, vectorized);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Kernels. Epilogue layout: thread t owns line t / 4 of the tile (a row in a row kernel, a column in a column
// kernel) and, within it, the 16 entries e = t % 4 + 4 j on the other side.

// clip_forward, pass 1: row_lse, and per-(CTA, column) partial column statistics. Grid: `slots` CTAs; CTA g takes
// row blocks g, g + slots, ... and owns row g of the workspace.
template <typename T>
__global__ void __launch_bounds__(kThreads, kCtasPerMultiprocessor)
    clip_forward_kernel(const T* __restrict__ image, const T* __restrict__ text, const float* __restrict__ scale,
                        int64_t batch, int64_t dim, bool vectorized, float* __restrict__ row_lse,
                        float* __restrict__ partial_max, float* __restrict__ partial_sum) {
  __shared__ SharedStorage<T> s;
  const int line = threadIdx.x / kLanesPerLine;
  const int lane_in_line = threadIdx.x % kLanesPerLine;
  const int64_t num_blocks = (batch + kBlock - 1) / kBlock;
  float* const slot_max = partial_max + static_cast<int64_t>(blockIdx.x) * batch;
  float* const slot_sum = partial_sum + static_cast<int64_t>(blockIdx.x) * batch;

  for (int64_t row_block = blockIdx.x; row_block < num_blocks; row_block += gridDim.x) {
    const bool first_row_block = row_block == static_cast<int64_t>(blockIdx.x);
    const int64_t row0 = row_block * kBlock;
    const int64_t row = row0 + line;
    const bool row_valid = row < batch;
    const float row_scale = row_valid ? scale[row] : 0.0f;
    float row_max = -kInfinity;
    float row_sum = 0.0f;

    for (int64_t col0 = 0; col0 < batch; col0 += kBlock) {
      __syncthreads();  // every thread is done with the previous tile and its column operands
      if (threadIdx.x < kBlock) {
        const int64_t col = col0 + threadIdx.x;
        s.other_scale[threadIdx.x] = col < batch ? scale[col] : 0.0f;
      }
      similarity_tile(s, image, text, row0, col0, batch, dim, vectorized);

      // This thread's row: (max, sum) of s[row] S[row, col] over the tile's valid columns, merged into the row's.
      {
        float logits[kEntriesPerLane];
#pragma unroll
        for (int j = 0; j < kEntriesPerLane; ++j) {
          logits[j] = row_scale * s.tile[line][lane_in_line + kLanesPerLine * j];
        }
        float tile_max, tile_sum;
        line_lse(logits, lane_in_line, col0, batch, tile_max, tile_sum);
        merge_lse(row_max, row_sum, tile_max, tile_sum);
      }

      // This thread's column: (max, sum) of s[col] S[row, col] over the tile's valid rows, merged into this CTA's
      // workspace slot (only this thread of this CTA ever touches the slot, so plain loads and stores suffice).
      {
        const int c = line;
        const int64_t col = col0 + c;
        const float col_scale = s.other_scale[c];
        float logits[kEntriesPerLane];
#pragma unroll
        for (int j = 0; j < kEntriesPerLane; ++j) {
          logits[j] = col_scale * s.tile[lane_in_line + kLanesPerLine * j][c];
        }
        float tile_max, tile_sum;
        line_lse(logits, lane_in_line, row0, batch, tile_max, tile_sum);
        if (lane_in_line == 0 && col < batch) {
          if (first_row_block) {
            slot_max[col] = tile_max;
            slot_sum[col] = tile_sum;
          } else {
            float merged_max = slot_max[col];
            float merged_sum = slot_sum[col];
            merge_lse(merged_max, merged_sum, tile_max, tile_sum);
            slot_max[col] = merged_max;
            slot_sum[col] = merged_sum;
          }
        }
      }
    }
    if (lane_in_line == 0 && row_valid) row_lse[row] = row_max + logf(row_sum);
  }
}

// clip_forward, pass 2: col_lse[j] from the `slots` partial statistics of column j.
__global__ void __launch_bounds__(kThreads)
    clip_column_lse_kernel(const float* __restrict__ partial_max, const float* __restrict__ partial_sum,
                           int64_t slots, int64_t batch, float* __restrict__ col_lse) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= batch) return;
  float max_value = -kInfinity;
  float sum = 0.0f;
  for (int64_t g = 0; g < slots; ++g) {
    merge_lse(max_value, sum, partial_max[g * batch + col], partial_sum[g * batch + col]);
  }
  col_lse[col] = max_value + logf(sum);
}

// clip_backward. Row kernel (kColumnSide = false): one CTA per row block; grad_out = grad_image, and it writes
// grad_scale[i] = row_weight[i] sum_j p S. Column kernel (kColumnSide = true): one CTA per column block;
// grad_out = grad_text, and it adds col_weight[j] sum_i q S to grad_scale[j] (it runs after the row kernel).
// "own" is this CTA's side (the row i in the row kernel, the column j in the column kernel), "other" the swept side.
template <typename T, bool kColumnSide>
__global__ void __launch_bounds__(kThreads, kCtasPerMultiprocessor)
    clip_backward_kernel(const T* __restrict__ image, const T* __restrict__ text, const float* __restrict__ scale,
                         const float* __restrict__ row_lse, const float* __restrict__ col_lse,
                         const float* __restrict__ row_weight, const float* __restrict__ col_weight, int64_t batch,
                         int64_t dim, bool vectorized, float* __restrict__ grad_out, float* __restrict__ grad_scale) {
  __shared__ SharedStorage<T> s;
  const float* const own_lse = kColumnSide ? col_lse : row_lse;
  const float* const own_weight = kColumnSide ? col_weight : row_weight;
  const float* const other_lse = kColumnSide ? row_lse : col_lse;
  const float* const other_weight = kColumnSide ? row_weight : col_weight;
  const auto [line, lane_in_line, own0, own, own_valid] = own_line(batch);
  const float own_scale = own_valid ? scale[own] : 0.0f;
  const float own_lse_value = own_valid ? own_lse[own] : 0.0f;
  const float own_coefficient = own_valid ? own_weight[own] * own_scale : 0.0f;
  // sum over the other side of (own side's softmax) * S: sum_j p[i, j] S[i, j] (rows), sum_i q[i, j] S[i, j] (cols)
  float own_total = 0.0f;
  const auto stage = [&](int64_t other, bool valid) {
    const float other_scale = valid ? scale[other] : 0.0f;
    s.other_scale[threadIdx.x] = other_scale;
    s.other_lse[threadIdx.x] = valid ? other_lse[other] : 0.0f;
    s.other_coefficient[threadIdx.x] = valid ? other_weight[other] * other_scale : 0.0f;
  };
  // G in place of S. own_probability is p in the row kernel and q in the column kernel; other_probability the other
  // one, so G = own_coefficient own_probability + other_coefficient other_probability in both.
  const auto gradient_weight = [&](float similarity, int e, bool valid) {
    const float own_probability = expf(own_scale * similarity - own_lse_value);
    const float other_probability = expf(s.other_scale[e] * similarity - s.other_lse[e]);
    own_total += valid ? own_probability * similarity : 0.0f;
    return valid ? own_coefficient * own_probability + s.other_coefficient[e] * other_probability : 0.0f;
  };
  backward_sweep<T, kColumnSide>(s, image, text, batch, dim, vectorized, grad_out, 1.0f, stage, gradient_weight);
  own_total = line_sum(own_total);
  if (lane_in_line == 0 && own_valid) {
    const float part = own_weight[own] * own_total;
    if (kColumnSide) {
      grad_scale[own] += part;  // the row kernel, earlier on the stream, wrote the row part
    } else {
      grad_scale[own] = part;
    }
  }
}

// siglip_forward: row_loss[i] = sum_j softplus(-label z). One CTA per row block.
template <typename T>
__global__ void __launch_bounds__(kThreads, kCtasPerMultiprocessor)
    siglip_forward_kernel(const T* __restrict__ image, const T* __restrict__ text, const float* __restrict__ scale,
                          const float* __restrict__ bias, const int64_t* __restrict__ groups, int64_t batch,
                          int64_t dim, bool vectorized, float* __restrict__ row_loss) {
  __shared__ SharedStorage<T> s;
  const float scale_value = *scale;  // read on the device: no host synchronisation
  const float bias_value = *bias;
  const auto [line, lane_in_line, row0, row, row_valid] = own_line(batch);
  const int64_t row_group = row_valid ? groups[row] : 0;
  float total = 0.0f;

  for (int64_t col0 = 0; col0 < batch; col0 += kBlock) {
    __syncthreads();
    if (threadIdx.x < kBlock) {
      const int64_t col = col0 + threadIdx.x;
      s.other_group[threadIdx.x] = col < batch ? groups[col] : 0;
    }
    similarity_tile(s, image, text, row0, col0, batch, dim, vectorized);
#pragma unroll 4
    for (int j = 0; j < kEntriesPerLane; ++j) {
      const int c = lane_in_line + kLanesPerLine * j;
      const float z = scale_value * s.tile[line][c] + bias_value;
      const float t = s.other_group[c] == row_group ? -z : z;  // -label z
      total += (row_valid && col0 + c < batch) ? softplus(t) : 0.0f;
    }
  }
  total = line_sum(total);
  if (lane_in_line == 0 && row_valid) row_loss[row] = total;
}

// siglip_backward. Row kernel (kColumnSide = false): grad_out = grad_image, and per-row sums of D (row_d) and D S
// (row_ds). Column kernel: grad_out = grad_text. Both add scale * (tile product) to their own rows.
template <typename T, bool kColumnSide>
__global__ void __launch_bounds__(kThreads, kCtasPerMultiprocessor)
    siglip_backward_kernel(const T* __restrict__ image, const T* __restrict__ text, const float* __restrict__ scale,
                           const float* __restrict__ bias, const int64_t* __restrict__ groups,
                           const float* __restrict__ row_weight, int64_t batch, int64_t dim, bool vectorized,
                           float* __restrict__ grad_out, float* __restrict__ row_d, float* __restrict__ row_ds) {
  __shared__ SharedStorage<T> s;
  const float scale_value = *scale;
  const float bias_value = *bias;
  const auto [line, lane_in_line, own0, own, own_valid] = own_line(batch);
  const int64_t own_group = own_valid ? groups[own] : 0;
  // D carries the row's weight: the own row's in the row kernel, the other side's (staged) in the column kernel.
  const float own_weight = (!kColumnSide && own_valid) ? row_weight[own] : 0.0f;
  float d_total = 0.0f;
  float ds_total = 0.0f;
  const auto stage = [&](int64_t other, bool valid) {
    s.other_group[threadIdx.x] = valid ? groups[other] : 0;
    s.other_coefficient[threadIdx.x] = (kColumnSide && valid) ? row_weight[other] : 0.0f;
  };
  const auto gradient_weight = [&](float similarity, int e, bool valid) {
    const float z = scale_value * similarity + bias_value;
    const bool positive = s.other_group[e] == own_group;  // label = +1
    const float weight = kColumnSide ? s.other_coefficient[e] : own_weight;
    // label +1: D = -w sigmoid(-z); label -1: D = +w sigmoid(z).
    const float d = positive ? -weight * sigmoid(-z) : weight * sigmoid(z);
    if (!kColumnSide) {
      d_total += valid ? d : 0.0f;
      ds_total += valid ? d * similarity : 0.0f;
    }
    return valid ? d : 0.0f;
  };
  backward_sweep<T, kColumnSide>(s, image, text, batch, dim, vectorized, grad_out, scale_value, stage,
                                 gradient_weight);
  if (!kColumnSide) {
    d_total = line_sum(d_total);
    ds_total = line_sum(ds_total);
    if (lane_in_line == 0 && own_valid) {
      row_d[own] = d_total;
      row_ds[own] = ds_total;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.

constexpr const char* kKernels = "leanops contrastive CUDA kernels";
constexpr const char* kUnsupported = "leanops contrastive CUDA kernels: unsupported feature dtype ";

std::tuple<at::Tensor, at::Tensor> clip_forward_cuda(const at::Tensor& image, const at::Tensor& text,
                                                     const at::Tensor& scale) {
  check_clip_forward(image, text, scale);
  const c10::cuda::CUDAGuard guard = device_guard("clip_forward", "image", image);
  const int64_t batch = image.size(0);
  const int64_t dim = image.size(1);
  const at::TensorOptions options = image.options().dtype(at::kFloat);
  at::Tensor row_lse = at::empty({batch}, options);
  at::Tensor col_lse = at::empty({batch}, options);
  if (batch == 0) return {row_lse, col_lse};
  const auto [x, y, scale_c] = contiguous(image, text, scale);
  const int64_t blocks = num_blocks(batch);
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, image.device().index()));
  const int64_t slots = std::min<int64_t>(blocks, int64_t{kCtasPerMultiprocessor} * multiprocessors);
  at::Tensor partial = at::empty({2, slots, batch}, options);
  float* const partial_max = partial.mutable_data_ptr<float>();
  float* const partial_sum = partial_max + slots * batch;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_features(x.scalar_type(), kUnsupported, [&](auto tag) {
    using T = typename decltype(tag)::type;
    clip_forward_kernel<T><<<grid_size(slots, kKernels, "batch"), kThreads, 0, stream>>>(
        data_of<T>(x), data_of<T>(y), scale_c.const_data_ptr<float>(), batch, dim, can_vectorize<T>(x, y, dim),
        row_lse.mutable_data_ptr<float>(), partial_max, partial_sum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  clip_column_lse_kernel<<<grid_size((batch + kThreads - 1) / kThreads, kKernels, "batch"), kThreads, 0, stream>>>(
      partial_max, partial_sum, slots, batch, col_lse.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_backward_cuda(const at::Tensor& image, const at::Tensor& text,
                                                                  const at::Tensor& scale, const at::Tensor& row_lse,
                                                                  const at::Tensor& col_lse,
                                                                  const at::Tensor& row_weight,
                                                                  const at::Tensor& col_weight) {
  check_clip_backward(image, text, scale, row_lse, col_lse, row_weight, col_weight);
  const c10::cuda::CUDAGuard guard = device_guard("clip_backward", "image", image);
  const int64_t batch = image.size(0);
  const int64_t dim = image.size(1);
  const at::TensorOptions options = image.options().dtype(at::kFloat);
  // Zeroed: the kernels add each tile's contribution.
  at::Tensor grad_image = at::zeros({batch, dim}, options);
  at::Tensor grad_text = at::zeros({batch, dim}, options);
  at::Tensor grad_scale = at::empty({batch}, options);
  if (batch == 0) return {grad_image, grad_text, grad_scale};
  const auto [x, y, scale_c, row_lse_c, col_lse_c, row_weight_c, col_weight_c] =
      contiguous(image, text, scale, row_lse, col_lse, row_weight, col_weight);
  const unsigned grid = grid_size(num_blocks(batch), kKernels, "batch");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_features(x.scalar_type(), kUnsupported, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vectorized = can_vectorize<T>(x, y, dim);
    // The row kernel writes grad_scale; the column kernel, after it on the same stream, adds to it.
    const auto launch = [&](auto column_side, at::Tensor& grad_out) {
      clip_backward_kernel<T, decltype(column_side)::value><<<grid, kThreads, 0, stream>>>(
          data_of<T>(x), data_of<T>(y), scale_c.const_data_ptr<float>(), row_lse_c.const_data_ptr<float>(),
          col_lse_c.const_data_ptr<float>(), row_weight_c.const_data_ptr<float>(),
          col_weight_c.const_data_ptr<float>(), batch, dim, vectorized, grad_out.mutable_data_ptr<float>(),
          grad_scale.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch(std::false_type{}, grad_image);
    launch(std::true_type{}, grad_text);
  });
  return {grad_image, grad_text, grad_scale};
}

at::Tensor siglip_forward_cuda(const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale,
                               const at::Tensor& bias, const at::Tensor& groups) {
  check_siglip_forward(image, text, scale, bias, groups);
  const c10::cuda::CUDAGuard guard = device_guard("siglip_forward", "image", image);
  const int64_t batch = image.size(0);
  const int64_t dim = image.size(1);
  at::Tensor row_loss = at::empty({batch}, image.options().dtype(at::kFloat));
  if (batch == 0) return row_loss;
  const auto [x, y, groups_c] = contiguous(image, text, groups);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_features(x.scalar_type(), kUnsupported, [&](auto tag) {
    using T = typename decltype(tag)::type;
    siglip_forward_kernel<T><<<grid_size(num_blocks(batch), kKernels, "batch"), kThreads, 0, stream>>>(
        data_of<T>(x), data_of<T>(y), scale.const_data_ptr<float>(), bias.const_data_ptr<float>(),
        groups_c.const_data_ptr<int64_t>(), batch, dim, can_vectorize<T>(x, y, dim),
        row_loss.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return row_loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_backward_cuda(
    const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale, const at::Tensor& bias,
    const at::Tensor& groups, const at::Tensor& row_weight) {
  check_siglip_backward(image, text, scale, bias, groups, row_weight);
  const c10::cuda::CUDAGuard guard = device_guard("siglip_backward", "image", image);
  const int64_t batch = image.size(0);
  const int64_t dim = image.size(1);
  const at::TensorOptions options = image.options().dtype(at::kFloat);
  at::Tensor grad_image = at::zeros({batch, dim}, options);
  at::Tensor grad_text = at::zeros({batch, dim}, options);
  if (batch == 0) return {grad_image, grad_text, at::zeros({}, options), at::zeros({}, options)};
  const auto [x, y, groups_c, row_weight_c] = contiguous(image, text, groups, row_weight);
  // Per-row sums of D and D S: [0] and [1].
  at::Tensor row_sums = at::empty({2, batch}, options);
  float* const row_d = row_sums.mutable_data_ptr<float>();
  float* const row_ds = row_d + batch;
  const unsigned grid = grid_size(num_blocks(batch), kKernels, "batch");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_features(x.scalar_type(), kUnsupported, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool vectorized = can_vectorize<T>(x, y, dim);
    // The row kernel also writes the per-row sums.
    const auto launch = [&](auto column_side, at::Tensor& grad_out, float* d_sums, float* ds_sums) {
      siglip_backward_kernel<T, decltype(column_side)::value><<<grid, kThreads, 0, stream>>>(
          data_of<T>(x), data_of<T>(y), scale.const_data_ptr<float>(), bias.const_data_ptr<float>(),
          groups_c.const_data_ptr<int64_t>(), row_weight_c.const_data_ptr<float>(), batch, dim, vectorized,
          grad_out.mutable_data_ptr<float>(), d_sums, ds_sums);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    launch(std::false_type{}, grad_image, row_d, row_ds);
    launch(std::true_type{}, grad_text, nullptr, nullptr);
  });
  // B partial sums, reduced in float64 on the stream (deterministic, no host synchronisation).
  const at::Tensor totals = row_sums.sum(1, /*keepdim=*/false, at::kDouble).to(at::kFloat);
  return {grad_image, grad_text, totals[1].clone(), totals[0].clone()};
}

}  // namespace
}  // namespace contrastive
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CUDA, m) {
  namespace k = leanops::contrastive;
  k::register_kernels(m, &k::clip_forward_cuda, &k::clip_backward_cuda, &k::siglip_forward_cuda,
                      &k::siglip_backward_cuda);
}
