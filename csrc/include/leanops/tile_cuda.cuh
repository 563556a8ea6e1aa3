// The building blocks of the CUDA loss kernels, csrc/cuda/contrastive.cu (S = image text^T) and
// csrc/cuda/cross_entropy.cu (z = hidden W^T). A CTA of 256 threads computes one 64 x 64 float32 tile of a product
// A B^T into shared memory, staging chunks of feature dimensions of the tile's 64 rows of A and 64 rows of B, and
// then runs an "epilogue" over the tile in which 4 consecutive threads share each line (a row or a column) of it.
// Here: the tile's layout, the staging of feature chunks, the tile product (TileProduct), the epilogue's line
// reductions, and the host side both files share (the dtype dispatch to CUDA element types, checks, launch sizes).
//
// Header names: <topic>.h host+device, <topic>_host.h ATen host code of both backends, <topic>_cpu.h, <topic>_cuda.cuh.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "leanops/common_host.h"

namespace leanops {
namespace cuda_tile {

namespace wmma = nvcuda::wmma;

constexpr int kBlock = 64;  // rows and columns of one tile
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Epilogue layout: 4 consecutive threads share one line (a row, or a column) of the tile, 16 entries each, and
// combine their partial results with two warp shuffles.
constexpr int kLanesPerLine = kThreads / kBlock;
constexpr int kEntriesPerLane = kBlock / kLanesPerLine;
// Leading dimension of the float32 tile: a multiple of 4 (16 bytes), as WMMA's store needs.
constexpr int kTileStride = kBlock + 4;
constexpr float kInfinity = std::numeric_limits<float>::infinity();

static_assert(kLanesPerLine == 4 && kEntriesPerLane == 16, "line_sum / line_max combine 4 lanes");
static_assert(kWarps == 8, "the WMMA layout gives each of 8 warps a 16 x 32 region of a 64 x 64 tile");

// Leading dimension (in elements) of a staged feature chunk [kBlock][kChunk].
template <typename T, int kChunk>
struct Staging {
  // 16-bit features: a multiple of 8 elements (16 bytes: WMMA loads, cp.async and vector stores); kChunk + 8 also
  // keeps ldmatrix conflict-free for 64-dimension chunks (144 bytes per row).
  static constexpr int kStride = kChunk + 8;
};
template <int kChunk>
struct Staging<float, kChunk> {
  // float32 features: an odd stride, so the SIMT loop's reads down a column of the chunk hit 16 different banks.
  static constexpr int kStride = kChunk + 1;
};

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

// A thread's line in the epilogue layout, in a CTA that owns block blockIdx.x of the lines (rows or columns of the
// product) on its side, of which there are `count`.
struct OwnLine {
  int line;       // the line of the tile, threadIdx.x / 4
  int lane;       // the thread's lane among the 4 that share the line (lane_in_line), threadIdx.x % 4
  int64_t first;  // the block's first line
  int64_t index;  // first + line
  bool valid;     // index < count
};
__device__ __forceinline__ OwnLine own_line(int64_t count) {
  const int line = threadIdx.x / kLanesPerLine;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kBlock;
  return {line, static_cast<int>(threadIdx.x % kLanesPerLine), first, first + line, first + line < count};
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

// The (max, sum of exp(logit - max)) of the counted logits of one line of the tile, in the epilogue layout: lane
// lane_in_line of the line holds its entries e = lane_in_line + 4 j as logits[j], and entry e counts where
// first + e < count. Returned to all 4 lanes of the line; max is -inf (and sum 0) when no logit counts, NaN when one
// is NaN. Every lane of the warp must call it.
__device__ __forceinline__ void line_lse(const float (&logits)[kEntriesPerLane], int lane_in_line, int64_t first,
                                         int64_t count, float& max, float& sum) {
  float tile_max = -kInfinity;
#pragma unroll
  for (int j = 0; j < kEntriesPerLane; ++j) {
    const int e = lane_in_line + kLanesPerLine * j;
    if (first + e < count) tile_max = max_with_nan(tile_max, logits[j]);
  }
  tile_max = line_max(tile_max);
  float tile_sum = 0.0f;
  if (tile_max != -kInfinity) {
#pragma unroll
    for (int j = 0; j < kEntriesPerLane; ++j) {
      const int e = lane_in_line + kLanesPerLine * j;
      if (first + e < count) tile_sum += expf(logits[j] - tile_max);
    }
  }
  max = tile_max;
  sum = line_sum(tile_sum);
}

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

// ---------------------------------------------------------------------------------------------------------------
// Staging and the tile product. Every function below is called by all threads of the CTA.

template <typename T, int N>
struct alignas(16) Vector {
  T value[N];
};

// dst[r][k] = src[first_row + r][first_col + k] for r < kBlock, k < kChunk; zero past `rows` rows and `dim` columns.
// `vectorized`: dim is a multiple of the 16-byte vector and src is 16-byte aligned, so a vector lies entirely inside
// or entirely outside [0, dim) and can be read with one 16-byte load. kAsync: with 16-byte aligned destination rows
// the vectors are copied with cp.async (the caller commits and waits); otherwise the loads are synchronous.
template <int kChunk, bool kAsync = false, typename T, int kStride>
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

// The SIMT path's 4 x 4 register tile of a product: partial[i][j] = sum over k < kCount of a(i, k) b(j, k) (i, j < 4,
// float32 operands), with float32 fused multiply-adds in k order, from 0.
template <int kCount, typename A, typename B>
__device__ __forceinline__ void register_tile_product(float (&partial)[4][4], A a, B b) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) partial[i][j] = 0.0f;
  }
#pragma unroll 8
  for (int k = 0; k < kCount; ++k) {
    float a_k[4], b_k[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a_k[i] = a(i, k);
      b_k[i] = b(i, k);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) partial[i][j] = fmaf(a_k[i], b_k[j], partial[i][j]);
    }
  }
}

// The tile product: a CTA's 64 x 64 tile of A B^T, accumulated in registers one staged chunk at a time (add), then
// written to shared memory (store). Each chunk's products are summed into a fresh partial, which is then added to
// the total with float32 adds: rounding errors grow with D / kChunk + kChunk rather than D, so the tile is more
// accurate than a plain float32 dot product (cuBLAS, MKL). bfloat16 / float16 features take the tensor cores through
// WMMA (16 x 16 x 16, float32 accumulators: products of 16-bit values are exact in float32, and the fresh partial
// per chunk confines the tensor cores' internal accumulation, which does not round to nearest on every add, to one
// chunk). float32 features take a SIMT path with explicit fmaf, 4 x 4 entries per thread: no TF32, since the results
// must match float32 arithmetic to ~1e-6, and explicit because the project builds with --fmad=false (for the exact
// MCF arithmetic), which only stops the compiler from contracting; a fused multiply-add here halves the instructions
// and rounds once instead of twice.
template <typename T, bool kTensorCores = use_tensor_cores<T>()>
class TileProduct;

template <typename T>
class TileProduct<T, true> {
 public:
  // 8 warps over 4 x 4 sub-tiles of 16 x 16: warp w takes sub-tile row w / 2 and two sub-tile columns.
  __device__ __forceinline__ TileProduct() {
    const int warp = threadIdx.x / 32;
    sub_row_ = (warp / 2) * 16;
    sub_col_ = (warp % 2) * 32;
    wmma::fill_fragment(total_[0], 0.0f);
    wmma::fill_fragment(total_[1], 0.0f);
  }

  // Adds the products of one staged chunk: rows[r] . cols[c] over its kChunk dimensions. The chunk must be complete
  // (a barrier since it was written).
  template <int kChunk, int kStride>
  __device__ __forceinline__ void add(const T (&rows)[kBlock][kStride], const T (&cols)[kBlock][kStride]) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> partial[2];
    wmma::fill_fragment(partial[0], 0.0f);
    wmma::fill_fragment(partial[1], 0.0f);
#pragma unroll
    for (int k = 0; k < kChunk; k += 16) {
      // A = the staged rows (row-major M x K); B = cols^T, which is the staged cols read column-major (K x N).
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, &rows[sub_row_][k], kStride);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, &cols[sub_col_ + 16 * j][k], kStride);
        wmma::mma_sync(partial[j], a, b, partial[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      // Fragments of one type share their element layout, so elementwise adds are well defined.
#pragma unroll
      for (int e = 0; e < partial[j].num_elements; ++e) total_[j].x[e] += partial[j].x[e];
    }
  }

  __device__ __forceinline__ void store(float (&tile)[kBlock][kTileStride]) const {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(&tile[sub_row_][sub_col_ + 16 * j], total_[j], kTileStride, wmma::mem_row_major);
    }
  }

 private:
  int sub_row_;
  int sub_col_;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> total_[2];
};

template <typename T>
class TileProduct<T, false> {
 public:
  // Thread (ty, tx) computes rows ty + 16 i and columns tx + 16 j, i, j < 4. Within a warp ty takes 2 values
  // (broadcast reads of the staged rows) and tx 16 (conflict-free reads of the staged cols down their odd stride).
  __device__ __forceinline__ TileProduct() : tx_(threadIdx.x % 16), ty_(threadIdx.x / 16) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) total_[i][j] = 0.0f;
    }
  }

  template <int kChunk, int kStride>
  __device__ __forceinline__ void add(const T (&rows)[kBlock][kStride], const T (&cols)[kBlock][kStride]) {
    float partial[4][4];
    register_tile_product<kChunk>(
        partial, [&](int i, int k) { return to_float(rows[ty_ + 16 * i][k]); },
        [&](int j, int k) { return to_float(cols[tx_ + 16 * j][k]); });
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) total_[i][j] += partial[i][j];
    }
  }

  __device__ __forceinline__ void store(float (&tile)[kBlock][kTileStride]) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) tile[ty_ + 16 * i][tx_ + 16 * j] = total_[i][j];
    }
  }

 private:
  int tx_;
  int ty_;
  float total_[4][4];
};

// ---------------------------------------------------------------------------------------------------------------
// Host side. `kernels` names the calling file's kernels in messages ("leanops contrastive CUDA kernels").

// Calls fn(TypeTag<T>{}) with the CUDA element type T (float, __half, __nv_bfloat16) of a float32, float16 or
// bfloat16 feature dtype. The ops check the dtype first; any other is an error that starts with `unsupported`.
template <typename Fn>
void dispatch_features(at::ScalarType dtype, const char* unsupported, Fn&& fn) {
  const bool supported = dispatch_float_dtype<float, __half, __nv_bfloat16>(dtype, std::forward<Fn>(fn));
  TORCH_CHECK_TYPE(supported, unsupported, dtype_name(dtype));
}

template <typename T>
const T* data_of(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

// Both feature matrices can be read in 16-byte vectors (see load_chunk).
template <typename T>
bool can_vectorize(const at::Tensor& a, const at::Tensor& b, int64_t dim) {
  constexpr int64_t kVector = 16 / static_cast<int64_t>(sizeof(T));
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; };
  return dim % kVector == 0 && aligned(a) && aligned(b);
}

// Makes the device of the op's first feature argument `name` current for the op, after checking that it is a CUDA
// device.
inline c10::cuda::CUDAGuard device_guard(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), "leanops.", op, ": argument '", name, "' is on ", t.device(),
                    "; the CUDA kernels need CUDA tensors");
  return c10::cuda::CUDAGuard(t.device());
}

inline int64_t num_blocks(int64_t count) { return (count + kBlock - 1) / kBlock; }

// A grid dimension of `blocks` CTAs; too many is an error naming what they cover ("batch", "N", ...).
inline unsigned grid_size(int64_t blocks, const char* kernels, const char* what) {
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int>::max(), kernels, ": ", what, " too large");
  return static_cast<unsigned>(blocks);
}

}  // namespace cuda_tile
}  // namespace leanops
