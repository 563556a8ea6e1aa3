// The CUDA provider of the contrastive primitives: CLIP/InfoNCE (clip_forward, clip_backward) and SigLIP
// (siglip_forward, siglip_backward). The plan, its math and its GEMMs (cuBLAS through ATen: S = x y^T per row
// panel, G y, G^T x) are leanops/contrastive_plan_host.h's, shared with the CPU provider; this file holds the fused
// steps between the GEMMs, plain kernels over one row panel of S (P rows x B columns, float32, in global memory),
// and the Steps the plan calls. leanops/tile_cuda.cuh has the reductions and the host helpers.
//
// Steps (kThreads = 256 threads per CTA; "rows kernel": one CTA per panel row, each thread over the columns
// threadIdx.x + 256 k; "column kernels": one thread per column and a split of kRowsPerSplit panel rows per grid row,
// then one thread per column combining the splits in order):
//   clip_forward     rows kernel: row_lse of the panel's rows (max, then sum of exp(s S - max): two passes over the
//                    row, the second from L2); column kernels: each split's (max, sum) of every column, merged in
//                    split order into the plan's running column statistics (panel_math::merge_log_sum_exp).
//   clip_backward    column kernels first: sum_i q S per split, added in split order to the running column sums;
//                    then the rows kernel: G = row_weight s p + col_weight s q written in the feature dtype (times
//                    the float16 scale), and the row's sum_j p S. The order lets float32 features write G over S.
//   siglip_forward   rows kernel: row_loss of the panel's rows.
//   siglip_backward  rows kernel: G = s D written as above, and the row's sums of D and D S; once all panels are
//                    done, one CTA per sum adds the B partials in a fixed order (grad_bias, grad_scale).
// Every statistic and sum is float32; scale and bias are read on the device (no host synchronisation). Nothing is
// atomic: every result is reproducible bit for bit, on any stream. Index arithmetic on B is 64-bit.
//
// G in the feature dtype (bfloat16 / float16) keeps its two GEMMs on the tensor cores; rounding G costs 16-bit
// features one rounding of each G entry (2^-9 relative for bfloat16, 2^-12 for float16) before the float32
// accumulation, as in FlashAttention and the Triton kernels. float32 features keep G in float32 (cuBLAS's float32
// GEMM; no TF32 under torch's default matmul precision).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <tuple>

#include "leanops/contrastive_host.h"
#include "leanops/contrastive_plan_host.h"
#include "leanops/panel_math.h"
#include "leanops/tile_cuda.cuh"

namespace leanops {
namespace contrastive {
namespace {

using namespace cuda_tile;  // NOLINT: the kernels are written in its vocabulary

constexpr const char* kKernels = "leanops contrastive CUDA kernels";
constexpr const char* kUnsupported = "leanops contrastive CUDA kernels: unsupported feature dtype ";

// ---------------------------------------------------------------------------------------------------------------
// Scalar helpers.

// softplus(t) = log(1 + e^t) = max(t, 0) + log1p(e^-|t|): no overflow for large t, full accuracy for very negative t.
__device__ __forceinline__ float softplus(float t) { return fmaxf(t, 0.0f) + log1pf(expf(-fabsf(t))); }

// sigmoid(u) = 1 / (1 + e^-u), through e^-|u| so that nothing overflows.
__device__ __forceinline__ float sigmoid(float u) {
  const float e = expf(-fabsf(u));
  const float r = 1.0f / (1.0f + e);
  return u >= 0.0f ? r : e * r;
}

// The float16 gradient scale (1 without one): G is stored times it.
__device__ __forceinline__ float stored_gradient_scale(const float* gradient_scale) {
  return gradient_scale != nullptr ? gradient_scale[0] : 1.0f;
}

// ---------------------------------------------------------------------------------------------------------------
// Kernels. `similarity` is the panel (rows x batch, float32, row-major); `first_row` its first row in the batch.

// clip_forward, rows kernel: row_lse[first_row + r] = logsumexp_j(s S[r, j]). Grid: one CTA per panel row.
__global__ void __launch_bounds__(kThreads, kMinimumCtasPerMultiprocessor)
    clip_forward_rows_kernel(const float* __restrict__ similarity, int64_t batch, int64_t first_row,
                             const float* __restrict__ scale, float* __restrict__ row_lse) {
  __shared__ float scratch[kWarps];
  const int64_t r = blockIdx.x;
  const float* const row = similarity + r * batch;
  const float row_scale = scale[first_row + r];
  float best = -kInfinity;
  for (int64_t j = threadIdx.x; j < batch; j += kThreads) best = panel_math::max_with_nan(best, row_scale * row[j]);
  best = block_max(best, scratch);
  float sum = 0.0f;
  if (best != -kInfinity) {
    for (int64_t j = threadIdx.x; j < batch; j += kThreads) sum += expf(row_scale * row[j] - best);
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) row_lse[first_row + r] = best + logf(sum);
}

// clip_forward, column partials: for split y (rows [y * rows_per_split, ...)) and every column j, the (max, sum of
// exp(s[j] S - max)) over the split's rows, into partial_max / partial_sum[y][j]. Grid: (columns / kThreads, splits).
__global__ void __launch_bounds__(kThreads, kMinimumCtasPerMultiprocessor)
    clip_forward_column_partials_kernel(const float* __restrict__ similarity, int64_t rows, int64_t batch,
                                        int64_t rows_per_split, const float* __restrict__ scale,
                                        float* __restrict__ partial_max, float* __restrict__ partial_sum) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= batch) return;
  const int64_t split = blockIdx.y;
  const int64_t r0 = split * rows_per_split;
  const int64_t r1 = std::min(rows, r0 + rows_per_split);
  const float column_scale = scale[j];
  float best = -kInfinity;
  for (int64_t r = r0; r < r1; ++r) best = panel_math::max_with_nan(best, column_scale * similarity[r * batch + j]);
  float sum = 0.0f;
  if (best != -kInfinity) {
    for (int64_t r = r0; r < r1; ++r) sum += expf(column_scale * similarity[r * batch + j] - best);
  }
  partial_max[split * batch + j] = best;
  partial_sum[split * batch + j] = sum;
}

// clip_forward: merges the splits' (max, sum) of every column, in split order, into the running column statistics.
__global__ void __launch_bounds__(kThreads, kMinimumCtasPerMultiprocessor)
    clip_merge_column_partials_kernel(const float* __restrict__ partial_max, const float* __restrict__ partial_sum,
                                      int64_t splits, int64_t batch, float* __restrict__ column_max,
                                      float* __restrict__ column_sum) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= batch) return;
  float best = column_max[j];
  float sum = column_sum[j];
  for (int64_t split = 0; split < splits; ++split) {
    panel_math::merge_log_sum_exp(best, sum, partial_max[split * batch + j], partial_sum[split * batch + j]);
  }
  column_max[j] = best;
  column_sum[j] = sum;
}

// clip_backward, column partials: partial[y][j] = sum over split y's rows i of q[i, j] S[i, j],
// q = exp(s[j] S - col_lse[j]). Grid as clip_forward_column_partials_kernel.
__global__ void __launch_bounds__(kThreads, kMinimumCtasPerMultiprocessor)
    clip_backward_column_partials_kernel(const float* __restrict__ similarity, int64_t rows, int64_t batch,
                                         int64_t rows_per_split, const float* __restrict__ scale,
                                         const float* __restrict__ col_lse, float* __restrict__ partial) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= batch) return;
  const int64_t split = blockIdx.y;
  const int64_t r0 = split * rows_per_split;
  const int64_t r1 = std::min(rows, r0 + rows_per_split);
  const float column_scale = scale[j];
  const float lse = col_lse[j];
  float total = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const float s = similarity[r * batch + j];
    total += expf(column_scale * s - lse) * s;
  }
  partial[split * batch + j] = total;
}

// clip_backward, rows kernel: G[r, j] = row_weight s p + col_weight s q (panel_math::clip_gradient), written in T
// times the gradient scale, and row_ps[first_row + r] = sum_j p S. `gradient` may be the panel itself (float32
// features): each entry is read before the same thread overwrites it, hence no __restrict__ on the two.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinimumCtasPerMultiprocessor)
    clip_backward_rows_kernel(const float* similarity, int64_t batch, int64_t first_row,
                              const float* __restrict__ scale, const float* __restrict__ row_lse,
                              const float* __restrict__ col_lse, const float* __restrict__ row_weight,
                              const float* __restrict__ col_weight, const float* __restrict__ gradient_scale,
                              T* gradient, float* __restrict__ row_ps) {
  __shared__ float scratch[kWarps];
  const int64_t r = blockIdx.x;
  const int64_t i = first_row + r;
  const float* const row = similarity + r * batch;
  T* const out = gradient + r * batch;
  const float row_scale = scale[i];
  const float lse = row_lse[i];
  const float row_coefficient = row_weight[i] * row_scale;
  const float stored_scale = stored_gradient_scale(gradient_scale);
  float ps = 0.0f;
  for (int64_t j = threadIdx.x; j < batch; j += kThreads) {
    const float s = row[j];
    const float p = expf(row_scale * s - lse);
    const float q = expf(scale[j] * s - col_lse[j]);
    const float g = panel_math::clip_gradient(row_coefficient, p, col_weight[j] * scale[j], q);
    out[j] = from_float<T>(g * stored_scale);
    ps += p * s;
  }
  ps = block_sum(ps, scratch);
  if (threadIdx.x == 0) row_ps[i] = ps;
}

// siglip_forward, rows kernel: row_loss[first_row + r] = sum_j softplus(-label z), z = scale S + bias.
__global__ void __launch_bounds__(kThreads, kMinimumCtasPerMultiprocessor)
    siglip_forward_rows_kernel(const float* __restrict__ similarity, int64_t batch, int64_t first_row,
                               const float* __restrict__ scale, const float* __restrict__ bias,
                               const int64_t* __restrict__ groups, float* __restrict__ row_loss) {
  __shared__ float scratch[kWarps];
  const int64_t r = blockIdx.x;
  const int64_t i = first_row + r;
  const float* const row = similarity + r * batch;
  const float scale_value = *scale;
  const float bias_value = *bias;
  const int64_t group = groups[i];
  float total = 0.0f;
  for (int64_t j = threadIdx.x; j < batch; j += kThreads) {
    const float z = scale_value * row[j] + bias_value;
    total += softplus(groups[j] == group ? -z : z);  // softplus(-label z)
  }
  total = block_sum(total, scratch);
  if (threadIdx.x == 0) row_loss[i] = total;
}

// siglip_backward, rows kernel: D = -row_weight label sigmoid(-label z) (panel_math::siglip_logit_gradient),
// G = scale D written as in clip_backward_rows_kernel, row_d[first_row + r] = sum_j D, row_ds[...] = sum_j D S.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinimumCtasPerMultiprocessor)
    siglip_backward_rows_kernel(const float* similarity, int64_t batch, int64_t first_row,
                                const float* __restrict__ scale, const float* __restrict__ bias,
                                const int64_t* __restrict__ groups, const float* __restrict__ row_weight,
                                const float* __restrict__ gradient_scale, T* gradient, float* __restrict__ row_d,
                                float* __restrict__ row_ds) {
  __shared__ float scratch[kWarps];
  const int64_t r = blockIdx.x;
  const int64_t i = first_row + r;
  const float* const row = similarity + r * batch;
  T* const out = gradient + r * batch;
  const float scale_value = *scale;
  const float bias_value = *bias;
  const int64_t group = groups[i];
  const float weight = row_weight[i];
  const float stored_scale = scale_value * stored_gradient_scale(gradient_scale);
  float d_total = 0.0f;
  float ds_total = 0.0f;
  for (int64_t j = threadIdx.x; j < batch; j += kThreads) {
    const float s = row[j];
    const float z = scale_value * s + bias_value;
    const bool same = groups[j] == group;
    const float d = panel_math::siglip_logit_gradient(same, weight, sigmoid(same ? -z : z));
    out[j] = from_float<T>(d * stored_scale);
    d_total += d;
    ds_total += d * s;
  }
  d_total = block_sum(d_total, scratch);
  ds_total = block_sum(ds_total, scratch);
  if (threadIdx.x == 0) {
    row_d[i] = d_total;
    row_ds[i] = ds_total;
  }
}

// totals[k] = sum of row k of a (rows, count) float32 matrix: one CTA per row, in a fixed order.
__global__ void __launch_bounds__(kThreads, kMinimumCtasPerMultiprocessor)
    sum_rows_kernel(const float* __restrict__ matrix, int64_t count, float* __restrict__ totals) {
  __shared__ float scratch[kWarps];
  const float* const row = matrix + static_cast<int64_t>(blockIdx.x) * count;
  float total = 0.0f;
  for (int64_t j = threadIdx.x; j < count; j += kThreads) total += row[j];
  total = block_sum(total, scratch);
  if (threadIdx.x == 0) totals[blockIdx.x] = total;
}

// ---------------------------------------------------------------------------------------------------------------
// The steps of the plan (leanops/contrastive_plan_host.h documents the interface).

// Grid of the column kernels for a panel of `rows` x `batch`.
dim3 column_grid(int64_t batch, const RowSplits& splits) {
  return dim3(grid_size((batch + kThreads - 1) / kThreads, kKernels, "batch"), static_cast<unsigned>(splits.count));
}

struct CudaSteps {
  static at::Tensor gemm_operand(const at::Tensor& features) { return cuda_tile::gemm_operand(features); }
  static at::ScalarType gradient_dtype(at::ScalarType features) { return features; }
  static bool scales_gradient(at::ScalarType features) { return features == at::kHalf; }
  static at::Tensor gradient_scale(const at::Tensor& bound) { return cuda_tile::gradient_scale(bound); }

  static void multiply(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
    cuda_tile::multiply(std::move(out), a, b, accumulate);
  }

  static at::Tensor prepare_groups(const at::Tensor& groups) { return groups.contiguous(); }

  static at::Tensor sum_rows(const at::Tensor& matrix) {
    const at::Tensor m = matrix.contiguous();
    at::Tensor totals = at::empty({m.size(0)}, m.options());
    sum_rows_kernel<<<grid_size(m.size(0), kKernels, "rows"), kThreads, 0, current_stream()>>>(
        m.const_data_ptr<float>(), m.size(1), totals.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return totals;
  }

  static void clip_forward(const ClipForwardPanel& step) {
    const int64_t rows = step.similarity.size(0);
    const int64_t batch = step.similarity.size(1);
    const cudaStream_t stream = current_stream();
    const float* const similarity = step.similarity.const_data_ptr<float>();
    const float* const scale = step.scale.const_data_ptr<float>();
    clip_forward_rows_kernel<<<grid_size(rows, kKernels, "batch"), kThreads, 0, stream>>>(
        similarity, batch, step.first_row, scale, step.row_lse.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const RowSplits splits = row_splits(rows);
    const at::Tensor partial = at::empty({2, splits.count, batch}, step.similarity.options());
    float* const partial_max = partial.mutable_data_ptr<float>();
    float* const partial_sum = partial_max + splits.count * batch;
    clip_forward_column_partials_kernel<<<column_grid(batch, splits), kThreads, 0, stream>>>(
        similarity, rows, batch, splits.rows_per_split, scale, partial_max, partial_sum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    clip_merge_column_partials_kernel<<<column_grid(batch, {0, 1}), kThreads, 0, stream>>>(
        partial_max, partial_sum, splits.count, batch, step.column_max.mutable_data_ptr<float>(),
        step.column_sum.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void clip_backward(const ClipBackwardPanel& step) {
    const int64_t rows = step.similarity.size(0);
    const int64_t batch = step.similarity.size(1);
    const cudaStream_t stream = current_stream();
    const float* const similarity = step.similarity.const_data_ptr<float>();
    const float* const scale = step.scale.const_data_ptr<float>();
    // The columns first: G may overwrite S.
    const RowSplits splits = row_splits(rows);
    const at::Tensor partial = at::empty({splits.count, batch}, step.similarity.options());
    clip_backward_column_partials_kernel<<<column_grid(batch, splits), kThreads, 0, stream>>>(
        similarity, rows, batch, splits.rows_per_split, scale, step.col_lse.const_data_ptr<float>(),
        partial.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_column_partials_kernel<<<column_grid(batch, {0, 1}), kThreads, 0, stream>>>(
        partial.const_data_ptr<float>(), splits.count, batch, step.column_qs.mutable_data_ptr<float>(),
        /*accumulate=*/true);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const float* const gradient_scale =
        step.gradient_scale.defined() ? step.gradient_scale.const_data_ptr<float>() : nullptr;
    dispatch_features(step.gradient.scalar_type(), kUnsupported, [&](auto tag) {
      using T = typename decltype(tag)::type;
      clip_backward_rows_kernel<T><<<grid_size(rows, kKernels, "batch"), kThreads, 0, stream>>>(
          similarity, batch, step.first_row, scale, step.row_lse.const_data_ptr<float>(),
          step.col_lse.const_data_ptr<float>(), step.row_weight.const_data_ptr<float>(),
          step.col_weight.const_data_ptr<float>(), gradient_scale, mutable_data_of<T>(step.gradient),
          step.row_ps.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void siglip_forward(const SiglipForwardPanel& step) {
    const int64_t rows = step.similarity.size(0);
    siglip_forward_rows_kernel<<<grid_size(rows, kKernels, "batch"), kThreads, 0, current_stream()>>>(
        step.similarity.const_data_ptr<float>(), step.similarity.size(1), step.first_row,
        step.scale.const_data_ptr<float>(), step.bias.const_data_ptr<float>(), step.groups.const_data_ptr<int64_t>(),
        step.row_loss.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void siglip_backward(const SiglipBackwardPanel& step) {
    const int64_t rows = step.similarity.size(0);
    const int64_t batch = step.similarity.size(1);
    float* const row_d = step.row_sums.mutable_data_ptr<float>();
    const float* const gradient_scale =
        step.gradient_scale.defined() ? step.gradient_scale.const_data_ptr<float>() : nullptr;
    dispatch_features(step.gradient.scalar_type(), kUnsupported, [&](auto tag) {
      using T = typename decltype(tag)::type;
      siglip_backward_rows_kernel<T><<<grid_size(rows, kKernels, "batch"), kThreads, 0, current_stream()>>>(
          step.similarity.const_data_ptr<float>(), batch, step.first_row, step.scale.const_data_ptr<float>(),
          step.bias.const_data_ptr<float>(), step.groups.const_data_ptr<int64_t>(),
          step.row_weight.const_data_ptr<float>(), gradient_scale, mutable_data_of<T>(step.gradient), row_d,
          row_d + batch);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

// ---------------------------------------------------------------------------------------------------------------
// The ops: argument checks, the device, then the plan.

std::tuple<at::Tensor, at::Tensor> clip_forward_cuda(const at::Tensor& image, const at::Tensor& text,
                                                     const at::Tensor& scale) {
  check_clip_forward(image, text, scale);
  const c10::cuda::CUDAGuard guard = device_guard("clip_forward", "image", image);
  return clip_forward_plan<CudaSteps>(image, text, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_backward_cuda(const at::Tensor& image, const at::Tensor& text,
                                                                  const at::Tensor& scale, const at::Tensor& row_lse,
                                                                  const at::Tensor& col_lse,
                                                                  const at::Tensor& row_weight,
                                                                  const at::Tensor& col_weight) {
  check_clip_backward(image, text, scale, row_lse, col_lse, row_weight, col_weight);
  const c10::cuda::CUDAGuard guard = device_guard("clip_backward", "image", image);
  return clip_backward_plan<CudaSteps>(image, text, scale, row_lse, col_lse, row_weight, col_weight);
}

at::Tensor siglip_forward_cuda(const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale,
                               const at::Tensor& bias, const at::Tensor& groups) {
  check_siglip_forward(image, text, scale, bias, groups);
  const c10::cuda::CUDAGuard guard = device_guard("siglip_forward", "image", image);
  return siglip_forward_plan<CudaSteps>(image, text, scale, bias, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_backward_cuda(
    const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale, const at::Tensor& bias,
    const at::Tensor& groups, const at::Tensor& row_weight) {
  check_siglip_backward(image, text, scale, bias, groups, row_weight);
  const c10::cuda::CUDAGuard guard = device_guard("siglip_backward", "image", image);
  return siglip_backward_plan<CudaSteps>(image, text, scale, bias, groups, row_weight);
}

}  // namespace
}  // namespace contrastive
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CUDA, m) {
  namespace k = leanops::contrastive;
  k::register_kernels(m, &k::clip_forward_cuda, &k::clip_backward_cuda, &k::siglip_forward_cuda,
                      &k::siglip_backward_cuda);
}
