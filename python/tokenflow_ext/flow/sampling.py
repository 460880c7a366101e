"""Euler sampling of a flow between text latents (t = 0) and image latents (t = 1), with CFG on the velocity."""

from __future__ import annotations

import contextlib
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
    steps = grid
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        steps = tqdm(grid, desc="flow sampling", leave=False)
    return _euler_loop(velocity_fn, x0, steps, guidance_scale)


def _euler_loop(velocity_fn, x0: torch.Tensor, steps, guidance_scale: float) -> torch.Tensor:
    x = x0.detach().clone()
    t_dtype = accumulate_dtype(x.dtype)
    for t_value, dt in steps:
        t = torch.full((x.shape[0],), t_value, dtype=t_dtype, device=x.device)
        velocity = velocity_fn(x, t)
        v_cond, v_uncond = velocity if isinstance(velocity, tuple) else (velocity, None)
        euler_step_(x, v_cond, v_uncond, dt=dt, guidance_scale=guidance_scale)
    return x


class GraphedSampler:
    """:func:`sample` for one fixed input shape, captured once as a CUDA graph and replayed per call.

    Every step of the loop (the velocity function's kernels, the fused CFG + Euler step) is recorded on the
    first construction; a call copies ``x0`` into the graph's input, replays all ``num_steps`` steps with one
    launch and returns a copy of the result. That removes the per-kernel launch and Python cost of the loop,
    which dominates small batches on a GPU. The velocity function must be capturable: no host synchronisation
    (``.item()``, ``.cpu()``, data-dependent shapes) and no randomness. It reads the tensors it closes over
    (e.g. model weights) in place on every replay, so updating them in place is seen; reallocating them is
    not. An enclosing ``torch.autocast`` region at construction is baked into the graph. The graph keeps its
    own memory pool until the sampler is dropped.

    ::

        sampler = GraphedSampler(velocity_fn, x0, num_steps=20, guidance_scale=2.0, time_grid="flowtok")
        x1 = sampler(x0)          # same shape, dtype and device as the example
    """

    def __init__(self, velocity_fn: Callable[[torch.Tensor, torch.Tensor], Velocity], example_x0: torch.Tensor, *,
                 num_steps: int = 20, guidance_scale: float = 2.0, time_grid: str = "uniform",
                 reverse: bool = False, warmup_runs: int = 1):
        if not isinstance(example_x0, torch.Tensor) or example_x0.device.type != "cuda":
            raise ValueError("GraphedSampler: example_x0 must be a CUDA tensor (CUDA graphs need a GPU), got "
                             + (str(example_x0.device) if isinstance(example_x0, torch.Tensor)
                                else type(example_x0).__name__))
        if warmup_runs < 1:
            raise ValueError(f"GraphedSampler: warmup_runs must be >= 1, got {warmup_runs}")
        grid = _time_grid(num_steps, time_grid, reverse=reverse)
        self.shape, self.dtype, self.device = example_x0.shape, example_x0.dtype, example_x0.device
        with torch.inference_mode(False):  # a normal tensor: calls inside and outside inference mode copy into it
            self._input = example_x0.detach().clone()
        # no autograd graph is recorded (sampling never needs one); no autocast cast cache (a cast weight cached
        # by an enclosing autocast region would be freed under the graph); warm-up on a side stream, as
        # torch.cuda.graphs asks: lazy cuBLAS handles, workspaces and the allocator's first blocks stay out
        with torch.no_grad(), torch.cuda.device(self.device), _autocast_cache_off():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(warmup_runs):
                    _euler_loop(velocity_fn, self._input, grid, guidance_scale)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._output = _euler_loop(velocity_fn, self._input, grid, guidance_scale)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if not isinstance(x0, torch.Tensor) or (x0.shape, x0.dtype, x0.device) != (self.shape, self.dtype, self.device):
            got = (f"{tuple(x0.shape)} {x0.dtype} on {x0.device}" if isinstance(x0, torch.Tensor)
                   else type(x0).__name__)
            raise ValueError(f"GraphedSampler: x0 must be {tuple(self.shape)} {self.dtype} on {self.device} (the "
                             f"captured shape), got {got}")
        with torch.no_grad(), torch.cuda.device(self.device):
            self._input.copy_(x0)
            self._graph.replay()
            return self._output.clone()


@contextlib.contextmanager
def _autocast_cache_off():
    enabled = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(enabled)


_time_grid = time_grid
