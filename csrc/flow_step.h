// Tensor-facing argument handling of the flow_step family, shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <optional>

#include "common/checks.h"
#include "common/output_memory.h"

namespace tokenflow_ext {

// A batch of B samples of M elements each, every tensor contiguous.
struct FlowBatch {
  int64_t B = 0;
  int64_t M = 0;
};

inline FlowBatch flow_batch_of(const char* op, const char* name, const at::Tensor& x) {
  check_float_tensor(op, name, x);
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " must have a batch dim (B, ...), got a 0-dim tensor");
  FlowBatch batch;
  batch.B = x.size(0);
  batch.M = batch.B == 0 ? 0 : x.numel() / batch.B;
  return batch;
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  check_float_tensor(op, name, t);
  check_same_device_dtype(op, name, t, ref_name, ref);
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ", ref_name, " has shape ",
              ref.sizes());
}

inline void check_sigma_min(const char* op, double sigma_min) {
  TORCH_CHECK(std::isfinite(sigma_min) && sigma_min >= 0.0 && sigma_min < 1.0, op,
              ": sigma_min must be in [0, 1), got ", sigma_min);
}

// t (B,) of any float dtype on x's device -> contiguous t in the accumulate dtype of x.
inline at::Tensor check_timesteps(const char* op, const at::Tensor& t, const at::Tensor& x, int64_t B) {
  check_float_tensor(op, "t", t);
  TORCH_CHECK(t.device() == x.device(), op, ": t is on ", t.device(), " but x0 is on ", x.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, op, ": t must have shape (B,) = (", B, ",), got ", t.sizes());
  return t.to(accumulate_type_for(x.scalar_type())).contiguous();
}

struct InterpolateCall {
  at::Tensor x0, x1, t;  // contiguous; t in the accumulate dtype
  at::Tensor x_t, v_target;  // v_target is empty (0,) without with_target
  FlowBatch batch;
};

inline InterpolateCall begin_flow_interpolate(const at::Tensor& x0, const at::Tensor& x1, const at::Tensor& t,
                                              double sigma_min, bool with_target) {
  constexpr const char* op = "tokenflow_ext.flow_interpolate";
  InterpolateCall call;
  call.batch = flow_batch_of(op, "x0", x0);
  check_same_shape(op, "x1", x1, "x0", x0);
  check_sigma_min(op, sigma_min);
  call.t = check_timesteps(op, t, x0, call.batch.B);
  call.x0 = x0.contiguous();
  call.x1 = x1.contiguous();
  call.x_t = empty_output_like(call.x0);
  call.v_target = with_target ? empty_output_like(call.x0) : at::empty({0}, x0.options());
  return call;
}

struct InterpolateBackwardCall {
  at::Tensor grad_x_t, grad_v_target, t;  // contiguous, or undefined (zero) for a missing gradient
  at::Tensor grad_x0, grad_x1;            // allocated when needed, else empty
  FlowBatch batch;
};

inline InterpolateBackwardCall begin_flow_interpolate_backward(const std::optional<at::Tensor>& grad_x_t,
                                                               const std::optional<at::Tensor>& grad_v_target,
                                                               const at::Tensor& t, double sigma_min,
                                                               bool x0_needs_grad, bool x1_needs_grad) {
  constexpr const char* op = "tokenflow_ext.flow_interpolate_backward";
  const bool has_xt = grad_x_t.has_value() && grad_x_t->defined();
  const bool has_v = grad_v_target.has_value() && grad_v_target->defined();
  TORCH_CHECK(has_xt || has_v, op, ": needs grad_x_t or grad_v_target");
  const at::Tensor& ref = has_xt ? *grad_x_t : *grad_v_target;
  InterpolateBackwardCall call;
  call.batch = flow_batch_of(op, has_xt ? "grad_x_t" : "grad_v_target", ref);
  if (has_xt && has_v) check_same_shape(op, "grad_v_target", *grad_v_target, "grad_x_t", *grad_x_t);
  check_sigma_min(op, sigma_min);
  call.t = check_timesteps(op, t, ref, call.batch.B);
  if (has_xt) call.grad_x_t = grad_x_t->contiguous();
  if (has_v) call.grad_v_target = grad_v_target->contiguous();
  const auto empty = at::empty({0}, ref.options());
  call.grad_x0 = x0_needs_grad ? empty_output(ref.sizes(), ref.options()) : empty;
  call.grad_x1 = x1_needs_grad ? empty_output(ref.sizes(), ref.options()) : empty;
  return call;
}

struct MatchingLossCall {
  at::Tensor v_pred, x0, x1;  // contiguous; x0 undefined when absent (x1 is then the target velocity)
  at::Tensor loss;            // (B,), accumulate dtype
  FlowBatch batch;
};

inline MatchingLossCall begin_flow_matching_loss(const char* op, const at::Tensor& v_pred,
                                                 const std::optional<at::Tensor>& x0, const at::Tensor& x1,
                                                 double sigma_min) {
  MatchingLossCall call;
  call.batch = flow_batch_of(op, "v_pred", v_pred);
  const bool has_x0 = x0.has_value() && x0->defined();
  if (has_x0) check_same_shape(op, "x0", *x0, "v_pred", v_pred);
  check_same_shape(op, has_x0 ? "x1" : "x1 (the target velocity, x0 being None)", x1, "v_pred", v_pred);
  check_sigma_min(op, sigma_min);
  call.v_pred = v_pred.contiguous();
  if (has_x0) call.x0 = x0->contiguous();
  call.x1 = x1.contiguous();
  call.loss = at::empty({call.batch.B}, v_pred.options().dtype(accumulate_type_for(v_pred.scalar_type())));
  return call;
}

// grad_loss (B,) -> contiguous, in the accumulate dtype.
inline at::Tensor check_grad_loss(const char* op, const at::Tensor& grad_loss, const at::Tensor& v_pred, int64_t B) {
  check_float_tensor(op, "grad_loss", grad_loss);
  TORCH_CHECK(grad_loss.device() == v_pred.device(), op, ": grad_loss is on ", grad_loss.device(),
              " but v_pred is on ", v_pred.device());
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == B, op, ": grad_loss must have shape (B,) = (", B,
              ",), got ", grad_loss.sizes());
  return grad_loss.to(accumulate_type_for(v_pred.scalar_type())).contiguous();
}

struct MatchingLossBackwardCall {
  MatchingLossCall inputs;  // v_pred, x0, x1 (contiguous) and the batch
  at::Tensor grad_loss;     // (B,), accumulate dtype
  at::Tensor grad_v_pred;   // like v_pred
  at::Tensor grad_x0;       // like v_pred when needed, else empty
  at::Tensor grad_x1;       // like x1 when needed, else empty
};

inline MatchingLossBackwardCall begin_flow_matching_loss_backward(const at::Tensor& grad_loss, const at::Tensor& v_pred,
                                                                  const std::optional<at::Tensor>& x0,
                                                                  const at::Tensor& x1, double sigma_min,
                                                                  bool x0_needs_grad, bool x1_needs_grad) {
  constexpr const char* op = "tokenflow_ext.flow_matching_loss_backward";
  MatchingLossBackwardCall call;
  call.inputs = begin_flow_matching_loss(op, v_pred, x0, x1, sigma_min);
  TORCH_CHECK(!x0_needs_grad || call.inputs.x0.defined(), op, ": x0_needs_grad is set but x0 is None");
  call.grad_loss = check_grad_loss(op, grad_loss, v_pred, call.inputs.batch.B);
  call.grad_v_pred = empty_output_like(call.inputs.v_pred);
  const auto empty = at::empty({0}, v_pred.options());
  call.grad_x0 = x0_needs_grad ? empty_output_like(call.inputs.v_pred) : empty;
  call.grad_x1 = x1_needs_grad ? empty_output_like(call.inputs.x1) : empty;
  return call;
}

struct EulerCall {
  at::Tensor x, v_cond, v_uncond;  // contiguous (x may be the caller's tensor for the in-place op)
  FlowBatch batch;
  bool guided = false;   // CFG: v_uncond given, or v_cond stacked [cond; uncond]
  bool stacked = false;  // v_cond is (2B, ...) and v_uncond is its second half

  // The unconditional velocity's data: nullptr without CFG, the second half of a stacked v_cond, or v_uncond.
  template <typename scalar_t>
  const scalar_t* v_uncond_data(int64_t count) const {
    if (!guided) return nullptr;
    return stacked ? v_cond.const_data_ptr<scalar_t>() + count : v_uncond.const_data_ptr<scalar_t>();
  }
};

inline EulerCall begin_flow_euler_step(const char* op, const at::Tensor& x, const at::Tensor& v_cond,
                                       const std::optional<at::Tensor>& v_uncond, double dt, double guidance_scale) {
  EulerCall call;
  call.batch = flow_batch_of(op, "x", x);
  TORCH_CHECK(std::isfinite(dt), op, ": dt must be finite, got ", dt);
  TORCH_CHECK(std::isfinite(guidance_scale), op, ": guidance_scale must be finite, got ", guidance_scale);
  check_float_tensor(op, "v_cond", v_cond);
  check_same_device_dtype(op, "v_cond", v_cond, "x", x);
  if (v_uncond.has_value() && v_uncond->defined()) {
    check_same_shape(op, "v_cond", v_cond, "x", x);
    check_same_shape(op, "v_uncond", *v_uncond, "x", x);
    call.guided = true;
    call.v_uncond = v_uncond->contiguous();
  } else if (v_cond.sizes() == x.sizes()) {
    TORCH_CHECK(guidance_scale == 1.0, op, ": guidance_scale = ", guidance_scale,
                " needs the unconditional velocity: pass v_uncond, or a stacked (2B, ...) v_cond [cond; uncond]");
  } else {
    std::vector<int64_t> stacked_shape(x.sizes().begin(), x.sizes().end());
    stacked_shape[0] *= 2;
    TORCH_CHECK(v_cond.sizes() == at::IntArrayRef(stacked_shape), op, ": v_cond must have the shape of x ",
                x.sizes(), " or the stacked shape ", at::IntArrayRef(stacked_shape), ", got ", v_cond.sizes());
    call.guided = true;
    call.stacked = true;
  }
  call.v_cond = v_cond.contiguous();
  call.x = x;
  return call;
}

// The Euler entries of every backend: `run(call, dt, guidance_scale, out)` is the backend's kernel launch.
template <typename Run>
at::Tensor flow_euler_step_entry(const at::Tensor& x, const at::Tensor& v_cond,
                                 const std::optional<at::Tensor>& v_uncond, double dt, double guidance_scale,
                                 const Run& run) {
  const EulerCall call = begin_flow_euler_step("tokenflow_ext.flow_euler_step", x, v_cond, v_uncond, dt, guidance_scale);
  at::Tensor out = empty_output(x.sizes(), x.options());
  run(call, dt, guidance_scale, out);
  return out;
}

// The in-place step writes x while it reads v_cond and v_uncond element by element: x may be exactly one of the
// velocities (same memory, same strides: each element is read before it is written), or share no memory with
// them; a partial overlap (x = v[1:4], a shifted view of one buffer) would read already-updated elements.
inline void check_euler_inplace_aliasing(const char* op, const at::Tensor& x, const EulerCall& call,
                                         const at::Tensor& v_cond, const std::optional<at::Tensor>& v_uncond) {
  TORCH_CHECK(at::has_internal_overlap(x) != at::MemOverlap::Yes, op,
              ": x has elements that share one memory location (an expanded tensor?); clone() it before ",
              "updating it in place");
  const int64_t B = call.batch.B;
  const auto check_region = [&](const char* name, const at::Tensor& read) {
    TORCH_CHECK(at::get_overlap_status(x, read) != at::MemOverlapStatus::Partial, op, ": x partially overlaps ",
                name, " in memory (e.g. x = v[1:4]); pass x exactly aliased to it or clone() one of them");
  };
  if (call.stacked) {
    check_region("the conditional half of the stacked v_cond", v_cond.narrow(0, 0, B));
    check_region("the unconditional half of the stacked v_cond", v_cond.narrow(0, B, B));
  } else {
    check_region("v_cond", v_cond);
    if (call.guided) check_region("v_uncond", *v_uncond);
  }
}

// In place: a non-contiguous x is computed into a contiguous buffer and copied back through its strides.
template <typename Run>
void flow_euler_step_inplace_entry(at::Tensor& x, const at::Tensor& v_cond, const std::optional<at::Tensor>& v_uncond,
                                   double dt, double guidance_scale, const Run& run) {
  constexpr const char* op = "tokenflow_ext.flow_euler_step_";
  const EulerCall call = begin_flow_euler_step(op, x, v_cond, v_uncond, dt, guidance_scale);
  check_euler_inplace_aliasing(op, x, call, v_cond, v_uncond);
  if (x.is_contiguous()) {
    run(call, dt, guidance_scale, x);
    return;
  }
  at::Tensor out = at::empty(x.sizes(), x.options());
  run(call, dt, guidance_scale, out);
  x.copy_(out);
}

}  // namespace tokenflow_ext
