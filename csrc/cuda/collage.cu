// CUDA kernel of Collage AdamW's fused multi-tensor step (leanops::collage_adamw_step_; the math and the oracle are in
// python/leanops/reference/collage.py, the per-element step in leanops/collage.h, and its two-elements-at-a-time form
// with packed conversions and packed 16-bit arithmetic in F in leanops/collage_cuda.cuh).
//
// One launch serves every tensor of the lists. The host cuts each tensor into chunks of kChunk elements and writes
// a table, one 64-byte entry per non-empty tensor (its six operand pointers, its size, the global index of its first
// chunk), into pinned memory, copied to the device on the current stream (asynchronously; torch's pinned allocator
// keeps the buffer alive until the copy has run). Blocks stride over the global chunk indices; a block finds its
// chunk's tensor by binary search over the table, then its threads stream the chunk with 16-byte global loads and
// stores (eight 16-bit values per operand, as four 32-bit words of two) when all six operands are 16-byte aligned,
// element by element otherwise. The vector loop loads the next iteration's vectors before it computes the current
// ones (a register prefetch: a thread has a load in flight while it computes), with streaming cache hints (every
// byte is read once and written once per step).
//
// Per element the step moves 18 bytes (light: reads 10, writes 8) or 22 (plus: 12 and 10) against 40 to 70
// operations, 10 (light) or 27 (plus) of them operations in F of two F values, three IEEE divisions and a square root
// among them. SASS instructions per element of the vector loop (sm_90; tests/collage/test_collage_sass.py counts
// them), hot (without the division / square-root slow-path stubs) / static, without -> with telemetry:
//
//                    before issue 14   packed conversions   packed arithmetic in F (now)
//   bfloat16 light   108.2             85.3 / 104.4         68.8 / 87.4  ->  82.8 / 101.8
//   bfloat16 plus    167.0             124.4 / 144.2        81.4 / 100.6 ->  95.4 / 113.9
//   float16 light    100.2             89.2 / 108.6         68.8 / 87.6  ->  83.1 / 102.1
//   float16 plus     157.2             138.3 / 158.1        81.4 / 100.9 ->  95.4 / 114.0
//
// What the savings are: leanops/collage_cuda.cuh (conversions, and the F operations as add.rn / sub.rn / mul.rn on
// bf16x2 or f16x2 words: one instruction for two elements, the same bits), and below: 16-byte global loads (LDG, not
// the generic LD the table's pointers gave), 32-bit offsets within a chunk (in the element loop as well), the
// divisors held in registers, and a loop unrolled by two instead of copying the prefetched registers.
//
// Telemetry is deterministic: each chunk's sums (fixed per-thread order, then a fixed shuffle tree) go to a per-chunk
// slot, independent of the grid size and the device, and a one-block kernel adds the slots in a fixed order into
// `metrics`.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "leanops/collage_cuda.cuh"
#include "leanops/collage_host.h"
#include "leanops/multi_tensor_cuda.cuh"

namespace leanops {
namespace collage {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVec = 8;                // 16-bit values per 16-byte access
constexpr int64_t kChunk = 1 << 14;    // elements per chunk: 8 vector iterations of a block
constexpr int kOperands = 6;           // params, params_lo, exp_avgs, exp_avg_sqs, exp_avg_sqs_lo, grads
constexpr int kMetricSlots = 3;        // sum s * delta, sum delta^2, lost updates (the count is known on the host)
static_assert(kChunk % (kThreads * kVec) == 0, "a chunk is whole vector iterations of a block");
static_assert(kChunk < (int64_t{1} << 31), "offsets within a chunk fit 32 bits");

// One non-empty tensor of the lists (exp_avg_sqs_lo's pointer is 0 in light mode).
struct TensorEntry {
  uint64_t pointer[kOperands];
  int64_t numel;
  int64_t first_chunk;  // global index of the tensor's first chunk
};
static_assert(sizeof(TensorEntry) == 8 * sizeof(int64_t), "the table is written as int64 words");

// Raw 16-bit storage <-> float32. from_float's argument is an F value (every updated value is), so it is exact.
struct BFloat16Storage {
  using Format = eft::BFloat16Format;
  using Words = pairs::BFloat16Words;
  __device__ __forceinline__ static float to_float(uint16_t bits) { return __uint_as_float(uint32_t{bits} << 16); }
  __device__ __forceinline__ static uint16_t from_float(float x) {
    return static_cast<uint16_t>(__float_as_uint(x) >> 16);
  }
};

struct Float16Storage {
  using Format = eft::Float16Format;
  using Words = pairs::Float16Words;
  __device__ __forceinline__ static float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  __device__ __forceinline__ static uint16_t from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

// Eight 16-bit values of one operand as four 32-bit words of two.
struct alignas(16) Vector {
  uint32_t word[kVec / 2];
};

// 16-byte global loads and stores with the streaming hint (ld.global.cs / st.global.cs: evict first; every byte
// is used once per step). Explicitly global: plain dereferences of the table's pointers compile to generic LD/ST.
__device__ __forceinline__ Vector load_vector(const uint16_t* address) {
  const uint4 bits = __ldcs(reinterpret_cast<const uint4*>(address));
  return {{bits.x, bits.y, bits.z, bits.w}};
}

__device__ __forceinline__ void store_vector(uint16_t* address, const Vector& vector) {
  __stcs(reinterpret_cast<uint4*>(address), make_uint4(vector.word[0], vector.word[1], vector.word[2], vector.word[3]));
}

// The operands' vectors at one index (v_lo unused unless Plus).
template <bool Plus>
struct Vectors {
  Vector theta, theta_lo, m, v, v_lo, g;
};

// One chunk's operands from its first element; offsets within a chunk fit 32 bits, so that an address is one
// IMAD.WIDE.U32 (base + 2 * offset) instead of a 64-bit add.
struct ChunkOperands {
  uint16_t* theta;
  uint16_t* theta_lo;
  uint16_t* m;
  uint16_t* v;
  uint16_t* v_lo;
  const uint16_t* g;
};

// x, computed into a register (x + -0 is exactly x, -0 and infinities included): the compiler cannot replace the
// register by a reload of the kernel argument.
__device__ __forceinline__ float in_register(float x) {
  float y;
  asm("add.rn.f32 %0, %1, 0f80000000;" : "=f"(y) : "f"(x));
  return y;
}

// The chunk's base pointers, held in registers as they are: without the empty asm the compiler folds the chunk's
// first element into every access's offset and computes each address with 64-bit adds.
__device__ __forceinline__ ChunkOperands chunk_operands(uint16_t* theta, uint16_t* theta_lo, uint16_t* m, uint16_t* v,
                                                        uint16_t* v_lo, const uint16_t* g) {
  asm("" : "+l"(theta), "+l"(theta_lo), "+l"(m), "+l"(v), "+l"(v_lo), "+l"(g));
  return {theta, theta_lo, m, v, v_lo, g};
}

template <bool Plus>
__device__ __forceinline__ Vectors<Plus> load_vectors(const ChunkOperands& o, uint32_t offset) {
  Vectors<Plus> vectors;
  vectors.g = load_vector(o.g + offset);
  vectors.m = load_vector(o.m + offset);
  vectors.v = load_vector(o.v + offset);
  if (Plus) vectors.v_lo = load_vector(o.v_lo + offset);
  vectors.theta = load_vector(o.theta + offset);
  vectors.theta_lo = load_vector(o.theta_lo + offset);
  return vectors;
}

template <bool Plus>
__device__ __forceinline__ void store_vectors(const ChunkOperands& o, uint32_t offset, const Vectors<Plus>& vectors) {
  store_vector(o.theta + offset, vectors.theta);
  store_vector(o.theta_lo + offset, vectors.theta_lo);
  store_vector(o.m + offset, vectors.m);
  store_vector(o.v + offset, vectors.v);
  if (Plus) store_vector(o.v_lo + offset, vectors.v_lo);
}

// Sums of a block, in a fixed order (shuffle tree within each warp, then over the warps); the result is valid in
// thread 0. Every thread of the block must call it.
__device__ __forceinline__ void block_sum(double (&values)[kMetricSlots]) {
  __shared__ double warp_sums[kMetricSlots][kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < kMetricSlots; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) values[k] += __shfl_down_sync(0xffffffffu, values[k], offset);
    if (lane == 0) warp_sums[k][warp] = values[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < kMetricSlots; ++k) {
      values[k] = lane < kWarps ? warp_sums[k][lane] : 0.0;
#pragma unroll
      for (int offset = kWarps / 2; offset > 0; offset >>= 1) {
        values[k] += __shfl_down_sync(0xffffffffu, values[k], offset);
      }
    }
  }
  __syncthreads();  // warp_sums is free again for the next call
}

template <typename Storage, bool Plus, bool Metrics>
__device__ __forceinline__ void step_element(uint16_t& theta, uint16_t& theta_lo, uint16_t& m, uint16_t& v,
                                             uint16_t& v_lo, uint16_t g, const Scalars& s, double& stored_dot_delta,
                                             double& delta_square, uint32_t& lost) {
  using F = typename Storage::Format;
  float theta_f = Storage::to_float(theta);
  float theta_lo_f = Storage::to_float(theta_lo);
  float m_f = Storage::to_float(m);
  float v_f = Storage::to_float(v);
  float v_lo_f = Plus ? Storage::to_float(v_lo) : 0.0f;
  const Outcome outcome = step<F, Plus>(theta_f, theta_lo_f, m_f, v_f, v_lo_f, Storage::to_float(g), s);
  theta = Storage::from_float(theta_f);
  theta_lo = Storage::from_float(theta_lo_f);
  m = Storage::from_float(m_f);
  v = Storage::from_float(v_f);
  if (Plus) v_lo = Storage::from_float(v_lo_f);
  if (Metrics) {
    const double stored = outcome.stored;
    const double delta = outcome.delta;
    // The products of two floats are exact in double; __dmul_rn/__dadd_rn keep them from contracting.
    stored_dot_delta = __dadd_rn(stored_dot_delta, __dmul_rn(stored, delta));
    delta_square = __dadd_rn(delta_square, __dmul_rn(delta, delta));
    lost += lost_update(outcome) ? 1u : 0u;
  }
}

// One vector of eight elements, two at a time (leanops/collage_cuda.cuh), stored in place; the telemetry adds the
// elements in index order, as step_element one by one would.
template <typename Storage, bool Plus, bool Metrics>
__device__ __forceinline__ void step_vectors(Vectors<Plus>& vectors, const Scalars& s, double& stored_dot_delta,
                                             double& delta_square, uint32_t& lost) {
#pragma unroll
  for (int k = 0; k < kVec / 2; ++k) {
    pairs::Words words{vectors.theta.word[k], vectors.theta_lo.word[k], vectors.m.word[k], vectors.v.word[k],
                       Plus ? vectors.v_lo.word[k] : 0u};
    const pairs::Outcomes outcomes =
        pairs::step_pair<typename Storage::Words, Plus>(words, vectors.g.word[k], s);
    vectors.theta.word[k] = words.theta;
    vectors.theta_lo.word[k] = words.theta_lo;
    vectors.m.word[k] = words.m;
    vectors.v.word[k] = words.v;
    if (Plus) vectors.v_lo.word[k] = words.v_lo;
    if (Metrics) {
      const float stored[2] = {outcomes.stored.lo, outcomes.stored.hi};
      const float delta[2] = {outcomes.delta.lo, outcomes.delta.hi};
#pragma unroll
      for (int lane = 0; lane < 2; ++lane) {
        const double stored64 = stored[lane];
        const double delta64 = delta[lane];
        stored_dot_delta = __dadd_rn(stored_dot_delta, __dmul_rn(stored64, delta64));
        delta_square = __dadd_rn(delta_square, __dmul_rn(delta64, delta64));
        lost += lost_update(Outcome{stored[lane], delta[lane]}) ? 1u : 0u;
      }
    }
  }
}

template <typename Storage, bool Plus, bool Metrics>
__global__ void __launch_bounds__(kThreads)
    collage_step_kernel(const TensorEntry* __restrict__ table, int num_tensors, int64_t num_chunks, const Scalars s,
                        double* __restrict__ partials) {
  for (int64_t chunk = blockIdx.x; chunk < num_chunks; chunk += gridDim.x) {
    const TensorEntry& entry = multi_tensor::entry_of_chunk(table, num_tensors, chunk);
    uint16_t* __restrict__ theta = reinterpret_cast<uint16_t*>(entry.pointer[0]);
    uint16_t* __restrict__ theta_lo = reinterpret_cast<uint16_t*>(entry.pointer[1]);
    uint16_t* __restrict__ m = reinterpret_cast<uint16_t*>(entry.pointer[2]);
    uint16_t* __restrict__ v = reinterpret_cast<uint16_t*>(entry.pointer[3]);
    uint16_t* __restrict__ v_lo = reinterpret_cast<uint16_t*>(entry.pointer[4]);
    const uint16_t* __restrict__ g = reinterpret_cast<const uint16_t*>(entry.pointer[5]);
    const int64_t numel = entry.numel;
    const int64_t begin = (chunk - entry.first_chunk) * kChunk;
    const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
    uint64_t any_pointer_bits = 0;
#pragma unroll
    for (int k = 0; k < kOperands; ++k) any_pointer_bits |= entry.pointer[k];
    const bool aligned = (any_pointer_bits % sizeof(Vector)) == 0;

    double stored_dot_delta = 0.0;
    double delta_square = 0.0;
    uint32_t lost = 0;
    int64_t scalar_begin = begin;
    if (aligned) {
      // Chunks start at multiples of kChunk, so only a tensor's last chunk can end inside a vector.
      const int64_t vector_end = begin + (end - begin) / kVec * kVec;
      // The vector loop with a register prefetch: each vector is loaded one iteration ahead, into the other of two
      // register buffers (unrolled by two, so that no buffer is copied into the other). Per iteration a thread
      // steps two vectors (16 elements); tests/collage/test_collage_sass.py counts its instructions per element.
      const ChunkOperands o = chunk_operands(theta + begin, theta_lo + begin, m + begin, v + begin,
                                             Plus ? v_lo + begin : v_lo, g + begin);  // v_lo is null in light mode
      constexpr uint32_t kStride = kThreads * kVec;
      const uint32_t count = static_cast<uint32_t>(vector_end - begin);
      uint32_t offset = threadIdx.x * kVec;
      // The divisors in registers: MUFU.RCP, which every division starts with, cannot read the constant bank, and
      // left to itself the compiler reloads them (LDC) for each of the 32 divisions of an iteration.
      Scalars scalars = s;
      scalars.bias_correction1 = in_register(s.bias_correction1);
      scalars.bias_correction2 = in_register(s.bias_correction2);
      Vectors<Plus> even, odd;
      if (offset < count) even = load_vectors<Plus>(o, offset);
      while (offset < count) {
        if (offset + kStride < count) odd = load_vectors<Plus>(o, offset + kStride);
        step_vectors<Storage, Plus, Metrics>(even, scalars, stored_dot_delta, delta_square, lost);
        store_vectors<Plus>(o, offset, even);
        offset += kStride;
        if (offset >= count) break;
        if (offset + kStride < count) even = load_vectors<Plus>(o, offset + kStride);
        step_vectors<Storage, Plus, Metrics>(odd, scalars, stored_dot_delta, delta_square, lost);
        store_vectors<Plus>(o, offset, odd);
        offset += kStride;
      }
      scalar_begin = vector_end;
    }
    // The element loop (the elements after a tensor's last whole vector; every element of unaligned operands), with
    // 32-bit offsets from the chunk's first element as the vector loop: 64-bit indices held two more registers
    // across the division slow-path calls, and ptxas spilled one of them in the float16 light kernel.
    const uint32_t elements = static_cast<uint32_t>(end - begin);
    uint16_t* const theta_c = theta + begin;
    uint16_t* const theta_lo_c = theta_lo + begin;
    uint16_t* const m_c = m + begin;
    uint16_t* const v_c = v + begin;
    uint16_t* const v_lo_c = Plus ? v_lo + begin : v_lo;
    const uint16_t* const g_c = g + begin;
    for (uint32_t i = static_cast<uint32_t>(scalar_begin - begin) + threadIdx.x; i < elements; i += kThreads) {
      uint16_t theta_i = theta_c[i];
      uint16_t theta_lo_i = theta_lo_c[i];
      uint16_t m_i = m_c[i];
      uint16_t v_i = v_c[i];
      uint16_t v_lo_i = Plus ? v_lo_c[i] : uint16_t{0};
      step_element<Storage, Plus, Metrics>(theta_i, theta_lo_i, m_i, v_i, v_lo_i, g_c[i], s, stored_dot_delta,
                                           delta_square, lost);
      theta_c[i] = theta_i;
      theta_lo_c[i] = theta_lo_i;
      m_c[i] = m_i;
      v_c[i] = v_i;
      if (Plus) v_lo_c[i] = v_lo_i;
    }
    if (Metrics) {
      double sums[kMetricSlots] = {stored_dot_delta, delta_square, static_cast<double>(lost)};
      block_sum(sums);
      if (threadIdx.x == 0) {
#pragma unroll
        for (int k = 0; k < kMetricSlots; ++k) partials[chunk * kMetricSlots + k] = sums[k];
      }
    }
  }
}

// metrics += (the per-chunk partials summed in a fixed order, count). One block.
__global__ void __launch_bounds__(kThreads)
    add_metrics_kernel(const double* __restrict__ partials, int64_t num_chunks, double count,
                       double* __restrict__ metrics, int64_t stride) {
  double sums[kMetricSlots] = {0.0, 0.0, 0.0};
  for (int64_t chunk = threadIdx.x; chunk < num_chunks; chunk += kThreads) {
#pragma unroll
    for (int k = 0; k < kMetricSlots; ++k) sums[k] = __dadd_rn(sums[k], partials[chunk * kMetricSlots + k]);
  }
  block_sum(sums);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kMetricSlots; ++k) metrics[k * stride] += sums[k];
    metrics[kMetricSlots * stride] += count;
  }
}

template <typename Storage, bool Plus, bool Metrics>
void launch_step(const TensorEntry* table, int num_tensors, int64_t num_chunks, const Scalars& scalars,
                 double* partials, int device_index, cudaStream_t stream) {
  const auto kernel = collage_step_kernel<Storage, Plus, Metrics>;
  const int64_t grid = multi_tensor::grid_for(kernel, kThreads, num_chunks, device_index);
  kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(table, num_tensors, num_chunks, scalars, partials);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void collage_adamw_step_cuda(at::TensorList params, at::TensorList params_lo, at::TensorList exp_avgs,
                             at::TensorList exp_avg_sqs, at::TensorList exp_avg_sqs_lo, at::TensorList grads,
                             double lr, double beta1, double beta2, double eps, double weight_decay,
                             double bias_correction1, double bias_correction2, bool plus,
                             const std::optional<at::Tensor>& metrics) {
  check_arguments(params, params_lo, exp_avgs, exp_avg_sqs, exp_avg_sqs_lo, grads, plus, metrics);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // The table, in pinned memory: one entry per non-empty tensor.
  std::vector<TensorEntry> entries;
  entries.reserve(params.size());
  int64_t num_chunks = 0;
  int64_t count = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = params[i].numel();
    if (numel == 0) continue;
    TensorEntry entry;
    const at::Tensor* operands[kOperands] = {&params[i], &params_lo[i], &exp_avgs[i], &exp_avg_sqs[i],
                                             plus ? &exp_avg_sqs_lo[i] : nullptr, &grads[i]};
    for (int k = 0; k < kOperands; ++k) {
      entry.pointer[k] = operands[k] == nullptr ? 0 : reinterpret_cast<uint64_t>(operands[k]->const_data_ptr());
    }
    entry.numel = numel;
    entry.first_chunk = num_chunks;
    entries.push_back(entry);
    num_chunks += (numel + kChunk - 1) / kChunk;
    count += numel;
  }
  if (entries.empty()) return;  // nothing to update, and telemetry sums of nothing
  TORCH_CHECK(entries.size() <= static_cast<size_t>(INT32_MAX), "leanops.collage_adamw_step_: too many tensors");
  const at::Tensor table = multi_tensor::upload_table(entries, device);
  const auto* table_pointer = reinterpret_cast<const TensorEntry*>(table.const_data_ptr());
  const int num_tensors = static_cast<int>(entries.size());

  const bool with_metrics = metrics.has_value();
  at::Tensor partials;
  if (with_metrics) partials = at::empty({num_chunks * kMetricSlots}, params[0].options().dtype(at::kDouble));
  double* partials_pointer = with_metrics ? partials.mutable_data_ptr<double>() : nullptr;

  dispatch_storage(params[0].scalar_type(), [&](auto format, auto storage) {
    // The device-side storage of the format (raw 16-bit words).
    using Storage =
        std::conditional_t<std::is_same_v<decltype(format), eft::BFloat16Format>, BFloat16Storage, Float16Storage>;
    const Scalars scalars = make_scalars<decltype(storage)>(lr, beta1, beta2, eps, weight_decay, bias_correction1,
                                                             bias_correction2);
    if (plus && with_metrics) launch_step<Storage, true, true>(table_pointer, num_tensors, num_chunks, scalars,
                                                               partials_pointer, device.index(), stream);
    if (plus && !with_metrics) launch_step<Storage, true, false>(table_pointer, num_tensors, num_chunks, scalars,
                                                                 partials_pointer, device.index(), stream);
    if (!plus && with_metrics) launch_step<Storage, false, true>(table_pointer, num_tensors, num_chunks, scalars,
                                                                 partials_pointer, device.index(), stream);
    if (!plus && !with_metrics) launch_step<Storage, false, false>(table_pointer, num_tensors, num_chunks, scalars,
                                                                   partials_pointer, device.index(), stream);
  });
  if (with_metrics) {
    add_metrics_kernel<<<1, kThreads, 0, stream>>>(partials_pointer, num_chunks, static_cast<double>(count),
                                                   metrics->mutable_data_ptr<double>(), metrics->stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace collage
}  // namespace leanops

TORCH_LIBRARY_IMPL(leanops, CUDA, m) { m.impl("collage_adamw_step_", &leanops::collage::collage_adamw_step_cuda); }
