"""FlowTok training pieces: logit-normal timesteps and the flow-matching loss module."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..ops.flow_step import interpolate, velocity_loss


def logit_normal_timesteps(batch_size: int, *, mean: float = 0.0, std: float = 1.0, device=None,
                           dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None) -> torch.Tensor:
    """``t = sigmoid(n)``, ``n ~ N(mean, std^2)``: FlowTok's ``LogitNormalSampler`` (mean 0, std 1), shape ``(B,)``."""
    if std <= 0:
        raise ValueError(f"logit_normal_timesteps: std must be > 0, got {std}")
    normal = torch.randn(batch_size, device=device, dtype=dtype, generator=generator)
    return torch.sigmoid(normal * std + mean)


class FlowMatchingLoss(nn.Module):
    """The flow-matching objective of FlowTok, on the fused ops.

    ``loss = loss_fn(model, x0, x1)`` samples logit-normal ``t``, builds ``x_t`` and the target velocity with
    :func:`tokenflow_ext.flow.interpolate`, calls ``model(x_t, t, **model_kwargs)`` and returns
    :func:`tokenflow_ext.flow.velocity_loss` of its prediction against that target. Gradients reach ``x0``
    through ``x_t`` and through the (not detached) target, as in FlowTok, both in interpolate's one backward
    pass. The target is stored in the latents' dtype, so with bf16/fp16 latents the loss is taken against the
    rounded target (as FlowTok's eager ``x1 - (1 - sigma_min) * x0`` on such latents);
    :func:`tokenflow_ext.flow.matching_loss` recomputes it in fp32 instead. ``x1`` gets none unless
    ``x1_grad=True``: the image latents usually come from a frozen tokenizer. The null-indicator target roll of CFG training belongs
    to the data side, not to this module.
    """

    def __init__(self, sigma_min: float = 1e-5, reduction: str = "mean", *, x1_grad: bool = False,
                 timestep_mean: float = 0.0, timestep_std: float = 1.0):
        super().__init__()
        self.sigma_min = sigma_min
        self.reduction = reduction
        self.x1_grad = x1_grad
        self.timestep_mean = timestep_mean
        self.timestep_std = timestep_std

    def forward(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, x1: torch.Tensor,
                t: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
        if t is None:
            t = logit_normal_timesteps(x0.shape[0], mean=self.timestep_mean, std=self.timestep_std,
                                       device=x0.device)
        x_t, v_target = interpolate(x0, x1, t, self.sigma_min, x1_grad=self.x1_grad)
        v_pred = model(x_t, t, **model_kwargs)
        return velocity_loss(v_pred, v_target, self.reduction)

    def extra_repr(self) -> str:
        return f"sigma_min={self.sigma_min}, reduction={self.reduction!r}, x1_grad={self.x1_grad}"
