// CPU flow_step kernels: one pass over the data per op, per-sample coefficients hoisted out of the
// inner loop, fp32 arithmetic (fp64 for fp64 inputs), per-sample loss sums in fp64 partial sums.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "common/cpu_simd.h"
#include "common/elementwise_span.h"
#include "flow_step.h"

namespace tokenflow_ext {
namespace {

constexpr int64_t kElementsPerTask = 1 << 15;

// Run fn(b) over samples, in chunks of about kElementsPerTask elements.
template <typename Fn>
void for_each_sample(const FlowBatch& batch, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, batch.M));
  at::parallel_for(0, batch.B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) fn(b);
  });
}

// ---- hot loops over one contiguous span (element-wise maps vectorise in map_span's SIMD clones; the
// reduction below is a SIMD clone of its own) ----

// x_t = a x0 + tb x1 and, with two outputs, v_target = x1 - keep x0
template <int kOut, typename scalar_t, typename acc_t>
void interpolate_span(const scalar_t* x0, const scalar_t* x1, int64_t n, acc_t a, acc_t tb, acc_t keep,
                      std::array<scalar_t*, kOut> out) {
  map_span<scalar_t, acc_t, 2, kOut>({x0, x1}, out, n, [=](const acc_t (&in)[2], acc_t (&result)[kOut]) {
    result[0] = a * in[0] + tb * in[1];
    if constexpr (kOut == 2) result[1] = in[1] - keep * in[0];
  });
}

// out = c_xt g_xt + c_v g_v (either gradient may be absent)
template <typename scalar_t, typename acc_t>
void linear_combination_span(const scalar_t* g_xt, acc_t c_xt, const scalar_t* g_v, acc_t c_v, int64_t n,
                             scalar_t* out) {
  if (g_xt != nullptr && g_v != nullptr) {
    map_span<scalar_t, acc_t, 2, 1>({g_xt, g_v}, {out}, n, [=](const acc_t (&in)[2], acc_t (&result)[1]) {
      result[0] = c_xt * in[0] + c_v * in[1];
    });
    return;
  }
  const acc_t c = g_xt != nullptr ? c_xt : c_v;
  map_span<scalar_t, acc_t, 1, 1>({g_xt != nullptr ? g_xt : g_v}, {out}, n,
                                  [=](const acc_t (&in)[1], acc_t (&result)[1]) { result[0] = c * in[0]; });
}

// The target velocity of the loss spans: x1 - keep x0, or x1 itself when the loss has no x0 (kWithSource false:
// x1 is a stored v_target; x0 is then null and never read).
template <bool kWithSource, typename acc_t>
acc_t target_velocity(acc_t source, acc_t target, acc_t keep) {
  if constexpr (kWithSource) {
    return target - keep * source;
  } else {
    return target;
  }
}

// sum (v_pred - target)^2 over the span: kResidualLanes lanes in the arithmetic type over each block of up to
// kResidualBlock elements (they vectorise), each block's lanes added in a fixed tree into an fp64 total; the
// last block is shorter (any whole number of lane groups) and only the final elements that fill no lane group
// go one by one. bfloat16 spans run 32 lanes over 16 pairs (the low and the high halves, see
// elementwise_span.h) first. Deterministic, and fp64 where the long sums happen.
constexpr int64_t kResidualLanes = 16;
constexpr int64_t kResidualBlock = 256;

template <int64_t kLanes, typename acc_t>
double lane_total(acc_t (&lanes)[kLanes]) {
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return static_cast<double>(lanes[0]);
}

template <bool kWithSource, typename scalar_t, typename acc_t>
TFX_CPU_SIMD double squared_residual_span(const scalar_t* v_pred, const scalar_t* x0, const scalar_t* x1, int64_t n,
                                          acc_t keep) {
  const auto squared = [keep](acc_t v, acc_t source, acc_t target) {
    const acc_t r = v - target_velocity<kWithSource>(source, target, keep);
    return r * r;
  };
  const auto source_at = [x0](int64_t i) { return kWithSource ? load_as<acc_t>(x0[i]) : acc_t(0); };
  double total = 0;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    constexpr int64_t kPairs = kResidualLanes;
    const int64_t grouped = n - n % (2 * kPairs);
    while (i < grouped) {
      const int64_t block_end = std::min(i + kResidualBlock, grouped);
      acc_t lanes[2 * kPairs] = {};
      for (int64_t j = i; j < block_end; j += 2 * kPairs) {
        for (int64_t l = 0; l < kPairs; ++l) {
          const uint32_t v = bf16_pair_word(v_pred + j + 2 * l), b = bf16_pair_word(x1 + j + 2 * l);
          const uint32_t a = kWithSource ? bf16_pair_word(x0 + j + 2 * l) : 0u;
          lanes[l] += squared(bf16_pair_low(v), bf16_pair_low(a), bf16_pair_low(b));
          lanes[kPairs + l] += squared(bf16_pair_high(v), bf16_pair_high(a), bf16_pair_high(b));
        }
      }
      total += lane_total(lanes);
      i = block_end;
    }
  }
  const int64_t grouped = n - n % kResidualLanes;
  while (i < grouped) {
    const int64_t block_end = std::min(i + kResidualBlock, grouped);
    acc_t lanes[kResidualLanes] = {};
    for (int64_t j = i; j < block_end; j += kResidualLanes) {
      for (int64_t l = 0; l < kResidualLanes; ++l) {
        lanes[l] += squared(load_as<acc_t>(v_pred[j + l]), source_at(j + l), load_as<acc_t>(x1[j + l]));
      }
    }
    total += lane_total(lanes);
    i = block_end;
  }
  for (; i < n; ++i) {
    total += static_cast<double>(squared(load_as<acc_t>(v_pred[i]), source_at(i), load_as<acc_t>(x1[i])));
  }
  return total;
}

// r = v_pred - target: grad_v_pred = g r, grad_x0 = keep g r, grad_x1 = -g r (x0 / x1 outputs optional;
// without a source the inputs are v_pred and x1 only)
template <bool kWithSource, typename scalar_t, typename acc_t>
void residual_gradients_span(const scalar_t* v_pred, const scalar_t* x0, const scalar_t* x1, int64_t n, acc_t keep,
                             acc_t g, scalar_t* grad_v_pred, scalar_t* grad_x0, scalar_t* grad_x1) {
  constexpr int kIn = kWithSource ? 3 : 2;
  using Inputs = const acc_t (&)[kIn];
  const auto scaled_residual = [=](Inputs in) {
    return g * (in[0] - target_velocity<kWithSource>(in[kIn - 2], in[kIn - 1], keep));
  };
  std::array<const scalar_t*, kIn> inputs{};
  inputs.front() = v_pred;
  inputs.back() = x1;
  if constexpr (kWithSource) inputs[1] = x0;
  if (grad_x0 != nullptr && grad_x1 != nullptr) {
    map_span<scalar_t, acc_t, kIn, 3>(inputs, {grad_v_pred, grad_x0, grad_x1}, n, [=](Inputs in, acc_t (&out)[3]) {
      out[0] = scaled_residual(in);
      out[1] = keep * out[0];
      out[2] = -out[0];
    });
  } else if (grad_x0 != nullptr || grad_x1 != nullptr) {
    const acc_t factor = grad_x0 != nullptr ? keep : acc_t(-1);
    map_span<scalar_t, acc_t, kIn, 2>(inputs, {grad_v_pred, grad_x0 != nullptr ? grad_x0 : grad_x1}, n,
                                      [=](Inputs in, acc_t (&out)[2]) {
                                        out[0] = scaled_residual(in);
                                        out[1] = factor * out[0];
                                      });
  } else {
    map_span<scalar_t, acc_t, kIn, 1>(inputs, {grad_v_pred}, n,
                                      [=](Inputs in, acc_t (&out)[1]) { out[0] = scaled_residual(in); });
  }
}

// out = x + dt (v_u + s (v_c - v_u)), or x + dt v_c when v_uncond is null. out may be x (the in-place step).
template <typename scalar_t, typename acc_t>
void euler_span(const scalar_t* x, const scalar_t* v_cond, const scalar_t* v_uncond, int64_t n, acc_t dt,
                acc_t scale, scalar_t* out) {
  if (v_uncond == nullptr) {
    map_span<scalar_t, acc_t, 2, 1>({x, v_cond}, {out}, n,
                                    [=](const acc_t (&in)[2], acc_t (&result)[1]) { result[0] = in[0] + dt * in[1]; });
    return;
  }
  map_span<scalar_t, acc_t, 3, 1>({x, v_cond, v_uncond}, {out}, n, [=](const acc_t (&in)[3], acc_t (&result)[1]) {
    const acc_t vu = in[2];
    result[0] = in[0] + dt * (vu + scale * (in[1] - vu));
  });
}

// ---- kernels: split the batch into spans ----

template <typename scalar_t, typename acc_t>
void interpolate_kernel(const scalar_t* x0, const scalar_t* x1, const acc_t* t, FlowBatch batch, acc_t sigma_min,
                        scalar_t* x_t, scalar_t* v_target) {
  const acc_t keep = acc_t(1) - sigma_min;
  for_each_sample(batch, [&](int64_t b) {
    const int64_t o = b * batch.M;
    const acc_t a = acc_t(1) - keep * t[b];
    if (v_target == nullptr) {
      interpolate_span<1, scalar_t, acc_t>(x0 + o, x1 + o, batch.M, a, t[b], keep, {x_t + o});
    } else {
      interpolate_span<2, scalar_t, acc_t>(x0 + o, x1 + o, batch.M, a, t[b], keep, {x_t + o, v_target + o});
    }
  });
}

// grad_x0 = a(t) g_xt - (1 - sigma) g_v;  grad_x1 = t g_xt + g_v  (null gradient pointers read as zero)
template <typename scalar_t, typename acc_t>
void interpolate_backward_kernel(const scalar_t* grad_xt, const scalar_t* grad_v, const acc_t* t, FlowBatch batch,
                                 acc_t sigma_min, scalar_t* grad_x0, scalar_t* grad_x1) {
  const acc_t keep = acc_t(1) - sigma_min;
  for_each_sample(batch, [&](int64_t b) {
    const int64_t o = b * batch.M;
    const scalar_t* g_xt = grad_xt != nullptr ? grad_xt + o : nullptr;
    const scalar_t* g_v = grad_v != nullptr ? grad_v + o : nullptr;
    if (grad_x0 != nullptr) linear_combination_span<scalar_t, acc_t>(g_xt, acc_t(1) - keep * t[b], g_v, -keep, batch.M, grad_x0 + o);
    if (grad_x1 != nullptr) linear_combination_span<scalar_t, acc_t>(g_xt, t[b], g_v, acc_t(1), batch.M, grad_x1 + o);
  });
}

// x0 null: the loss of v_pred against x1 itself
template <typename scalar_t, typename acc_t>
void matching_loss_kernel(const scalar_t* v_pred, const scalar_t* x0, const scalar_t* x1, FlowBatch batch,
                          acc_t sigma_min, acc_t* loss) {
  const acc_t keep = acc_t(1) - sigma_min;
  for_each_sample(batch, [&](int64_t b) {
    const int64_t o = b * batch.M;
    const double sum =
        x0 != nullptr ? squared_residual_span<true, scalar_t, acc_t>(v_pred + o, x0 + o, x1 + o, batch.M, keep)
                      : squared_residual_span<false, scalar_t, acc_t>(v_pred + o, nullptr, x1 + o, batch.M, keep);
    loss[b] = static_cast<acc_t>(sum / static_cast<double>(batch.M));
  });
}

template <typename scalar_t, typename acc_t>
void matching_loss_backward_kernel(const acc_t* grad_loss, const scalar_t* v_pred, const scalar_t* x0,
                                   const scalar_t* x1, FlowBatch batch, acc_t sigma_min, scalar_t* grad_v_pred,
                                   scalar_t* grad_x0, scalar_t* grad_x1) {
  const acc_t keep = acc_t(1) - sigma_min;
  const acc_t per_element = acc_t(2) / static_cast<acc_t>(batch.M);
  for_each_sample(batch, [&](int64_t b) {
    const int64_t o = b * batch.M;
    const acc_t g = grad_loss[b] * per_element;
    scalar_t* g_x1 = grad_x1 != nullptr ? grad_x1 + o : nullptr;
    if (x0 != nullptr) {
      residual_gradients_span<true, scalar_t, acc_t>(v_pred + o, x0 + o, x1 + o, batch.M, keep, g, grad_v_pred + o,
                                                     grad_x0 != nullptr ? grad_x0 + o : nullptr, g_x1);
    } else {
      residual_gradients_span<false, scalar_t, acc_t>(v_pred + o, nullptr, x1 + o, batch.M, keep, g, grad_v_pred + o,
                                                      nullptr, g_x1);
    }
  });
}

template <typename scalar_t, typename acc_t>
void euler_kernel(const scalar_t* x, const scalar_t* v_cond, const scalar_t* v_uncond, int64_t count, acc_t dt,
                  acc_t scale, scalar_t* out) {
  at::parallel_for(0, count, kElementsPerTask, [&](int64_t begin, int64_t end) {
    euler_span<scalar_t, acc_t>(x + begin, v_cond + begin, v_uncond != nullptr ? v_uncond + begin : nullptr,
                                end - begin, dt, scale, out + begin);
  });
}

std::tuple<at::Tensor, at::Tensor> flow_interpolate_cpu(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& t,
                                                        double sigma_min, bool with_target) {
  InterpolateCall call = begin_flow_interpolate(x0, x1, t, sigma_min, with_target);
  TFX_DISPATCH_FLOATS(x0.scalar_type(), "flow_interpolate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    interpolate_kernel<scalar_t, acc_t>(call.x0.const_data_ptr<scalar_t>(), call.x1.const_data_ptr<scalar_t>(),
                                        call.t.const_data_ptr<acc_t>(), call.batch, static_cast<acc_t>(sigma_min),
                                        call.x_t.data_ptr<scalar_t>(),
                                        with_target ? call.v_target.data_ptr<scalar_t>() : nullptr);
  });
  return {call.x_t, call.v_target};
}

std::tuple<at::Tensor, at::Tensor> flow_interpolate_backward_cpu(const std::optional<at::Tensor>& grad_x_t,
                                                                 const std::optional<at::Tensor>& grad_v_target,
                                                                 const at::Tensor& t, double sigma_min,
                                                                 bool x0_needs_grad, bool x1_needs_grad) {
  InterpolateBackwardCall call =
      begin_flow_interpolate_backward(grad_x_t, grad_v_target, t, sigma_min, x0_needs_grad, x1_needs_grad);
  const at::Tensor& ref = call.grad_x_t.defined() ? call.grad_x_t : call.grad_v_target;
  TFX_DISPATCH_FLOATS(ref.scalar_type(), "flow_interpolate_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    interpolate_backward_kernel<scalar_t, acc_t>(
        maybe_ptr<scalar_t>(call.grad_x_t), maybe_ptr<scalar_t>(call.grad_v_target), call.t.const_data_ptr<acc_t>(),
        call.batch, static_cast<acc_t>(sigma_min), maybe_mutable_ptr<scalar_t>(call.grad_x0),
        maybe_mutable_ptr<scalar_t>(call.grad_x1));
  });
  return {call.grad_x0, call.grad_x1};
}

at::Tensor flow_matching_loss_cpu(const at::Tensor& v_pred, const std::optional<at::Tensor>& x0, const at::Tensor& x1,
                                  double sigma_min) {
  MatchingLossCall call = begin_flow_matching_loss("tokenflow_ext.flow_matching_loss", v_pred, x0, x1, sigma_min);
  TFX_DISPATCH_FLOATS(v_pred.scalar_type(), "flow_matching_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    matching_loss_kernel<scalar_t, acc_t>(call.v_pred.const_data_ptr<scalar_t>(), maybe_ptr<scalar_t>(call.x0),
                                          call.x1.const_data_ptr<scalar_t>(), call.batch,
                                          static_cast<acc_t>(sigma_min), call.loss.data_ptr<acc_t>());
  });
  return call.loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_matching_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& v_pred, const std::optional<at::Tensor>& x0, const at::Tensor& x1,
    double sigma_min, bool x0_needs_grad, bool x1_needs_grad) {
  MatchingLossBackwardCall backward =
      begin_flow_matching_loss_backward(grad_loss, v_pred, x0, x1, sigma_min, x0_needs_grad, x1_needs_grad);
  const MatchingLossCall& call = backward.inputs;
  const at::Tensor& grads = backward.grad_loss;
  at::Tensor& grad_v_pred = backward.grad_v_pred;
  at::Tensor& grad_x0 = backward.grad_x0;
  at::Tensor& grad_x1 = backward.grad_x1;
  TFX_DISPATCH_FLOATS(v_pred.scalar_type(), "flow_matching_loss_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    matching_loss_backward_kernel<scalar_t, acc_t>(
        grads.const_data_ptr<acc_t>(), call.v_pred.const_data_ptr<scalar_t>(), maybe_ptr<scalar_t>(call.x0),
        call.x1.const_data_ptr<scalar_t>(), call.batch, static_cast<acc_t>(sigma_min),
        grad_v_pred.data_ptr<scalar_t>(), maybe_mutable_ptr<scalar_t>(grad_x0), maybe_mutable_ptr<scalar_t>(grad_x1));
  });
  return {grad_v_pred, grad_x0, grad_x1};
}

void run_euler_cpu(const EulerCall& call, double dt, double guidance_scale, at::Tensor& out) {
  const at::Tensor x = call.x.contiguous();
  const int64_t count = call.batch.B * call.batch.M;
  TFX_DISPATCH_FLOATS(x.scalar_type(), "flow_euler_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* v_cond = call.v_cond.const_data_ptr<scalar_t>();
    const scalar_t* v_uncond = call.v_uncond_data<scalar_t>(count);
    euler_kernel<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), v_cond, v_uncond, count, static_cast<acc_t>(dt),
                                  static_cast<acc_t>(guidance_scale), out.data_ptr<scalar_t>());
  });
}

at::Tensor flow_euler_step_cpu(const at::Tensor& x, const at::Tensor& v_cond,
                               const std::optional<at::Tensor>& v_uncond, double dt, double guidance_scale) {
  return flow_euler_step_entry(x, v_cond, v_uncond, dt, guidance_scale, run_euler_cpu);
}

void flow_euler_step_inplace_cpu(at::Tensor& x, const at::Tensor& v_cond, const std::optional<at::Tensor>& v_uncond,
                                 double dt, double guidance_scale) {
  flow_euler_step_inplace_entry(x, v_cond, v_uncond, dt, guidance_scale, run_euler_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenflow_ext, CPU, m) {
  m.impl("flow_interpolate", &flow_interpolate_cpu);
  m.impl("flow_interpolate_backward", &flow_interpolate_backward_cpu);
  m.impl("flow_matching_loss", &flow_matching_loss_cpu);
  m.impl("flow_matching_loss_backward", &flow_matching_loss_backward_cpu);
  m.impl("flow_euler_step", &flow_euler_step_cpu);
  m.impl("flow_euler_step_", &flow_euler_step_inplace_cpu);
}

}  // namespace tokenflow_ext
