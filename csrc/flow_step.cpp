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
