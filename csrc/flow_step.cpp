// Schemas of the flow_step family: FlowTok's flow-matching training ops and the CFG + Euler sampling step.
// Convention: t = 0 is the text latent x0, t = 1 the image latent x1; t has shape (B,).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(tokenflow_ext, m) {
  // x_t = (1 - (1 - sigma_min) t) x0 + t x1,  v_target = x1 - (1 - sigma_min) x0   (one pass)
  m.def("flow_interpolate(Tensor x0, Tensor x1, Tensor t, float sigma_min) -> (Tensor x_t, Tensor v_target)");
  // (grad_x0, grad_x1) from the gradients of x_t and v_target (either may be None); an output that is not
  // needed comes back as an empty tensor.
  m.def(
      "flow_interpolate_backward(Tensor? grad_x_t, Tensor? grad_v_target, Tensor t, float sigma_min, "
      "bool x0_needs_grad, bool x1_needs_grad) -> (Tensor, Tensor)");
  // per-sample loss (B,) = mean over each sample of (v_pred - (x1 - (1 - sigma_min) x0))^2, in fp32
  // (fp64 for fp64 inputs); v_target is recomputed, never stored.
  m.def("flow_matching_loss(Tensor v_pred, Tensor x0, Tensor x1, float sigma_min) -> Tensor");
  m.def(
      "flow_matching_loss_backward(Tensor grad_loss, Tensor v_pred, Tensor x0, Tensor x1, float sigma_min, "
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

#include <optional>

// The op namespace as a string, expanded from the namespace token itself: the CUDA emulation build renames the
// namespace with -Dtokenflow_ext=tokenflow_ext_emu, and these lookups must then find its own ops.
#define TFX_STRINGIFY(token) #token
#define TFX_OP_NAME(ns, op) TFX_STRINGIFY(ns) "::" op

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

}  // namespace

TORCH_LIBRARY_IMPL(tokenflow_ext, Autograd, m) { m.impl("flow_euler_step_", &flow_euler_step_inplace_autograd); }

}  // namespace tokenflow_ext
