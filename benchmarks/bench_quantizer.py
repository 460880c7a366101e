"""TokenFlow's multi-scale quantizer, forward + backward, on one training batch: the fused modules vs the
official eager formulation (N x K distances, one-hot, entropy softmax, d_norm logging), B=8, siglip scales
(2227 tokens per image), K=32768.

    pytest benchmarks/bench_quantizer.py --benchmark-group-by=group
"""

import pytest
import torch
from conftest import DEVICES

from tokenflow_ext.bench.codebook import MultiScaleProblem, multiscale_step_callables
from tokenflow_ext.bench.timing import format_bytes, peak_extra_memory


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "official-eager"])
def test_multiscale_quantizer_train_step(benchmark, device, impl):
    problem = MultiScaleProblem()
    callables = multiscale_step_callables(problem, device)
    step = callables[impl]
    if impl == "official-eager":  # indices agree before timing
        assert torch.equal(step(), callables["fused"]())
    benchmark.extra_info["peak_extra_memory"] = format_bytes(peak_extra_memory(step, device))
    benchmark.group = f"multi-scale quantizer fwd+bwd {problem.shape} {device}"
    benchmark.pedantic(step, rounds=1 if impl == "official-eager" else 3, warmup_rounds=1, iterations=1)
