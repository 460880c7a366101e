"""Reference for the flow_step family: FlowTok's eager formulas, written as a user would in PyTorch."""

from __future__ import annotations

import torch

from .._parts import accumulate_dtype


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def interpolate_reference(x0, x1, t, sigma_min=1e-5):
    tt = _per_sample(t, x0)
    return (1 - (1 - sigma_min) * tt) * x0 + tt * x1, x1 - (1 - sigma_min) * x0


def matching_loss_reference(v_pred, x0, x1, sigma_min=1e-5, reduction="mean"):
    return velocity_loss_reference(v_pred, x1 - (1 - sigma_min) * x0, reduction)


def velocity_loss_reference(v_pred, v_target, reduction="mean"):
    per_sample = ((v_pred - v_target) ** 2).reshape(v_pred.shape[0], -1).mean(dim=1)
    return {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]


def euler_step_reference(x, v_cond, v_uncond=None, *, dt, guidance_scale=1.0):
    if v_uncond is None and v_cond.shape != x.shape:
        v_cond, v_uncond = v_cond.chunk(2)
    velocity = v_cond if v_uncond is None else v_uncond + guidance_scale * (v_cond - v_uncond)
    return x + dt * velocity


def sample_reference(velocity_fn, x0, grid, guidance_scale=1.0):
    """The eager Euler loop over a ``(t_i, dt_i)`` grid (see tokenflow_ext.flow.time_grid)."""
    x = x0.clone()
    t_dtype = accumulate_dtype(x.dtype)
    for t_value, dt in grid:
        t = torch.full((x.shape[0],), t_value, dtype=t_dtype, device=x.device)
        velocity = velocity_fn(x, t)
        v_cond, v_uncond = velocity if isinstance(velocity, tuple) else (velocity, None)
        x = euler_step_reference(x, v_cond, v_uncond, dt=dt, guidance_scale=guidance_scale)
    return x
