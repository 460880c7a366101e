"""flow_step: FlowTok's flow-matching training ops and the fused CFG + Euler sampling step.

Convention (FlowTok): t = 0 is the text latent x0, t = 1 the image latent x1, ``t`` has shape ``(B,)``;
``x_t = (1 - (1 - sigma_min) t) x0 + t x1`` and the target velocity ``v* = x1 - (1 - sigma_min) x0``.
All arithmetic is fp32 for fp32/fp16/bf16 tensors (fp64 for fp64); outputs keep the input dtype.
"""

from __future__ import annotations

import torch

from .._parts import accumulate_dtype, bool_arg, float_arg

_ops = torch.ops.tokenflow_ext

REDUCTIONS = ("mean", "sum", "none")


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, sigma_min: float = 1e-5, *,
                x1_grad: bool = True, with_target: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x_t, v_target)`` in one pass over ``x0`` and ``x1``.

    Args:
        x0: ``(B, ...)`` source (text) latent, e.g. ``(B, 77, 16)``.
        x1: target (image) latent, same shape, dtype and device.
        t: ``(B,)`` times in [0, 1], any float dtype.
        sigma_min: FlowTok's ``sigma_min`` (1e-5).
        x1_grad: ``False`` treats ``x1`` as a constant (a frozen tokenizer's output), even if it requires grad.
        with_target: ``False`` skips ``v_target`` (returned as ``None``): one output write less, for callers
            whose loss is :func:`matching_loss`, which recomputes the target itself.

    Returns:
        ``x_t = (1 - (1 - sigma_min) t) x0 + t x1`` and ``v_target = x1 - (1 - sigma_min) x0``. Gradients
        flow to ``x0`` through both outputs (the target is not detached, as in FlowTok), to ``x1`` and to ``t``.
    """
    op = "tokenflow_ext.flow.interpolate"
    sigma_min = float_arg(op, "sigma_min", sigma_min)
    with_target = bool_arg(op, "with_target", with_target)
    x_t, v_target = _ops.flow_interpolate.default(x0, x1 if x1_grad else x1.detach(), t, sigma_min, with_target)
    return x_t, (v_target if with_target else None)


def matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, sigma_min: float = 1e-5,
                  reduction: str = "mean", *, x1_grad: bool = True) -> torch.Tensor:
    """Flow-matching loss ``mean_b mean_elements (v_pred - (x1 - (1 - sigma_min) x0))^2``, fused.

    The target velocity is recomputed inside the kernel, never stored. ``reduction``: ``"mean"`` (a scalar,
    FlowTok's loss), ``"sum"`` over samples, or ``"none"`` for the per-sample ``(B,)`` losses. The loss is
    float32 (float64 for float64 inputs) whatever the input dtype. Gradients reach ``v_pred``, ``x0``
    (through the target) and ``x1`` (unless ``x1_grad=False``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"matching_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if x0 is None:
        raise TypeError("matching_loss: x0 is None; for a stored target velocity use velocity_loss(v_pred, v_target)")
    sigma_min = float_arg("tokenflow_ext.flow.matching_loss", "sigma_min", sigma_min)
    return _reduce(_ops.flow_matching_loss.default(v_pred, x0, x1 if x1_grad else x1.detach(), sigma_min), reduction)


def velocity_loss(v_pred: torch.Tensor, v_target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Flow-matching loss against a stored target velocity: ``mean_b mean_elements (v_pred - v_target)^2``, fused.

    Meant for the ``v_target`` of :func:`interpolate`: its gradient then goes back into interpolate's backward,
    which folds it with the gradient of ``x_t`` into ``x0``'s (and ``x1``'s) in one pass, where
    :func:`matching_loss` (which reads ``x0`` and ``x1`` again) gives ``x0`` a second gradient that autograd
    adds in a separate pass. Same loss up to the rounding of the stored target in the latents' dtype (none
    for float32). ``reduction`` and the float32 (float64) loss as in :func:`matching_loss`; gradients reach
    ``v_pred`` and ``v_target``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"velocity_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return _reduce(_ops.flow_matching_loss.default(v_pred, None, v_target, 0.0), reduction)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def euler_step(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor | None = None, *, dt: float,
               guidance_scale: float = 1.0) -> torch.Tensor:
    """One Euler step with classifier-free guidance on the velocity, in one kernel.

    ``x + dt (v_u + s (v_c - v_u))`` with ``s = guidance_scale``; without ``v_uncond`` either ``v_cond`` has
    the shape of ``x`` (plain ``x + dt v_c``; ``s`` must be 1) or it is the stacked ``(2B, ...)`` output of
    one model call on ``cat([cond, uncond])`` (first half conditional), so no ``chunk`` copies are needed.
    ``dt`` and ``s`` are Python floats: no host synchronisation, safe inside a CUDA graph.
    """
    op = "tokenflow_ext.flow.euler_step"
    return _ops.flow_euler_step.default(x, v_cond, v_uncond, float_arg(op, "dt", dt),
                                float_arg(op, "guidance_scale", guidance_scale))


def euler_step_(x: torch.Tensor, v_cond: torch.Tensor, v_uncond: torch.Tensor | None = None, *, dt: float,
                guidance_scale: float = 1.0) -> torch.Tensor:
    """In-place :func:`euler_step`: updates and returns ``x``."""
    op = "tokenflow_ext.flow.euler_step_"
    _ops.flow_euler_step_.default(x, v_cond, v_uncond, float_arg(op, "dt", dt),
                                  float_arg(op, "guidance_scale", guidance_scale))
    return x


# ---- fake kernels ---------------------------------------------------------------------------------------

def _check_batch(op: str, x: torch.Tensor, t: torch.Tensor) -> None:
    torch._check(x.dim() >= 1, lambda: f"{op}: x0 must have a batch dim (B, ...)")
    torch._check(t.dim() == 1 and t.shape[0] == x.shape[0],
                 lambda: f"{op}: t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")


@torch.library.register_fake("tokenflow_ext::flow_interpolate")
def _interpolate_fake(x0, x1, t, sigma_min, with_target=True):
    _check_batch("tokenflow_ext.flow_interpolate", x0, t)
    torch._check(x0.shape == x1.shape, lambda: "tokenflow_ext.flow_interpolate: x1 must have the shape of x0")
    return torch.empty_like(x0), (torch.empty_like(x0) if with_target else x0.new_empty((0,)))


@torch.library.register_fake("tokenflow_ext::flow_interpolate_backward")
def _interpolate_backward_fake(grad_x_t, grad_v_target, t, sigma_min, x0_needs_grad, x1_needs_grad):
    ref = grad_x_t if grad_x_t is not None else grad_v_target
    grad = lambda needed: torch.empty_like(ref) if needed else ref.new_empty((0,))  # noqa: E731
    return grad(x0_needs_grad), grad(x1_needs_grad)


@torch.library.register_fake("tokenflow_ext::flow_matching_loss")
def _matching_loss_fake(v_pred, x0, x1, sigma_min):
    torch._check(v_pred.dim() >= 1, lambda: "tokenflow_ext.flow_matching_loss: v_pred must be (B, ...)")
    torch._check(v_pred.shape == x1.shape and (x0 is None or x0.shape == x1.shape),
                 lambda: "tokenflow_ext.flow_matching_loss: v_pred, x0 and x1 (the target velocity when x0 is "
                         "None) must have one shape")
    return v_pred.new_empty((v_pred.shape[0],), dtype=accumulate_dtype(v_pred.dtype))


@torch.library.register_fake("tokenflow_ext::flow_matching_loss_backward")
def _matching_loss_backward_fake(grad_loss, v_pred, x0, x1, sigma_min, x0_needs_grad, x1_needs_grad):
    grad = lambda needed: torch.empty_like(v_pred) if needed else v_pred.new_empty((0,))  # noqa: E731
    return torch.empty_like(v_pred), grad(x0_needs_grad), grad(x1_needs_grad)


@torch.library.register_fake("tokenflow_ext::flow_euler_step")
def _euler_fake(x, v_cond, v_uncond, dt, guidance_scale):
    torch._check(v_cond.shape == x.shape or v_cond.shape[0] == 2 * x.shape[0],
                 lambda: "tokenflow_ext.flow_euler_step: v_cond must have the shape of x or (2B, ...)")
    return torch.empty_like(x)


@torch.library.register_fake("tokenflow_ext::flow_euler_step_")
def _euler_inplace_fake(x, v_cond, v_uncond, dt, guidance_scale):
    return None


# ---- autograd -------------------------------------------------------------------------------------------

def _euler_setup(ctx, inputs, output):
    x, v_cond, v_uncond, dt, guidance_scale = inputs
    ctx.dt, ctx.scale = dt, guidance_scale
    ctx.guided = v_uncond is not None or v_cond.shape != x.shape
    ctx.stacked = v_uncond is None and ctx.guided


def _euler_backward(ctx, grad):
    # x + dt (v_u + s (v_c - v_u)):  d/dx = 1, d/dv_c = dt s, d/dv_u = dt (1 - s)
    if not ctx.guided:
        return grad, grad * ctx.dt, None, None, None
    grad_cond = grad * (ctx.dt * ctx.scale)
    grad_uncond = grad * (ctx.dt * (1.0 - ctx.scale))
    if ctx.stacked:
        return grad, torch.cat([grad_cond, grad_uncond]), None, None, None
    return grad, grad_cond, grad_uncond, None, None


# flow_interpolate and flow_matching_loss (and the in-place Euler step) have their autograd in C++
# (csrc/flow_step.cpp): their Python wrappers cost more than the kernels at FlowTok's training shapes.
torch.library.register_autograd("tokenflow_ext::flow_euler_step", _euler_backward, setup_context=_euler_setup)

# Autocast: the loss is computed in float32 anyway (as eager mse_loss is under autocast), so a bf16/fp16
# prediction from an autocast region meets fp32 latents; the other flow ops keep their inputs' dtype.
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("tokenflow_ext::flow_matching_loss", _device_type, torch.float32)
