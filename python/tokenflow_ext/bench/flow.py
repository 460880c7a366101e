"""Benchmark cases of the flow_step family (PERF.md §5 C and D).

- ``flow train``: interpolate + matching loss, forward and backward (w.r.t. the prediction and x0), against
  the hand-written eager formula, ``torch.compile`` of it, and flow_matching's ``CondOTProbPath`` +
  ``mse_loss`` (where installed; its path has sigma_min = 0, so it is checked against ours at 0).
- ``flow step``: one CFG + Euler update with precomputed velocities (no network), stacked ``(2B, ...)`` or
  split layout, against eager (the diffusers pattern) and ``torch.compile``.
- ``flow loop``: a 20-step guided Euler loop with a velocity function that returns precomputed velocities,
  against the eager loop, torchdiffeq ``odeint(method="euler")`` and flow_matching ``ODESolver``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenflow_ext import flow
from tokenflow_ext.reference import euler_step_reference, interpolate_reference, matching_loss_reference

from .codebook import Row, _dtype_name
from .timing import peak_extra_memory, time_call

SIGMA = 1e-5


@dataclass
class FlowProblem:
    shape: tuple
    dtype: torch.dtype = torch.float32
    guidance_scale: float = 2.0
    layout: str = "stacked"  # or "split"
    steps: int = 20

    def label(self) -> str:
        return "x".join(str(s) for s in self.shape)

    def tensors(self, device: str, count: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(self.shape, generator=g).to(device=device, dtype=self.dtype) for _ in range(count)]


def _row(family, problem, device, baseline, ours, theirs, ours_peak, their_peak, ok, agreement, note=""):
    return Row(family=family, shape=problem.label(), dtype=_dtype_name(problem.dtype), device=device,
               baseline=baseline, baseline_ms=None if theirs is None else theirs.median_ms, ours_ms=ours.median_ms,
               baseline_peak=their_peak, ours_peak=ours_peak, agreement=agreement, ok=ok, note=note)


def _close(a, b, dtype) -> bool:
    tol = {torch.float32: 1e-4, torch.float64: 1e-9}.get(dtype, 3e-2)
    return torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)


def _eager_train(x0, x1, t, v_pred):
    x_t, _ = interpolate_reference(x0, x1, t, SIGMA)
    return x_t, matching_loss_reference(v_pred.float(), x0.float(), x1.float(), SIGMA)


def _fused_train(x0, x1, t, v_pred):
    x_t, _ = flow.interpolate(x0, x1, t, SIGMA)
    return x_t, flow.matching_loss(v_pred, x0, x1, SIGMA)


_compiled_train = None


def _flow_matching_train(x0, x1, t, v_pred):
    from flow_matching.path import CondOTProbPath  # noqa: PLC0415  (optional peer)

    sample = CondOTProbPath().sample(x_0=x0, x_1=x1, t=t.to(x0.dtype))
    return sample.x_t, F.mse_loss(v_pred.float(), sample.dx_t.float())


def run_flow_train_case(problem: FlowProblem, device: str, *, repeats: int = 5) -> list[Row]:
    global _compiled_train
    if _compiled_train is None:
        _compiled_train = torch.compile(_eager_train, dynamic=False)
    x0, x1, v_pred = problem.tensors(device, 3)
    t = torch.rand(problem.shape[0], generator=torch.Generator().manual_seed(1)).to(device)

    def step(fn):
        leaves = [v_pred.detach().requires_grad_(), x0.detach().requires_grad_()]
        x_t, loss = fn(leaves[1], x1, t, leaves[0])
        return loss, x_t, torch.autograd.grad(loss + x_t.float().mean(), leaves)

    ours_fn = lambda: step(_fused_train)  # noqa: E731
    ours_peak = peak_extra_memory(ours_fn, device)
    ours = time_call(ours_fn, device, repeats=repeats)
    loss, x_t, grads = ours_fn()
    baselines = [("eager", _eager_train), ("torch.compile", _compiled_train)]
    has_peer = importlib.util.find_spec("flow_matching") is not None
    rows = []
    for name, fn in baselines + ([("flow_matching", _flow_matching_train)] if has_peer else []):
        run = lambda fn=fn: step(fn)  # noqa: E731
        their_loss, their_xt, their_grads = run()
        if name == "flow_matching":  # CondOT path: sigma_min = 0; compare with ours at 0
            zero_xt, _ = flow.interpolate(x0, x1, t, 0.0)
            ok = _close(flow.matching_loss(v_pred, x0, x1, 0.0), their_loss, problem.dtype) and _close(
                zero_xt, their_xt, problem.dtype)
        else:
            ok = _close(loss, their_loss, problem.dtype) and _close(x_t, their_xt, problem.dtype) and all(
                _close(a, b, problem.dtype) for a, b in zip(grads, their_grads))
        rows.append(_row("flow train fwd+bwd", problem, device, name, ours, time_call(run, device, repeats=repeats),
                         ours_peak, peak_extra_memory(run, device), ok, "values match" if ok else "FAIL"))
    if not has_peer:
        rows.append(_row("flow train fwd+bwd", problem, device, "flow_matching", ours, None, ours_peak, None, True,
                         "-", note="flow_matching not installed"))
    return rows


def _velocities(problem: FlowProblem, device: str):
    x, v_cond, v_uncond = problem.tensors(device, 3, seed=2)
    stacked = torch.cat([v_cond, v_uncond])
    return x, v_cond, v_uncond, stacked


_compiled_steps = {}


def _eager_step_inplace(x, v_cond, v_uncond, *, dt, guidance_scale):
    if v_uncond is None and v_cond.shape != x.shape:
        v_cond, v_uncond = v_cond.chunk(2)
    velocity = v_cond if v_uncond is None else v_uncond + guidance_scale * (v_cond - v_uncond)
    return x.add_(velocity, alpha=dt)


def run_flow_step_case(problem: FlowProblem, device: str, *, repeats: int = 5) -> list[Row]:
    """One guided Euler update with precomputed velocities: out of place (a new x each call) and in place
    (what a sampling loop does; no output allocation), each against eager and torch.compile in the same form."""
    x, v_cond, v_uncond, stacked = _velocities(problem, device)
    dt, s = 1.0 / problem.steps, problem.guidance_scale
    args = (x, stacked, None) if problem.layout == "stacked" else (x, v_cond, v_uncond)
    if s == 1.0:
        args = (x, v_cond, None)
    layout = problem.layout if s != 1.0 else "plain"
    rows = []
    forms = [("", flow.euler_step, euler_step_reference), (" in place", flow.euler_step_, _eager_step_inplace)]
    for suffix, ours_op, eager_op in forms:
        inplace = bool(suffix)
        state = x.clone()
        call_args = lambda: (state, *args[1:]) if inplace else args  # noqa: E731
        ours_fn = lambda: ours_op(*call_args(), dt=dt, guidance_scale=s)  # noqa: E731
        expected = flow.euler_step(*args, dt=dt, guidance_scale=s)
        check = ours_op(*((x.clone(), *args[1:]) if inplace else args), dt=dt, guidance_scale=s)
        ours_ok = _close(check, expected, problem.dtype)
        ours = time_call(ours_fn, device, repeats=repeats)
        ours_peak = peak_extra_memory(ours_fn, device)
        compiled = _compiled_steps.setdefault(eager_op, torch.compile(eager_op, dynamic=False))
        for name, fn in [("eager", eager_op), ("torch.compile", compiled)]:
            their = fn(*((x.clone(), *args[1:]) if inplace else args), dt=dt, guidance_scale=s)
            ok = ours_ok and _close(their, expected, problem.dtype)
            run = lambda fn=fn: fn(*call_args(), dt=dt, guidance_scale=s)  # noqa: E731
            rows.append(_row(f"flow step s={s:g} {layout}{suffix}", problem, device, name, ours,
                             time_call(run, device, repeats=repeats), ours_peak, peak_extra_memory(run, device), ok,
                             "values match" if ok else "FAIL"))
    return rows


def run_flow_loop_case(problem: FlowProblem, device: str, *, repeats: int = 3) -> list[Row]:
    """A guided Euler loop of problem.steps steps; the velocity function returns precomputed velocities."""
    x0, v_cond, v_uncond, stacked = _velocities(problem, device)
    s, steps = problem.guidance_scale, problem.steps

    def model(x, t):
        return stacked  # one batched model call on [cond; uncond]

    grid = flow.time_grid(steps)
    ours_fn = lambda: flow.sample(model, x0, num_steps=steps, guidance_scale=s, progress=False)  # noqa: E731
    ours = time_call(ours_fn, device, repeats=repeats)
    ours_peak = peak_extra_memory(ours_fn, device)
    result = ours_fn()

    def eager_loop():
        x = x0.clone()
        for _, dt in grid:
            v_c, v_u = model(x, None).chunk(2)
            x = x + dt * (v_u + s * (v_c - v_u))
        return x

    def guided(t, x):
        v_c, v_u = model(x, t).chunk(2)
        return v_u + s * (v_c - v_u)

    baselines = [("eager loop", eager_loop)]
    if importlib.util.find_spec("torchdiffeq") is not None:
        from torchdiffeq import odeint  # noqa: PLC0415

        times = torch.linspace(0, 1, steps + 1, device=device, dtype=torch.float64 if x0.dtype == torch.float64 else
                               torch.float32)
        baselines.append(("torchdiffeq euler", lambda: odeint(guided, x0, times, method="euler")[-1]))
    if importlib.util.find_spec("flow_matching") is not None:
        from flow_matching.solver import ODESolver  # noqa: PLC0415

        solver = ODESolver(velocity_model=lambda x, t: guided(t, x))
        baselines.append(("flow_matching ODESolver", lambda: solver.sample(x_init=x0, step_size=1.0 / steps,
                                                                           method="euler")))
    rows = []
    family = f"flow loop {steps} steps s={s:g}"
    for name, run in baselines:
        ok = _close(result, run(), problem.dtype)
        rows.append(_row(family, problem, device, name, ours, time_call(run, device, repeats=repeats), ours_peak,
                         peak_extra_memory(run, device), ok, "values match" if ok else "FAIL"))
    for peer, name in [("torchdiffeq", "torchdiffeq euler"), ("flow_matching", "flow_matching ODESolver")]:
        if importlib.util.find_spec(peer) is None:
            rows.append(_row(family, problem, device, name, ours, None, ours_peak, None, True, "-",
                             note=f"{peer} not installed"))
    return rows
