// Schemas of the flow_step family: FlowTok's flow-matching training ops and the CFG + Euler sampling step.
// Convention: t = 0 is the text latent x0, t = 1 the image latent x1; t has shape (B,).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tokenflow_ext, m) {
  // x_t = (1 - (1 - sigma_min) t) x0 + t x1,  v_target = x1 - (1 - sigma_min) x0   (one pass); without
  // with_target, v_target is not computed and comes back empty (0,)
  m.def(
      "flow_interpolate(Tensor x0, Tensor x1, Tensor t, float sigma_min, bool with_target=True) -> "
      "(Tensor x_t, Tensor v_target)");
  // (grad_x0, grad_x1) from the gradients of x_t and v_target (either may be None); an output that is not
  // needed comes back as an empty tensor.
  m.def(
      "flow_interpolate_backward(Tensor? grad_x_t, Tensor? grad_v_target, Tensor t, float sigma_min, "
      "bool x0_needs_grad, bool x1_needs_grad) -> (Tensor, Tensor)");
  // per-sample loss (B,) = mean over each sample of (v_pred - (x1 - (1 - sigma_min) x0))^2, in fp32
  // (fp64 for fp64 inputs); with x0 the target is recomputed, never stored. x0 None reads as zeros: x1 is then
  // the target velocity itself (flow.velocity_loss, on the v_target that flow_interpolate stored).
  m.def("flow_matching_loss(Tensor v_pred, Tensor? x0, Tensor x1, float sigma_min) -> Tensor");
  m.def(
      "flow_matching_loss_backward(Tensor grad_loss, Tensor v_pred, Tensor? x0, Tensor x1, float sigma_min, "
      "bool x0_needs_grad, bool x1_needs_grad) -> (Tensor, Tensor, Tensor)");
  // x + dt (v_u + s (v_c - v_u)); v_uncond None: v_cond is either (B, ...) (plain Euler, s must be 1) or the
  // stacked (2B, ...) model output [cond; uncond].
  m.def("flow_euler_step(Tensor x, Tensor v_cond, Tensor? v_uncond, float dt, float guidance_scale) -> Tensor");
  m.def("flow_euler_step_(Tensor(a!) x, Tensor v_cond, Tensor? v_uncond, float dt, float guidance_scale) -> ()");
}

// ---- autograd of the in-place Euler step (shared by every backend) ----
// The step is a mutating op, so it behaves as eager in-place ops do: with grad mode on and any input
// requiring grad it runs as `x.copy_(flow_euler_step(x, ...))`, which records the gradient of every input
// and gives the errors of eager in-place ops (leaf that requires grad, inference tensor, saved tensor
// modified). Otherwise it runs the backend kernel below autograd and bumps x's version counter.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>

#include "common/checks.h"
#include "common/op_name.h"


namespace tokenflow_ext {
namespace {

void flow_euler_step_inplace_autograd(at::Tensor& x, const at::Tensor& v_cond,
                                      const std::optional<at::Tensor>& v_uncond, double dt, double guidance_scale) {
  static const auto functional =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(TFX_OP_NAME(tokenflow_ext, "flow_euler_step"), "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double)>();
  static const auto in_place =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(TFX_OP_NAME(tokenflow_ext, "flow_euler_step_"), "")
          .typed<void(at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double)>();
  constexpr const char* op = "tokenflow_ext.flow_euler_step_";
  TORCH_CHECK(x.defined(), op, ": x is undefined");
  TORCH_CHECK(!x.is_inference() || c10::InferenceMode::is_enabled(), op,
              ": x is an inference tensor; an in-place update of an inference tensor outside InferenceMode is "
              "not allowed (clone() it first)");
  const bool uncond_grad = v_uncond.has_value() && v_uncond->defined() && v_uncond->requires_grad();
  if (at::GradMode::is_enabled() && (x.requires_grad() || v_cond.requires_grad() || uncond_grad)) {
    const at::Tensor out = functional.call(x, v_cond, v_uncond, dt, guidance_scale);
    x.copy_(out);
    return;
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    in_place.call(x, v_cond, v_uncond, dt, guidance_scale);
  }
  x.unsafeGetTensorImpl()->bump_version();
}

// ---- autograd of flow_interpolate and flow_matching_loss ----
// In C++ rather than torch.library.register_autograd: a training step calls these two ops every iteration, and
// the Python autograd wrapper (setup_context, backward, saved-tensor unpacking, zero-filled gradients for
// unused outputs) cost more than the kernels at FlowTok's shapes. Gradients of unused outputs stay undefined
// (no zero tensors are made or read). The backward ops have Autograd kernels of their own: under create_graph
// (grad mode on inside backward) they compute the same formulas in differentiable ATen ops, so double backward
// works, and the dispatcher never falls back to autograd's not-implemented path.

// (B,) per-sample values -> (B, 1, ..., 1) broadcastable against `like`.
at::Tensor per_sample(const at::Tensor& values, const at::Tensor& like) {
  std::vector<int64_t> shape(static_cast<size_t>(std::max<int64_t>(like.dim(), 1)), 1);
  shape[0] = values.size(0);
  return values.reshape(shape);
}

const auto& interpolate_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(TFX_OP_NAME(tokenflow_ext, "flow_interpolate_backward"), "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                                    const at::Tensor&, double, bool, bool)>();
  return op;
}

const auto& matching_loss_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(TFX_OP_NAME(tokenflow_ext, "flow_matching_loss_backward"), "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const std::optional<at::Tensor>&, const at::Tensor&,
                                                                double, bool, bool)>();
  return op;
}

bool requires_grad(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() && tensor->defined() && tensor->requires_grad();
}

// flow_interpolate_backward in differentiable ATen ops (the gradients of x0 and x1 from those of x_t and v_target)
std::tuple<at::Tensor, at::Tensor> interpolate_backward_formula(const std::optional<at::Tensor>& grad_x_t,
                                                                const std::optional<at::Tensor>& grad_v,
                                                                const at::Tensor& t, double sigma_min) {
  const bool has_x_t = grad_x_t.has_value() && grad_x_t->defined();
  const bool has_v = grad_v.has_value() && grad_v->defined();
  if (!has_x_t && !has_v) return {at::Tensor(), at::Tensor()};
  const at::Tensor& ref = has_x_t ? *grad_x_t : *grad_v;
  const auto acc = accumulate_type_for(ref.scalar_type());
  const double keep = 1.0 - sigma_min;
  const at::Tensor tt = per_sample(t.to(acc), ref);
  at::Tensor g0, g1;
  if (has_x_t) {
    const at::Tensor g = grad_x_t->to(acc);
    g0 = (1.0 - keep * tt) * g;
    g1 = tt * g;
  }
  if (has_v) {
    const at::Tensor g = grad_v->to(acc);
    g0 = g0.defined() ? g0 - keep * g : -keep * g;
    g1 = g1.defined() ? g1 + g : g;
  }
  return {g0.to(ref.scalar_type()), g1.to(ref.scalar_type())};
}

// Autograd kernel of the backward op: under grad mode with inputs that require grad (double backward, or a
// direct call), the differentiable formulas; otherwise the fused kernel below autograd.
std::tuple<at::Tensor, at::Tensor> flow_interpolate_backward_autograd(const std::optional<at::Tensor>& grad_x_t,
                                                                      const std::optional<at::Tensor>& grad_v,
                                                                      const at::Tensor& t, double sigma_min,
                                                                      bool needs_x0, bool needs_x1) {
  if (at::GradMode::is_enabled() && (requires_grad(grad_x_t) || requires_grad(grad_v) || t.requires_grad())) {
    auto [g0, g1] = interpolate_backward_formula(grad_x_t, grad_v, t, sigma_min);
    return {needs_x0 ? g0 : at::Tensor(), needs_x1 ? g1 : at::Tensor()};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return interpolate_backward_op().call(grad_x_t, grad_v, t, sigma_min, needs_x0, needs_x1);
}

// flow_matching_loss_backward in differentiable ATen ops
std::tuple<at::Tensor, at::Tensor, at::Tensor> matching_loss_backward_formula(const at::Tensor& grad_loss,
                                                                              const at::Tensor& v_pred,
                                                                              const std::optional<at::Tensor>& x0,
                                                                              const at::Tensor& x1, double sigma_min) {
  const bool has_x0 = x0.has_value() && x0->defined();
  const auto acc = accumulate_type_for(v_pred.scalar_type());
  const double keep = 1.0 - sigma_min;
  const int64_t per_sample_count = v_pred.size(0) > 0 ? v_pred[0].numel() : 1;
  const at::Tensor target = has_x0 ? x1.to(acc) - keep * x0->to(acc) : x1.to(acc);
  const at::Tensor residual = v_pred.to(acc) - target;
  const at::Tensor grad_residual =
      per_sample(grad_loss.to(acc) * (2.0 / static_cast<double>(per_sample_count)), v_pred) * residual;
  return {grad_residual.to(v_pred.scalar_type()), has_x0 ? (keep * grad_residual).to(x0->scalar_type()) : at::Tensor(),
          (-grad_residual).to(x1.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_matching_loss_backward_autograd(
    const at::Tensor& grad_loss, const at::Tensor& v_pred, const std::optional<at::Tensor>& x0, const at::Tensor& x1,
    double sigma_min, bool needs_x0, bool needs_x1) {
  if (at::GradMode::is_enabled() &&
      (grad_loss.requires_grad() || v_pred.requires_grad() || requires_grad(x0) || x1.requires_grad())) {
    auto [grad_v, grad_x0, grad_x1] = matching_loss_backward_formula(grad_loss, v_pred, x0, x1, sigma_min);
    return {grad_v, needs_x0 ? grad_x0 : at::Tensor(), needs_x1 ? grad_x1 : at::Tensor()};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return matching_loss_backward_op().call(grad_loss, v_pred, x0, x1, sigma_min, needs_x0, needs_x1);
}

struct InterpolateFunction : public torch::autograd::Function<InterpolateFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x0,
                                                const at::Tensor& x1, const at::Tensor& t, double sigma_min,
                                                bool with_target) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(TFX_OP_NAME(tokenflow_ext, "flow_interpolate"), "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&, double, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    // d x_t / d t = v_target: computed (and kept) when t needs a gradient, even if the caller did not ask for it
    const bool t_grad = t.requires_grad();
    auto [x_t, v_target] = op.call(x0, x1, t, sigma_min, with_target || t_grad);
    ctx->set_materialize_grads(false);
    ctx->saved_data["sigma_min"] = sigma_min;
    ctx->save_for_backward({t, t_grad ? v_target : at::Tensor()});
    if (!with_target && t_grad) v_target = at::empty({0}, x_t.options());
    if (!with_target) ctx->mark_non_differentiable({v_target});
    return {x_t, v_target};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& t = saved[0];
    const double sigma_min = ctx->saved_data["sigma_min"].toDouble();
    const at::Tensor& grad_x_t = grads[0];
    const at::Tensor& grad_v = grads[1];
    const bool needs_x0 = ctx->needs_input_grad(0), needs_x1 = ctx->needs_input_grad(1);
    at::Tensor grad_x0, grad_x1, grad_t;
    if ((needs_x0 || needs_x1) && (grad_x_t.defined() || grad_v.defined())) {
      // under create_graph the dispatcher's Autograd kernel of the backward op takes the differentiable formulas
      std::tie(grad_x0, grad_x1) = interpolate_backward_op().call(grad_x_t, grad_v, t, sigma_min, needs_x0, needs_x1);
      if (!needs_x0) grad_x0 = at::Tensor();
      if (!needs_x1) grad_x1 = at::Tensor();
    }
    if (ctx->needs_input_grad(2) && grad_x_t.defined()) {
      const auto acc = accumulate_type_for(grad_x_t.scalar_type());
      const at::Tensor products = grad_x_t.to(acc) * saved[1].to(acc);
      grad_t = products.reshape({products.size(0), -1}).sum(1).to(t.scalar_type());
    }
    return {grad_x0, grad_x1, grad_t, at::Tensor(), at::Tensor()};
  }
};

struct MatchingLossFunction : public torch::autograd::Function<MatchingLossFunction> {
  // x0 undefined: no x0 term (x1 is the target velocity)
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& v_pred,
                            const std::optional<at::Tensor>& x0, const at::Tensor& x1, double sigma_min) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow(TFX_OP_NAME(tokenflow_ext, "flow_matching_loss"), "")
            .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor loss = op.call(v_pred, x0, x1, sigma_min);
    ctx->saved_data["sigma_min"] = sigma_min;
    ctx->save_for_backward({v_pred, x0.value_or(at::Tensor()), x1});
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &v_pred = saved[0], &x0 = saved[1], &x1 = saved[2];
    const double sigma_min = ctx->saved_data["sigma_min"].toDouble();
    // needs_input_grad counts edges, and a None x0 has none
    const bool needs_v = ctx->needs_input_grad(0), needs_x0 = x0.defined() && ctx->needs_input_grad(1),
               needs_x1 = ctx->needs_input_grad(x0.defined() ? 2 : 1);
    // under create_graph the dispatcher's Autograd kernel of the backward op takes the differentiable formulas
    const std::optional<at::Tensor> source = x0.defined() ? std::optional<at::Tensor>(x0) : std::nullopt;
    at::Tensor grad_v, grad_x0, grad_x1;
    std::tie(grad_v, grad_x0, grad_x1) =
        matching_loss_backward_op().call(grads[0], v_pred, source, x1, sigma_min, needs_x0, needs_x1);
    return {needs_v ? grad_v : at::Tensor(), needs_x0 ? grad_x0 : at::Tensor(), needs_x1 ? grad_x1 : at::Tensor(),
            at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> flow_interpolate_autograd(const at::Tensor& x0, const at::Tensor& x1,
                                                             const at::Tensor& t, double sigma_min, bool with_target) {
  auto outputs = InterpolateFunction::apply(x0, x1, t, sigma_min, with_target);
  return {outputs[0], outputs[1]};
}

at::Tensor flow_matching_loss_autograd(const at::Tensor& v_pred, const std::optional<at::Tensor>& x0,
                                       const at::Tensor& x1, double sigma_min) {
  return MatchingLossFunction::apply(v_pred, x0, x1, sigma_min);
}

}  // namespace

TORCH_LIBRARY_IMPL(tokenflow_ext, Autograd, m) {
  m.impl("flow_euler_step_", &flow_euler_step_inplace_autograd);
  m.impl("flow_interpolate", &flow_interpolate_autograd);
  m.impl("flow_matching_loss", &flow_matching_loss_autograd);
  m.impl("flow_interpolate_backward", &flow_interpolate_backward_autograd);
  m.impl("flow_matching_loss_backward", &flow_matching_loss_backward_autograd);
}

}  // namespace tokenflow_ext
