"""Benchmark cases of the flow_step family (FlowTok training and sampling shapes).

- ``flow train``: interpolate + the loss on its stored target (``velocity_loss``), forward and backward (w.r.t.
  the prediction and x0), against the hand-written eager formula, ``torch.compile`` of it, and flow_matching's
  ``CondOTProbPath`` + ``mse_loss`` (where installed; its path has sigma_min = 0, so it is checked against ours
  at 0).
- ``flow step``: one CFG + Euler update with precomputed velocities (no network), stacked ``(2B, ...)`` or
  split layout, out of place and in place, against eager (the diffusers pattern) and ``torch.compile``.
- ``flow loop``: a guided Euler loop whose velocity function returns precomputed velocities, against the
  eager loop, torchdiffeq ``odeint(method="euler")`` and flow_matching ``ODESolver`` (where installed).

The ``*_callables`` factories give every implementation as a zero-argument callable, with "fused" first;
the CLI cases and ``benchmarks/bench_flow_step.py`` both time those.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from tokenflow_ext import flow
from tokenflow_ext.reference import euler_step_reference, interpolate_reference, matching_loss_reference

from .rows import Row, compare_implementations, compile_once

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


def has_peer(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def close(a, b, dtype) -> bool:
    tol = {torch.float32: 1e-4, torch.float64: 1e-9}.get(dtype, 3e-2)
    return torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)


# ---- training: interpolate + loss, forward and backward ----------------------------------------------

def _eager_train(x0, x1, t, v_pred):
    x_t, _ = interpolate_reference(x0, x1, t, SIGMA)
    return x_t, matching_loss_reference(v_pred.float(), x0.float(), x1.float(), SIGMA)


def _fused_train(x0, x1, t, v_pred, sigma_min=SIGMA):
    # the target's gradient goes back through interpolate, which gives x0 its whole gradient in one pass
    x_t, v_target = flow.interpolate(x0, x1, t, sigma_min)
    return x_t, flow.velocity_loss(v_pred, v_target)


def _flow_matching_train(x0, x1, t, v_pred):
    from flow_matching.path import CondOTProbPath  # noqa: PLC0415  (optional peer)

    sample = CondOTProbPath().sample(x_0=x0, x_1=x1, t=t.to(x0.dtype))
    return sample.x_t, F.mse_loss(v_pred.float(), sample.dx_t.float())


def train_callables(problem: FlowProblem, device: str) -> dict[str, Callable]:
    """name -> callable returning (loss, x_t, (grad v_pred, grad x0)); "flow_matching" uses sigma_min = 0."""
    x0, x1, v_pred = problem.tensors(device, 3)
    t = torch.rand(problem.shape[0], generator=torch.Generator().manual_seed(1)).to(device)

    def step(fn):
        leaves = [v_pred.detach().requires_grad_(), x0.detach().requires_grad_()]
        x_t, loss = fn(leaves[1], x1, t, leaves[0])
        return loss, x_t, torch.autograd.grad(loss + x_t.float().mean(), leaves)

    # "ours under torch.compile": our ops inside a compiled region (fullgraph) must cost no more than ours eager
    fns = {"fused": _fused_train, "eager": _eager_train, "torch.compile": compile_once(_eager_train),
           "ours under torch.compile": compile_once(_fused_train, fullgraph=True)}
    if has_peer("flow_matching"):
        fns["flow_matching"] = _flow_matching_train
    callables = {name: (lambda fn=fn: step(fn)) for name, fn in fns.items()}
    callables["fused at sigma_min=0"] = lambda: step(lambda a, b, tt, v: _fused_train(a, b, tt, v, 0.0))
    return callables


# ---- one CFG + Euler step -------------------------------------------------------------------------------

def _eager_step_inplace(x, v_cond, v_uncond, *, dt, guidance_scale):
    if v_uncond is None and v_cond.shape != x.shape:
        v_cond, v_uncond = v_cond.chunk(2)
    velocity = v_cond if v_uncond is None else v_uncond + guidance_scale * (v_cond - v_uncond)
    return x.add_(velocity, alpha=dt)


def _one_step_inputs(problem: FlowProblem, device: str):
    """(x, v_cond, v_uncond) of the step problem in its layout (stacked: v_cond is (2B, ...), v_uncond None)."""
    x, v_cond, v_uncond = problem.tensors(device, 3, seed=2)
    if problem.guidance_scale == 1.0:
        return x, v_cond, None
    if problem.layout == "stacked":
        return x, torch.cat([v_cond, v_uncond]), None
    return x, v_cond, v_uncond


def step_callables(problem: FlowProblem, device: str, *, inplace: bool) -> dict[str, Callable]:
    """name -> callable returning the updated x (in place: the same state tensor is updated every call)."""
    x, *velocities = _one_step_inputs(problem, device)
    dt, s = 1.0 / problem.steps, problem.guidance_scale
    ours, eager = (flow.euler_step_, _eager_step_inplace) if inplace else (flow.euler_step, euler_step_reference)
    implementations = {"fused": ours, "eager": eager, "torch.compile": compile_once(eager)}
    # in place: each implementation updates its own copy of x, call after call
    states = {name: x.clone() if inplace else x for name in implementations}
    return {name: (lambda fn=fn, state=states[name]: fn(state, *velocities, dt=dt, guidance_scale=s))
            for name, fn in implementations.items()}


# ---- a guided Euler loop ---------------------------------------------------------------------------------

def loop_callables(problem: FlowProblem, device: str) -> dict[str, Callable]:
    """name -> callable returning the final x of a problem.steps-step guided Euler loop from the same x0."""
    x0, v_cond, v_uncond = problem.tensors(device, 3, seed=2)
    stacked = torch.cat([v_cond, v_uncond])
    s, steps = problem.guidance_scale, problem.steps

    def model(x, t):
        return stacked  # one batched model call on [cond; uncond]

    def guided(t, x):
        v_c, v_u = model(x, t).chunk(2)
        return v_u + s * (v_c - v_u)

    def eager_loop():
        x = x0.clone()
        for _, dt in flow.time_grid(steps):
            x = x + dt * guided(None, x)
        return x

    callables = {
        "fused": lambda: flow.sample(model, x0, num_steps=steps, guidance_scale=s, progress=False),
        "eager loop": eager_loop,
    }
    if has_peer("torchdiffeq"):
        from torchdiffeq import odeint  # noqa: PLC0415

        times = torch.linspace(0, 1, steps + 1, device=device)
        callables["torchdiffeq euler"] = lambda: odeint(guided, x0, times.to(x0.dtype), method="euler")[-1]
    if has_peer("flow_matching"):
        from flow_matching.solver import ODESolver  # noqa: PLC0415

        solver = ODESolver(velocity_model=lambda x, t: guided(t, x))
        callables["flow_matching ODESolver"] = lambda: solver.sample(x_init=x0, step_size=1.0 / steps, method="euler")
    return callables


# ---- CLI cases -------------------------------------------------------------------------------------------

def _rows(family: str, problem: FlowProblem, device: str, callables: dict, check: Callable, repeats: int,
          missing: tuple = ()) -> list[Row]:
    """compare_implementations with a boolean check; (peer, baseline name) pairs name optional peers, which get
    a "not installed" row when absent."""
    def checked(ours, name, theirs):
        ok = check(ours, name, theirs)
        return ok, "values match" if ok else "FAIL"

    absent = {name: f"{peer} not installed" for peer, name in missing if not has_peer(peer)}
    return compare_implementations(family, problem.label(), problem.dtype, device, {**callables, **absent}, checked,
                                   repeats=repeats)


def run_flow_train_case(problem: FlowProblem, device: str, *, repeats: int = 5) -> list[Row]:
    callables = train_callables(problem, device)
    at_zero = callables["fused at sigma_min=0"]()

    def check(ours, name, theirs):
        expected = at_zero if name == "flow_matching" else ours
        values = [(expected[0], theirs[0]), (expected[1], theirs[1])]
        if name != "flow_matching":
            values += list(zip(ours[2], theirs[2]))
        return all(close(a, b, problem.dtype) for a, b in values)

    return _rows("flow train fwd+bwd", problem, device, callables, check, repeats,
                 missing=(("flow_matching", "flow_matching"),))


def run_flow_step_case(problem: FlowProblem, device: str, *, repeats: int = 5) -> list[Row]:
    layout = problem.layout if problem.guidance_scale != 1.0 else "plain"
    rows = []
    for inplace in (False, True):
        callables = step_callables(problem, device, inplace=inplace)
        # A fresh set: the first call of each entry is exactly one step from x (in place too).
        one_step = step_callables(problem, device, inplace=inplace)
        expected = euler_step_reference(*_one_step_inputs(problem, device), dt=1.0 / problem.steps,
                                        guidance_scale=problem.guidance_scale)
        ours_ok = close(one_step["fused"](), expected, problem.dtype)
        check = lambda ours, name, theirs: ours_ok and close(one_step[name](), expected, problem.dtype)  # noqa: E731
        family = f"flow step s={problem.guidance_scale:g} {layout}" + (" in place" if inplace else "")
        rows += _rows(family, problem, device, callables, check, repeats)
    return rows


def run_flow_loop_case(problem: FlowProblem, device: str, *, repeats: int = 3) -> list[Row]:
    check = lambda ours, name, theirs: close(ours, theirs, problem.dtype)  # noqa: E731
    return _rows(f"flow loop {problem.steps} steps s={problem.guidance_scale:g}", problem, device,
                 loop_callables(problem, device), check, repeats,
                 missing=(("torchdiffeq", "torchdiffeq euler"), ("flow_matching", "flow_matching ODESolver")))
