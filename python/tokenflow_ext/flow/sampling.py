"""Euler sampling of a flow between text latents (t = 0) and image latents (t = 1), with CFG on the velocity."""

from __future__ import annotations

from typing import Callable, Union

import torch

from .._parts import accumulate_dtype
from ..ops.flow_step import euler_step_

TIME_GRIDS = ("uniform", "flowtok")
FLOWTOK_T_MAX = 1.0 - 1e-5

Velocity = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def time_grid(num_steps: int, kind: str = "uniform", *, reverse: bool = False) -> list[tuple[float, float]]:
    """The ``(t_i, dt_i)`` pairs of an Euler integration: evaluate the velocity at ``t_i``, step by ``dt_i``.

    - ``"uniform"`` (default): left endpoints ``t_i = i / N``, ``dt = 1 / N``. It lands exactly on t = 1.
    - ``"flowtok"``: FlowTok's official solver, for parity. It evaluates at ``linspace(0, 1 - 1e-5, N)``
      (float32, as the official code does) and steps ``(1 - 1e-5) / N``. Those evaluation times are not
      the left endpoints of the steps: the last one is at t = 0.99999.
    - ``reverse=True``: image → text, from t = 1 toward t = 0. It uses the mirrored times (``1 - i/N``, or
      ``linspace(1 - 1e-5, 0, N)``) and negative steps.
    """
    if num_steps < 1:
        raise ValueError(f"time_grid: num_steps must be >= 1, got {num_steps}")
    if kind == "uniform":
        times = [i / num_steps for i in range(num_steps)]
        step = 1.0 / num_steps
        if reverse:
            times = [1.0 - t for t in times]
    elif kind == "flowtok":
        start, end = (FLOWTOK_T_MAX, 0.0) if reverse else (0.0, FLOWTOK_T_MAX)
        times = torch.linspace(start, end, num_steps, dtype=torch.float32).tolist()
        step = FLOWTOK_T_MAX / num_steps
    else:
        raise ValueError(f"time_grid: kind must be one of {TIME_GRIDS}, got {kind!r}")
    return [(t, -step if reverse else step) for t in times]


def sample(velocity_fn: Callable[[torch.Tensor, torch.Tensor], Velocity], x0: torch.Tensor, *, num_steps: int = 20,
           guidance_scale: float = 2.0, time_grid: str = "uniform", reverse: bool = False,
           progress: bool = True) -> torch.Tensor:
    """Integrate ``dx/dt = v(x, t)`` with Euler steps, from text latents to image latents (or the reverse).

    Args:
        velocity_fn: ``velocity_fn(x, t)`` with ``x`` of shape ``(B, ...)`` and ``t`` of shape ``(B,)``
            (float32, or float64 for float64 ``x``). It returns ``v``; with ``guidance_scale != 1`` it
            returns a pair ``(v_cond, v_uncond)`` or one stacked ``(2B, ...)`` tensor ``[cond; uncond]``.
        x0: the starting latents, ``(B, ...)``, e.g. ``(B, 77, 16)`` text tokens. They are not modified.
        num_steps: the number of Euler steps (FlowTok: 20 for evaluation).
        guidance_scale: the CFG scale ``s``: ``v = v_u + s (v_c - v_u)``, computed in the fused step kernel.
        time_grid: ``"uniform"`` or ``"flowtok"`` (see :func:`time_grid`).
        reverse: integrate from t = 1 to t = 0 (image → text).
        progress: show a tqdm progress bar.

    Returns:
        The final latents, in the shape and dtype of ``x0``.
    """
    grid = _time_grid(num_steps, time_grid, reverse=reverse)
    x = x0.detach().clone()
    t_dtype = accumulate_dtype(x.dtype)
    steps = grid
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        steps = tqdm(grid, desc="flow sampling", leave=False)
    for t_value, dt in steps:
        t = torch.full((x.shape[0],), t_value, dtype=t_dtype, device=x.device)
        velocity = velocity_fn(x, t)
        v_cond, v_uncond = velocity if isinstance(velocity, tuple) else (velocity, None)
        euler_step_(x, v_cond, v_uncond, dt=dt, guidance_scale=guidance_scale)
    return x


_time_grid = time_grid
