// CUDA flow_step kernels: grid-stride elementwise passes (one read of each input, one write of each output),
// and a two-pass per-sample loss reduction (fixed-order partial sums: deterministic, no atomics).
// No host synchronisation anywhere: the Euler step can be captured in a CUDA graph. Elementwise loops index
// with int32 when the size allows (see with_index_type), so the per-element `e / M` is a 32-bit division.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/cuda_common.cuh"
#include "flow_step.h"

namespace tokenflow_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarpSize;
constexpr int64_t kLossChunk = 4096;  // elements of one sample reduced by one warp
constexpr int64_t kSmallSample = 32;  // up to this many elements per sample, one thread sums a whole sample

#define TFX_GRID_STRIDE(index_t, index, count)                                                    \
  for (index_t index = static_cast<index_t>(blockIdx.x * blockDim.x + threadIdx.x); index < (count); \
       index += static_cast<index_t>(gridDim.x * blockDim.x))

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void interpolate_kernel(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ x1,
                                   const acc_t* __restrict__ t, index_t count, index_t M, acc_t keep,
                                   scalar_t* __restrict__ x_t, scalar_t* __restrict__ v_target /* may be null */) {
  TFX_GRID_STRIDE(index_t, e, count) {
    const acc_t tb = t[e / M];
    const acc_t source = static_cast<acc_t>(x0[e]);
    const acc_t target = static_cast<acc_t>(x1[e]);
    x_t[e] = static_cast<scalar_t>((acc_t(1) - keep * tb) * source + tb * target);
    if (v_target != nullptr) v_target[e] = static_cast<scalar_t>(target - keep * source);
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void interpolate_backward_kernel(const scalar_t* __restrict__ grad_xt, const scalar_t* __restrict__ grad_v,
                                            const acc_t* __restrict__ t, index_t count, index_t M, acc_t keep,
                                            scalar_t* __restrict__ grad_x0, scalar_t* __restrict__ grad_x1) {
  TFX_GRID_STRIDE(index_t, e, count) {
    const acc_t tb = t[e / M];
    const acc_t g_xt = grad_xt != nullptr ? static_cast<acc_t>(grad_xt[e]) : acc_t(0);
    const acc_t g_v = grad_v != nullptr ? static_cast<acc_t>(grad_v[e]) : acc_t(0);
    if (grad_x0 != nullptr) grad_x0[e] = static_cast<scalar_t>((acc_t(1) - keep * tb) * g_xt - keep * g_v);
    if (grad_x1 != nullptr) grad_x1[e] = static_cast<scalar_t>(tb * g_xt + g_v);
  }
}

// v_pred - (x1 - keep x0) at element e; x0 null reads as zeros (x1 is then the target velocity itself)
template <typename scalar_t, typename acc_t, typename index_t>
__device__ __forceinline__ acc_t loss_residual(const scalar_t* __restrict__ v_pred, const scalar_t* __restrict__ x0,
                                               const scalar_t* __restrict__ x1, index_t e, acc_t keep) {
  const acc_t target = static_cast<acc_t>(x1[e]);
  return static_cast<acc_t>(v_pred[e]) - (x0 != nullptr ? target - keep * static_cast<acc_t>(x0[e]) : target);
}

// partial[b, chunk] = sum of (v_pred - v_target)^2 over one chunk of sample b, one warp per (b, chunk):
// a flat grid-stride loop over B * chunks warps, so any B works (no gridDim.y limit) and no block barrier.
template <typename scalar_t, typename acc_t>
__global__ void loss_partial_kernel(const scalar_t* __restrict__ v_pred, const scalar_t* __restrict__ x0,
                                    const scalar_t* __restrict__ x1, int64_t B, int64_t M, int64_t chunks,
                                    acc_t keep, acc_t* __restrict__ partial) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t item = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpSize; item < B * chunks;
       item += warps) {
    const int64_t b = item / chunks;
    const int64_t begin = (item - b * chunks) * kLossChunk;
    const int64_t end = min(M, begin + kLossChunk);
    const int64_t offset = b * M;
    acc_t sum = 0;
    for (int64_t m = begin + lane; m < end; m += kWarpSize) {
      const acc_t r = loss_residual(v_pred, x0, x1, offset + m, keep);
      sum += r * r;
    }
    sum = warp_sum(sum);
    if (lane == 0) partial[item] = sum;
  }
}

// Small samples (M <= kSmallSample): loss[b] = mean over sample b, one thread per sample, in index order.
template <typename scalar_t, typename acc_t>
__global__ void loss_small_samples_kernel(const scalar_t* __restrict__ v_pred, const scalar_t* __restrict__ x0,
                                          const scalar_t* __restrict__ x1, int64_t B, int64_t M, acc_t keep,
                                          acc_t* __restrict__ loss) {
  TFX_GRID_STRIDE(int64_t, b, B) {
    acc_t sum = 0;
    for (int64_t e = b * M; e < (b + 1) * M; ++e) {
      const acc_t r = loss_residual(v_pred, x0, x1, e, keep);
      sum += r * r;
    }
    loss[b] = static_cast<acc_t>(static_cast<double>(sum) / static_cast<double>(M));
  }
}

template <typename acc_t>
__global__ void loss_finalize_kernel(const acc_t* __restrict__ partial, int64_t B, int64_t chunks, int64_t M,
                                     acc_t* __restrict__ loss) {
  TFX_GRID_STRIDE(int64_t, b, B) {
    double sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += static_cast<double>(partial[b * chunks + c]);
    loss[b] = static_cast<acc_t>(sum / static_cast<double>(M));
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void loss_backward_kernel(const acc_t* __restrict__ grad_loss, const scalar_t* __restrict__ v_pred,
                                     const scalar_t* __restrict__ x0, const scalar_t* __restrict__ x1, index_t count,
                                     index_t M, acc_t keep, scalar_t* __restrict__ grad_v_pred,
                                     scalar_t* __restrict__ grad_x0, scalar_t* __restrict__ grad_x1) {
  const acc_t per_element = acc_t(2) / static_cast<acc_t>(M);
  TFX_GRID_STRIDE(index_t, e, count) {
    const acc_t gr = grad_loss[e / M] * per_element * loss_residual(v_pred, x0, x1, e, keep);
    grad_v_pred[e] = static_cast<scalar_t>(gr);
    if (grad_x0 != nullptr) grad_x0[e] = static_cast<scalar_t>(keep * gr);
    if (grad_x1 != nullptr) grad_x1[e] = static_cast<scalar_t>(-gr);
  }
}

// out = x + dt (v_u + s (v_c - v_u)), or x + dt v_c when v_uncond is null. In place, out is x, and x may also
// be v_cond or v_uncond (exact aliasing), so none of these pointers is __restrict__.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void euler_kernel(const scalar_t* x, const scalar_t* v_cond, const scalar_t* v_uncond, index_t count,
                             acc_t dt, acc_t scale, scalar_t* out) {
  TFX_GRID_STRIDE(index_t, e, count) {
    const acc_t vc = static_cast<acc_t>(v_cond[e]);
    acc_t v = vc;
    if (v_uncond != nullptr) {
      const acc_t vu = static_cast<acc_t>(v_uncond[e]);
      v = vu + scale * (vc - vu);
    }
    out[e] = static_cast<scalar_t>(static_cast<acc_t>(x[e]) + dt * v);
  }
}

cudaStream_t stream_for(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

std::tuple<at::Tensor, at::Tensor> flow_interpolate_cuda(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& t,
                                                         double sigma_min, bool with_target) {
  InterpolateCall call = begin_flow_interpolate(x0, x1, t, sigma_min, with_target);
  const int64_t count = call.batch.B * call.batch.M;
  if (count == 0) return {call.x_t, call.v_target};
  const c10::cuda::CUDAGuard guard(x0.device());
  TFX_DISPATCH_FLOATS(x0.scalar_type(), "flow_interpolate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(count, kThreads, [&](auto index) {
      using index_t = decltype(index);
      interpolate_kernel<scalar_t, acc_t, index_t><<<grid_stride_blocks(count, kThreads), kThreads, 0,
                                                     stream_for(x0)>>>(
          call.x0.const_data_ptr<scalar_t>(), call.x1.const_data_ptr<scalar_t>(), call.t.const_data_ptr<acc_t>(),
          static_cast<index_t>(count), static_cast<index_t>(call.batch.M), acc_t(1) - static_cast<acc_t>(sigma_min),
          call.x_t.data_ptr<scalar_t>(), with_target ? call.v_target.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {call.x_t, call.v_target};
}

std::tuple<at::Tensor, at::Tensor> flow_interpolate_backward_cuda(const std::optional<at::Tensor>& grad_x_t,
                                                                  const std::optional<at::Tensor>& grad_v_target,
                                                                  const at::Tensor& t, double sigma_min,
                                                                  bool x0_needs_grad, bool x1_needs_grad) {
  InterpolateBackwardCall call =
      begin_flow_interpolate_backward(grad_x_t, grad_v_target, t, sigma_min, x0_needs_grad, x1_needs_grad);
  const at::Tensor& ref = call.grad_x_t.defined() ? call.grad_x_t : call.grad_v_target;
  const int64_t count = call.batch.B * call.batch.M;
  if (count == 0) return {call.grad_x0, call.grad_x1};
  const c10::cuda::CUDAGuard guard(ref.device());
  TFX_DISPATCH_FLOATS(ref.scalar_type(), "flow_interpolate_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(count, kThreads, [&](auto index) {
      using index_t = decltype(index);
      interpolate_backward_kernel<scalar_t, acc_t, index_t><<<grid_stride_blocks(count, kThreads), kThreads, 0,
                                                              stream_for(ref)>>>(
          maybe_ptr<scalar_t>(call.grad_x_t), maybe_ptr<scalar_t>(call.grad_v_target), call.t.const_data_ptr<acc_t>(),
          static_cast<index_t>(count), static_cast<index_t>(call.batch.M), acc_t(1) - static_cast<acc_t>(sigma_min),
          maybe_mutable_ptr<scalar_t>(call.grad_x0), maybe_mutable_ptr<scalar_t>(call.grad_x1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {call.grad_x0, call.grad_x1};
}

at::Tensor flow_matching_loss_cuda(const at::Tensor& v_pred, const std::optional<at::Tensor>& x0,
                                   const at::Tensor& x1, double sigma_min) {
  MatchingLossCall call = begin_flow_matching_loss("tokenflow_ext.flow_matching_loss", v_pred, x0, x1, sigma_min);
  const int64_t B = call.batch.B, M = call.batch.M;
  if (B == 0) return call.loss;
  const c10::cuda::CUDAGuard guard(v_pred.device());
  TFX_DISPATCH_FLOATS(v_pred.scalar_type(), "flow_matching_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t keep = acc_t(1) - static_cast<acc_t>(sigma_min);
    if (M > 0 && M <= kSmallSample) {
      loss_small_samples_kernel<scalar_t, acc_t><<<grid_stride_blocks(B, kThreads), kThreads, 0, stream_for(v_pred)>>>(
          call.v_pred.const_data_ptr<scalar_t>(), maybe_ptr<scalar_t>(call.x0), call.x1.const_data_ptr<scalar_t>(),
          B, M, keep, call.loss.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t chunks = std::max<int64_t>(1, (M + kLossChunk - 1) / kLossChunk);
    at::Tensor partial = at::zeros({B, chunks}, call.loss.options());
    if (M > 0) {
      loss_partial_kernel<scalar_t, acc_t><<<grid_stride_blocks(B * chunks * kWarpSize, kThreads), kThreads, 0,
                                             stream_for(v_pred)>>>(
          call.v_pred.const_data_ptr<scalar_t>(), maybe_ptr<scalar_t>(call.x0), call.x1.const_data_ptr<scalar_t>(),
          B, M, chunks, keep, partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    loss_finalize_kernel<acc_t><<<grid_stride_blocks(B, kThreads), kThreads, 0, stream_for(v_pred)>>>(
        partial.const_data_ptr<acc_t>(), B, chunks, M, call.loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return call.loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_matching_loss_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& v_pred, const std::optional<at::Tensor>& x0, const at::Tensor& x1,
    double sigma_min, bool x0_needs_grad, bool x1_needs_grad) {
  MatchingLossBackwardCall backward =
      begin_flow_matching_loss_backward(grad_loss, v_pred, x0, x1, sigma_min, x0_needs_grad, x1_needs_grad);
  const MatchingLossCall& call = backward.inputs;
  const at::Tensor& grads = backward.grad_loss;
  at::Tensor& grad_v_pred = backward.grad_v_pred;
  at::Tensor& grad_x0 = backward.grad_x0;
  at::Tensor& grad_x1 = backward.grad_x1;
  const int64_t count = call.batch.B * call.batch.M;
  if (count == 0) return {grad_v_pred, grad_x0, grad_x1};
  const c10::cuda::CUDAGuard guard(v_pred.device());
  TFX_DISPATCH_FLOATS(v_pred.scalar_type(), "flow_matching_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_index_type(count, kThreads, [&](auto index) {
      using index_t = decltype(index);
      loss_backward_kernel<scalar_t, acc_t, index_t><<<grid_stride_blocks(count, kThreads), kThreads, 0,
                                                       stream_for(v_pred)>>>(
          grads.const_data_ptr<acc_t>(), call.v_pred.const_data_ptr<scalar_t>(), maybe_ptr<scalar_t>(call.x0),
          call.x1.const_data_ptr<scalar_t>(), static_cast<index_t>(count), static_cast<index_t>(call.batch.M),
          acc_t(1) - static_cast<acc_t>(sigma_min), grad_v_pred.data_ptr<scalar_t>(),
          maybe_mutable_ptr<scalar_t>(grad_x0), maybe_mutable_ptr<scalar_t>(grad_x1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_v_pred, grad_x0, grad_x1};
}

void run_euler_cuda(const EulerCall& call, double dt, double guidance_scale, at::Tensor& out) {
  const at::Tensor x = call.x.contiguous();
  const int64_t count = call.batch.B * call.batch.M;
  if (count == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  TFX_DISPATCH_FLOATS(x.scalar_type(), "flow_euler_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v_cond = call.v_cond.const_data_ptr<scalar_t>();
    const scalar_t* v_uncond = call.v_uncond_data<scalar_t>(count);
    with_index_type(count, kThreads, [&](auto index) {
      using index_t = decltype(index);
      euler_kernel<scalar_t, acc_t, index_t><<<grid_stride_blocks(count, kThreads), kThreads, 0, stream_for(x)>>>(
          x.const_data_ptr<scalar_t>(), v_cond, v_uncond, static_cast<index_t>(count), static_cast<acc_t>(dt),
          static_cast<acc_t>(guidance_scale), out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor flow_euler_step_cuda(const at::Tensor& x, const at::Tensor& v_cond,
                                const std::optional<at::Tensor>& v_uncond, double dt, double guidance_scale) {
  return flow_euler_step_entry(x, v_cond, v_uncond, dt, guidance_scale, run_euler_cuda);
}

void flow_euler_step_inplace_cuda(at::Tensor& x, const at::Tensor& v_cond, const std::optional<at::Tensor>& v_uncond,
                                  double dt, double guidance_scale) {
  flow_euler_step_inplace_entry(x, v_cond, v_uncond, dt, guidance_scale, run_euler_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenflow_ext, CUDA, m) {
  m.impl("flow_interpolate", &flow_interpolate_cuda);
  m.impl("flow_interpolate_backward", &flow_interpolate_backward_cuda);
  m.impl("flow_matching_loss", &flow_matching_loss_cuda);
  m.impl("flow_matching_loss_backward", &flow_matching_loss_backward_cuda);
  m.impl("flow_euler_step", &flow_euler_step_cuda);
  m.impl("flow_euler_step_", &flow_euler_step_inplace_cuda);
}

}  // namespace tokenflow_ext
