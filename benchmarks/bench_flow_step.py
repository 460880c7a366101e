"""flow_step: the fused training step, CFG + Euler step and sampling loop vs eager, torch.compile and peers.

    pytest benchmarks/bench_flow_step.py --benchmark-group-by=group

Shapes: FlowTok's [256, 77, 16] and the bandwidth-bound [64, 4096, 64]; fp32 and bf16, as the bench CLI grid.
Every implementation is checked against the fused one before it is timed.
"""

import pytest
import torch
from conftest import DEVICES

from tokenflow_ext.bench.flow import FlowProblem, close, loop_callables, step_callables, train_callables

SHAPES = [(256, 77, 16), (64, 4096, 64)]
DTYPES = [torch.float32, torch.bfloat16]
ids = lambda value: "x".join(map(str, value)) if isinstance(value, tuple) else str(value).replace("torch.", "")  # noqa: E731


def pick(callables, impl):
    if impl not in callables:
        pytest.skip(f"{impl} is not installed")
    return callables[impl]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("impl", ["fused", "eager", "torch.compile", "flow_matching"])
def test_flow_train_step(benchmark, device, shape, dtype, impl):
    problem = FlowProblem(shape, dtype)
    callables = train_callables(problem, device)
    run = pick(callables, impl)
    reference = callables["fused at sigma_min=0" if impl == "flow_matching" else "fused"]()
    assert close(run()[0], reference[0], dtype)
    benchmark.group = f"flow train fwd+bwd {ids(shape)} {ids(dtype)} {device}"
    benchmark.pedantic(run, rounds=10 if shape == SHAPES[0] else 3, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("layout", ["stacked", "split"])
@pytest.mark.parametrize("impl", ["fused", "eager", "torch.compile"])
def test_flow_euler_step_in_place(benchmark, device, shape, dtype, layout, impl):
    problem = FlowProblem(shape, dtype, layout=layout)
    expected = step_callables(problem, device, inplace=False)["fused"]()
    assert close(step_callables(problem, device, inplace=True)[impl](), expected, dtype)
    run = step_callables(problem, device, inplace=True)[impl]
    benchmark.group = f"flow CFG+Euler step in place {ids(shape)} {ids(dtype)} {layout} {device}"
    benchmark.pedantic(run, rounds=20 if shape == SHAPES[0] else 5, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("steps", [20, 50])
@pytest.mark.parametrize("impl", ["fused", "eager loop", "torchdiffeq euler", "flow_matching ODESolver"])
def test_flow_sampling_loop(benchmark, device, shape, steps, impl):
    problem = FlowProblem(shape, steps=steps)
    callables = loop_callables(problem, device)
    run = pick(callables, impl)
    assert close(run(), callables["fused"](), problem.dtype)
    benchmark.group = f"flow loop {steps} steps s=2 {ids(shape)} float32 {device}"
    benchmark.pedantic(run, rounds=5 if shape == SHAPES[0] else 2, warmup_rounds=1, iterations=1)
