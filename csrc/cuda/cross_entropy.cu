// The CUDA provider of the linear cross-entropy primitives (linear_ce_forward, linear_ce_backward). The plan, its
// math and its GEMMs (cuBLAS through ATen: Z = h W[chunk]^T per vocabulary chunk, G W[chunk], G^T h) are
// leanops/cross_entropy_plan_host.h's, shared with the CPU provider; this file holds the fused steps between the
// GEMMs, plain kernels over one chunk of logits (N tokens x Vc classes, float32, in global memory), and the Steps the
// plan calls. leanops/tile_cuda.cuh has the reductions and the host helpers.
//
// Steps (kThreads = 256 threads per CTA):
//   forward   rows kernel, one CTA per token: z' = softcap(z + b) written back over z (pass 1, with the chunk's
//             max, sum z', sum z'^2 and the target logit), then sum exp(z' - max) (pass 2, from L2); thread 0 merges
//             the chunk into the token's running state (panel_math::merge_log_sum_exp, compensated_add).
//   backward  with a bias, column kernels first: G recomputed in float32 per split of kRowsPerSplit tokens and
//             summed per class, the splits then added in order (grad_bias[chunk], float32, rounded once by the
//             plan); then the rows kernel, one CTA per token: G (panel_math::linear_ce_logit_gradient, times dz'/dz)
//             written in the input dtype, times the float16 scale. The order lets float32 inputs write G over Z.
// Every statistic and sum is float32, nothing is atomic: reproducible bit for bit, on any stream. Index arithmetic
// on N, V and D is 64-bit. Targets are compared with class indices only (no out-of-bounds access for any value).
//
// G in the input dtype keeps its two GEMMs on the tensor cores (one rounding of each G entry, as in the Triton
// kernels); float32 inputs keep G in float32 (cuBLAS's float32 GEMM; no TF32 under torch's default matmul precision).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <tuple>

#include "leanops/cross_entropy_host.h"
#include "leanops/cross_entropy_plan_host.h"
#include "leanops/panel_math.h"
#include "leanops/tile_cuda.cuh"

namespace leanops {
namespace cross_entropy {
namespace {

using namespace cuda_tile;  // NOLINT: the kernels are written in its vocabulary

constexpr const char* kKernels = "leanops cross-entropy CUDA kernels";
constexpr const char* kUnsupported = "leanops cross-entropy CUDA kernels: unsupported dtype ";

// ---------------------------------------------------------------------------------------------------------------
// Per-entry math.

// z' = softcap tanh((z + b) / softcap) for softcap > 0 (the reference's order of operations), else z + b; b = 0
// without a bias (bias == nullptr).
template <typename T>
__device__ __forceinline__ float capped_logit(float z, const T* __restrict__ bias, int64_t cls, float softcap) {
  if (bias != nullptr) z += to_float(bias[cls]);
  return softcap > 0.0f ? softcap * tanhf(z / softcap) : z;
}

// What the backward reads per token.
struct TokenGradients {
  const float* lse;
  const float* grad_lse;
  const float* grad_target;
  const float* grad_sum;
  const float* grad_square_sum;
  const int64_t* targets;
};

// G for the capped logit of class `cls` of token n.
__device__ __forceinline__ float logit_gradient(const TokenGradients& t, int64_t n, int64_t cls, float capped,
                                                float softcap) {
  float g = panel_math::linear_ce_logit_gradient(capped, expf(capped - t.lse[n]), t.grad_lse[n], t.grad_sum[n],
                                                 t.grad_square_sum[n] != 0.0f, 2.0f * t.grad_square_sum[n], t.targets[n] == cls,
                                                 t.grad_target[n]);
  if (softcap > 0.0f) g = g * panel_math::softcap_derivative(capped, 1.0f / softcap);
  return g;
}

// ---------------------------------------------------------------------------------------------------------------
// Kernels. `logits` is the chunk (tokens x columns, float32, row-major) of classes first_class .. first_class +
// columns - 1; `state` the plan's per-token state (kStateRows x tokens).

// Forward, rows kernel: one CTA per token.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinimumCtasPerMultiprocessor)
    linear_ce_forward_rows_kernel(float* __restrict__ logits, int64_t columns, int64_t first_class,
                                  const T* __restrict__ bias, const int64_t* __restrict__ targets, float softcap,
                                  int64_t tokens, float* __restrict__ state) {
  __shared__ float scratch[kWarps];
  const int64_t n = blockIdx.x;
  float* const row = logits + n * columns;
  const int64_t target_column = targets[n] - first_class;  // in [0, columns) when the target is in this chunk
  float best = -kInfinity;
  float total = 0.0f;
  float squares = 0.0f;
  for (int64_t j = threadIdx.x; j < columns; j += kThreads) {
    const float z = capped_logit(row[j], bias, first_class + j, softcap);
    row[j] = z;  // read back by this same thread in pass 2
    best = panel_math::max_with_nan(best, z);
    total += z;
    squares = fmaf(z, z, squares);
    if (j == target_column) state[kTargetLogit * tokens + n] = z;  // one thread of one chunk per token
  }
  best = block_max(best, scratch);
  total = block_sum(total, scratch);
  squares = block_sum(squares, scratch);
  float sum = 0.0f;
  if (best != -kInfinity) {
    for (int64_t j = threadIdx.x; j < columns; j += kThreads) sum += expf(row[j] - best);
  }
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) {
    float* const token = state + n;
    panel_math::merge_log_sum_exp(token[kRunningMax * tokens], token[kRunningSum * tokens], best, sum);
    panel_math::compensated_add(token[kLogitSumHigh * tokens], token[kLogitSumLow * tokens], total);
    panel_math::compensated_add(token[kSquareSumHigh * tokens], token[kSquareSumLow * tokens], squares);
  }
}

// Backward, bias column partials: partial[y][j] = sum over split y's tokens n of G[n, j] (float32). Grid:
// (columns / kThreads, splits).
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinimumCtasPerMultiprocessor)
    linear_ce_bias_partials_kernel(const float* __restrict__ logits, int64_t tokens, int64_t columns,
                                   int64_t first_class, const T* __restrict__ bias, TokenGradients per_token,
                                   float softcap, int64_t rows_per_split, float* __restrict__ partial) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= columns) return;
  const int64_t split = blockIdx.y;
  const int64_t n0 = split * rows_per_split;
  const int64_t n1 = std::min(tokens, n0 + rows_per_split);
  const int64_t cls = first_class + j;
  float total = 0.0f;
  for (int64_t n = n0; n < n1; ++n) {
    const float capped = capped_logit(logits[n * columns + j], bias, cls, softcap);
    total += logit_gradient(per_token, n, cls, capped, softcap);
  }
  partial[split * columns + j] = total;
}

// Backward, rows kernel: G[n, j] in T, times the gradient scale. `gradient` may be the chunk itself (float32 inputs):
// each entry is read before the same thread overwrites it, hence no __restrict__ on the two.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinimumCtasPerMultiprocessor)
    linear_ce_backward_rows_kernel(const float* logits, int64_t columns, int64_t first_class,
                                   const T* __restrict__ bias, TokenGradients per_token, float softcap,
                                   const float* __restrict__ gradient_scale, T* gradient) {
  const int64_t n = blockIdx.x;
  const float* const row = logits + n * columns;
  T* const out = gradient + n * columns;
  const float stored_scale = gradient_scale != nullptr ? gradient_scale[0] : 1.0f;
  for (int64_t j = threadIdx.x; j < columns; j += kThreads) {
    const int64_t cls = first_class + j;
    const float capped = capped_logit(row[j], bias, cls, softcap);
    out[j] = from_float<T>(logit_gradient(per_token, n, cls, capped, softcap) * stored_scale);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The steps of the plan (leanops/cross_entropy_plan_host.h documents the interface).

template <typename T>
const T* bias_data(const at::Tensor& bias) {
  return bias.numel() > 0 ? data_of<T>(bias) : nullptr;
}

struct CudaSteps {
  static at::Tensor gemm_operand(const at::Tensor& t) { return cuda_tile::gemm_operand(t); }
  static at::ScalarType gradient_dtype(at::ScalarType inputs) { return inputs; }
  static bool scales_gradient(at::ScalarType inputs) { return inputs == at::kHalf; }
  static at::Tensor gradient_scale(const at::Tensor& bound) { return cuda_tile::gradient_scale(bound); }

  static void multiply(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
    cuda_tile::multiply(std::move(out), a, b, accumulate);
  }

  static void forward(const ForwardChunk& step) {
    const int64_t tokens = step.logits.size(0);
    const int64_t columns = step.logits.size(1);
    dispatch_features(step.bias.scalar_type(), kUnsupported, [&](auto tag) {
      using T = typename decltype(tag)::type;
      linear_ce_forward_rows_kernel<T><<<grid_size(tokens, kKernels, "N"), kThreads, 0, current_stream()>>>(
          step.logits.mutable_data_ptr<float>(), columns, step.first_class, bias_data<T>(step.bias),
          step.targets.const_data_ptr<int64_t>(), static_cast<float>(step.softcap), tokens,
          step.state.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void backward(const BackwardChunk& step) {
    const int64_t tokens = step.logits.size(0);
    const int64_t columns = step.logits.size(1);
    const cudaStream_t stream = current_stream();
    const TokenGradients per_token{step.lse.const_data_ptr<float>(),         step.grad_lse.const_data_ptr<float>(),
                                   step.grad_target.const_data_ptr<float>(), step.grad_sum.const_data_ptr<float>(),
                                   step.grad_square_sum.const_data_ptr<float>(),
                                   step.targets.const_data_ptr<int64_t>()};
    const float softcap = static_cast<float>(step.softcap);
    const float* const gradient_scale =
        step.gradient_scale.defined() ? step.gradient_scale.const_data_ptr<float>() : nullptr;
    dispatch_features(step.gradient.scalar_type(), kUnsupported, [&](auto tag) {
      using T = typename decltype(tag)::type;
      const T* const bias = bias_data<T>(step.bias);
      if (step.bias_gradient.defined()) {  // the columns first: G may overwrite Z
        const RowSplits splits = row_splits(tokens);
        const at::Tensor partial = at::empty({splits.count, columns}, step.logits.options());
        const unsigned column_blocks = grid_size((columns + kThreads - 1) / kThreads, kKernels, "V");
        linear_ce_bias_partials_kernel<T>
            <<<dim3(column_blocks, static_cast<unsigned>(splits.count)), kThreads, 0, stream>>>(
                step.logits.const_data_ptr<float>(), tokens, columns, step.first_class, bias, per_token, softcap,
                splits.rows_per_split, partial.mutable_data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        sum_column_partials_kernel<<<column_blocks, kThreads, 0, stream>>>(
            partial.const_data_ptr<float>(), splits.count, columns, step.bias_gradient.mutable_data_ptr<float>(),
            /*accumulate=*/false);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      linear_ce_backward_rows_kernel<T><<<grid_size(tokens, kKernels, "N"), kThreads, 0, stream>>>(
          step.logits.const_data_ptr<float>(), columns, step.first_class, bias, per_token, softcap, gradient_scale,
          mutable_data_of<T>(step.gradient));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

// ---------------------------------------------------------------------------------------------------------------
// The ops: argument checks, the device, then the plan.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_ce_forward_cuda(const at::Tensor& hidden,
                                                                                  const at::Tensor& weight,
                                                                                  const at::Tensor& bias,
                                                                                  const at::Tensor& targets,
                                                                                  double softcap) {
  check_forward(hidden, weight, bias, targets);
  const c10::cuda::CUDAGuard guard = device_guard("linear_ce_forward", "hidden", hidden);
  return linear_ce_forward_plan<CudaSteps>(hidden, weight, bias, targets, softcap);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_backward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& targets,
    double softcap, const at::Tensor& lse, const at::Tensor& grad_lse, const at::Tensor& grad_target,
    const at::Tensor& grad_sum, const at::Tensor& grad_square_sum) {
  check_backward(hidden, weight, bias, targets, lse, grad_lse, grad_target, grad_sum, grad_square_sum);
  const c10::cuda::CUDAGuard guard = device_guard("linear_ce_backward", "hidden", hidden);
  return linear_ce_backward_plan<CudaSteps>(hidden, weight, bias, targets, softcap, lse, grad_lse, grad_target,
                                            grad_sum, grad_square_sum);
}

}  // namespace
}  // namespace cross_entropy
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CUDA, m) {
  namespace k = leanops::cross_entropy;
  k::register_kernels(m, &k::linear_ce_forward_cuda, &k::linear_ce_backward_cuda);
}
