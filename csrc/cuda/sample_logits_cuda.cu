// CUDA sample_logits: one 256-thread block per row (grid-stride over rows). Every pass re-reads the row's
// conditional and unconditional logits (L2-resident) and recomputes the guided value, so nothing but the
// (B, ...) codes is written. Passes: the row maximum; a 4-digit radix select of the k-th largest key (integer
// shared-memory histograms: exact, order-independent); for top-p, a bisection over keys whose masses are
// fixed-order block sums (deterministic run to run, no float atomics); one Gumbel-max draw whose noise is the
// Philox function of (seed, row, id) the CPU kernel uses, so both backends draw the same code.
// Every loop that contains a barrier has a block-uniform trip count (all its bounds come from block sums).
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common/sample_math.h"
#include "cuda/cuda_common.cuh"
#include "sample_logits.h"

namespace tokenflow_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

// Raw-pointer view of one call (see SampleCall).
template <typename acc_t>
struct SampleParams {
  int64_t rows;  // rows drawn; the unconditional row of row r is r + rows
  int64_t V;     // row stride
  int64_t start; // first image id
  int K;         // image ids
  int top_k;     // 0: off
  float top_p;   // 0: off
  acc_t t, one_plus_t;
  uint64_t seed;
};

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// Block reduction by `op` (MaxOp, SumOp), the same value on every thread. The order is fixed (butterfly
// within warps, then warps 0..7 in order), so the sum is deterministic. `scratch` holds kWarps floats.
template <typename Op>
__device__ __forceinline__ float block_reduce(float value, float* scratch, Op op) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  float result = scratch[0];
  for (int w = 1; w < kWarps; ++w) result = op(result, scratch[w]);
  __syncthreads();
  return result;
}

// (score, id) pair order of the draw: the larger score, then the lower id.
__device__ __forceinline__ bool draw_better(float score, int id, float other_score, int other_id) {
  return score > other_score || (score == other_score && id < other_id);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) sample_logits_kernel(const scalar_t* __restrict__ logits,
                                                                 SampleParams<acc_t> p, int64_t* __restrict__ codes) {
  __shared__ float scratch[kWarps];
  __shared__ int scratch_id[kWarps];
  __shared__ unsigned int histogram[256];
  __shared__ unsigned int chosen[2];  // radix select: the digit, the rank left inside it
  const int tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const scalar_t* cond = logits + row * p.V + p.start;
    const scalar_t* uncond = logits + (p.rows + row) * p.V + p.start;
    auto guided = [&](int i) {
      return guided_value<acc_t>(static_cast<acc_t>(cond[i]), static_cast<acc_t>(uncond[i]), p.one_plus_t, p.t);
    };

    float local_max = -INFINITY;
    for (int i = tid; i < p.K; i += kThreads) local_max = fmaxf(local_max, guided(i));
    const float row_max = block_reduce(local_max, scratch, MaxOp{});
    if (row_max == -INFINITY) {  // block-uniform: nothing finite to draw from
      if (tid == 0) codes[row] = -1;
      continue;
    }

    // Top-k: the k-th largest key, one 8-bit digit per pass over the ids that match the digits so far.
    uint32_t threshold = 0;
    if (p.top_k > 0) {
      uint32_t prefix = 0, mask = 0;
      unsigned int remaining = static_cast<unsigned int>(p.top_k);
      for (int shift = 24; shift >= 0; shift -= 8) {
        for (int d = tid; d < 256; d += kThreads) histogram[d] = 0u;
        __syncthreads();
        for (int i = tid; i < p.K; i += kThreads) {
          const uint32_t key = ordered_key(guided(i));
          if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
          unsigned int above = 0, digit = 0;
          for (int d = 255; d >= 0; --d) {
            if (above + histogram[d] >= remaining) {
              digit = static_cast<unsigned int>(d);
              break;
            }
            above += histogram[d];
          }
          chosen[0] = digit;
          chosen[1] = remaining - above;
        }
        __syncthreads();
        prefix |= chosen[0] << shift;
        mask |= 255u << shift;
        remaining = chosen[1];
        // No barrier needed here: thread 0 rewrites `chosen` only after the next pass's two barriers.
      }
      threshold = prefix;
    }

    // Top-p: the largest key T with mass(key >= T) >= top_p * mass(key >= top-k threshold), by bisection.
    if (p.top_p > 0.0f) {
      auto mass_from = [&](uint32_t lowest) {
        float local = 0.0f;
        for (int i = tid; i < p.K; i += kThreads) {
          const float g = guided(i);
          if (ordered_key(g) >= lowest) local += expf(shifted_logit(g, row_max));
        }
        return block_reduce(local, scratch, SumOp{});
      };
      const float target = p.top_p * mass_from(threshold);
      uint64_t lo = threshold, hi = static_cast<uint64_t>(ordered_key(row_max)) + 1u;
      while (hi - lo > 1u) {  // lo, hi and the masses are block-uniform
        const uint64_t mid = lo + (hi - lo) / 2u;
        if (mass_from(static_cast<uint32_t>(mid)) >= target) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      threshold = static_cast<uint32_t>(lo);
    }

    // Gumbel-max over the kept ids.
    float best = -INFINITY;
    int best_id = p.K;
    for (int i = tid; i < p.K; i += kThreads) {  // ids rise, so `>` keeps the lowest id of a tie
      const float g = guided(i);
      if (ordered_key(g) < threshold) continue;
      const float score = shifted_logit(g, row_max) + gumbel_noise(p.seed, static_cast<uint64_t>(row),
                                                                   static_cast<uint32_t>(i));
      if (score > best) {
        best = score;
        best_id = i;
      }
    }
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, best, offset);
      const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
      if (draw_better(other, other_id, best, best_id)) {
        best = other;
        best_id = other_id;
      }
    }
    if (tid % kWarpSize == 0) {
      scratch[tid / kWarpSize] = best;
      scratch_id[tid / kWarpSize] = best_id;
    }
    __syncthreads();
    if (tid == 0) {
      for (int w = 1; w < kWarps; ++w) {
        if (draw_better(scratch[w], scratch_id[w], best, best_id)) {
          best = scratch[w];
          best_id = scratch_id[w];
        }
      }
      codes[row] = (best_id < p.K && best > -INFINITY) ? best_id : -1;
    }
    __syncthreads();  // scratch is reused by the next row
  }
}

at::Tensor sample_logits_cuda(const at::Tensor& logits, double guidance, int64_t top_k, double top_p,
                              int64_t image_token_start, int64_t image_vocab_size, int64_t seed) {
  SampleCall call = begin_sample_logits(logits, guidance, top_k, top_p, image_token_start, image_vocab_size);
  if (call.rows == 0) return call.codes;
  const int K = checked_int(kSampleOp, "image_vocab_size", call.K);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  TFX_DISPATCH_FLOATS(call.logits.scalar_type(), "sample_logits_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SampleParams<acc_t> params{call.rows, call.V, call.start, K, static_cast<int>(call.top_k),
                                     static_cast<float>(call.top_p), static_cast<acc_t>(guidance),
                                     static_cast<acc_t>(1.0 + guidance), static_cast<uint64_t>(seed)};
    sample_logits_kernel<scalar_t, acc_t><<<grid_stride_blocks(call.rows, 1), kThreads, 0, stream>>>(
        call.logits.const_data_ptr<scalar_t>(), params, call.codes.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return call.codes;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenflow_ext, CUDA, m) { m.impl("sample_logits", &sample_logits_cuda); }

}  // namespace tokenflow_ext
