"""Flow matching for FlowTok: fused training ops, timestep sampling, the loss module and the Euler sampler.

    from tokenflow_ext import flow
    x_t, v_target = flow.interpolate(x0, x1, t, sigma_min=1e-5)
    loss = flow.velocity_loss(v_pred, v_target, reduction="mean")  # or, target recomputed:
    loss = flow.matching_loss(v_pred, x0, x1, sigma_min=1e-5, reduction="mean")
    x_next = flow.euler_step(x, v_cond, v_uncond=None, dt=0.05, guidance_scale=1.0)
    flow.euler_step_(x, v_cond, v_uncond, dt=0.05, guidance_scale=2.0)
    x1 = flow.sample(velocity_fn, x0, num_steps=20, guidance_scale=2.0, time_grid="uniform")
    x1 = flow.GraphedSampler(velocity_fn, x0, num_steps=20, guidance_scale=2.0)(x0)  # CUDA: one graph replay
"""

from ..ops.flow_step import euler_step, euler_step_, interpolate, matching_loss, velocity_loss
from .sampling import TIME_GRIDS, GraphedSampler, sample, time_grid
from .training import FlowMatchingLoss, logit_normal_timesteps

__all__ = [
    "FlowMatchingLoss",
    "GraphedSampler",
    "TIME_GRIDS",
    "euler_step",
    "euler_step_",
    "interpolate",
    "logit_normal_timesteps",
    "matching_loss",
    "sample",
    "time_grid",
    "velocity_loss",
]
