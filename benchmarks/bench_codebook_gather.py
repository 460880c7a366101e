"""codebook_gather forward + backward vs torch indexing + autograd.

    pytest benchmarks/bench_codebook_gather.py --benchmark-group-by=group
"""

import pytest
import torch
from conftest import DEVICES

import tokenflow_ext
from tokenflow_ext.reference import codebook_gather_reference

N, K = 65536, 32768


def make_inputs(device, distribution):
    g = torch.Generator().manual_seed(0)
    semantic, pixel = torch.randn(K, 32, generator=g), torch.randn(K, 8, generator=g)
    if distribution == "uniform":
        indices = torch.randint(0, K, (N,), generator=g)
    elif distribution == "zipf":
        ranks = torch.arange(1, K + 1, dtype=torch.float64)
        indices = torch.multinomial(ranks.pow(-1.1), N, replacement=True, generator=g)
    else:
        indices = torch.zeros(N, dtype=torch.long)
    upstream = torch.randn(N, 40, generator=g)
    return [t.to(device) for t in (semantic, pixel, indices, upstream)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("distribution", ["uniform", "zipf", "all-same"])
@pytest.mark.parametrize("impl", ["fused", "fused-atomic", "eager"])
def test_codebook_gather_forward_backward(benchmark, device, distribution, impl):
    if impl == "fused-atomic" and device == "cpu":
        pytest.skip("the CPU backward is always deterministic")
    semantic, pixel, indices, upstream = make_inputs(device, distribution)

    def gather(a, b):
        if impl == "eager":
            return codebook_gather_reference(indices, a, b)
        return tokenflow_ext.codebook_gather(indices, a, b, deterministic=impl == "fused")

    def step():
        leaves = [semantic.detach().requires_grad_(), pixel.detach().requires_grad_()]
        rows = gather(*leaves)
        return rows, torch.autograd.grad(rows, leaves, upstream)

    rows, grads = step()
    ref_leaves = [semantic.detach().requires_grad_(), pixel.detach().requires_grad_()]
    ref_rows = codebook_gather_reference(indices, *ref_leaves)
    torch.testing.assert_close(rows, ref_rows, atol=1e-5, rtol=1e-5)
    for grad, expected in zip(grads, torch.autograd.grad(ref_rows, ref_leaves, upstream)):
        torch.testing.assert_close(grad, expected, atol=1e-3, rtol=1e-4)
    benchmark.group = f"codebook_gather fwd+bwd N={N} K={K} {distribution} {device}"
    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
