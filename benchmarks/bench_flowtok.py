"""FlowTok text -> image-latent sampling (FlowTok-B, random weights, batch 64, 20 Euler steps, CFG 2.0):
``FlowTok.generate`` (stacked cond/uncond forward, fused CFG + Euler step) vs the official solver's loop
(two forward passes per step, eager update). Minutes per call on a CPU.

    pytest benchmarks/bench_flowtok.py --benchmark-group-by=group
"""

import pytest
import torch
from conftest import DEVICES

from tokenflow_ext.bench.models import FlowTokSampleProblem, flowtok_sample_callables


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "official-eager"])
def test_flowtok_sampling(benchmark, device, impl):
    problem = FlowTokSampleProblem("B" if device == "cpu" else "XL", 64)
    callables = flowtok_sample_callables(problem, device)
    step = callables[impl]
    if impl == "official-eager":
        assert torch.allclose(step(), callables["fused"](), atol=1e-3)
    benchmark.group = f"flowtok sampling {problem.shape} {device}"
    benchmark.pedantic(step, rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info["images_per_s"] = problem.batch / benchmark.stats.stats.median
