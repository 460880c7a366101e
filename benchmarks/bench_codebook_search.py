"""codebook_search: fused vs the official eager formula, lean addmm+argmin, torch.compile and faiss-cpu.

    pytest benchmarks/bench_codebook_search.py --benchmark-group-by=group

Each implementation is checked against the fused indices (near-tie rule) before it is timed; the peak
extra memory of one call is stored in extra_info. The table groups by problem size; pytest-benchmark's
parenthesised factors are the ratios against the fastest in the group.
"""

import pytest
import torch
from conftest import DEVICES

import tokenflow_ext
from tokenflow_ext.bench.codebook import CodebookProblem, search_baselines
from tokenflow_ext.bench.timing import format_bytes, peak_extra_memory
from tokenflow_ext.reference import index_agreement

PROBLEMS = [CodebookProblem(8192, 16384), CodebookProblem(2048, 32768, pixel_weight=1.0)]
IMPLEMENTATIONS = ["fused", "official-eager", "lean-eager", "torch.compile", "faiss-cpu"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.shape.replace(" ", "_"))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_codebook_search(benchmark, device, problem, impl):
    x, semantic, pixel = problem.tensors(device)
    w = problem.pixel_weight
    fused = lambda: tokenflow_ext.codebook_search(x, semantic, pixel, pixel_weight=w)[0]  # noqa: E731
    if impl == "fused":
        run = fused
    else:
        baseline = {b.name: b for b in search_baselines(device)}.get(impl)
        if baseline is None or baseline.missing:
            pytest.skip(f"{impl}: {'not a baseline on ' + device if baseline is None else baseline.missing}")
        run = baseline.make(x, semantic, pixel, w)
        exact, gap, ok = index_agreement(x, semantic, pixel, fused(), run(), pixel_weight=w)
        assert ok, f"{impl} disagrees with the fused search beyond near-ties (gap {gap})"
        benchmark.extra_info["index_agreement"] = exact
    benchmark.group = f"codebook_search {problem.shape} {device}"
    peak = peak_extra_memory(run, device)
    benchmark.extra_info["peak_extra_memory"] = format_bytes(peak)
    rounds = 1 if impl == "official-eager" else 5
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
def test_codebook_search_memory_at_65536x32768(benchmark, device):
    """N=65536, K=32768: the fused search needs O((N + K) D) memory; eager needs 8 GiB per N x K matrix."""
    problem = CodebookProblem(65536, 32768)
    x, semantic, pixel = problem.tensors(device)
    run = lambda: tokenflow_ext.codebook_search(x, semantic, pixel, pixel_weight=problem.pixel_weight)  # noqa: E731
    peak = peak_extra_memory(run, device)
    benchmark.group = f"codebook_search {problem.shape} {device} (memory)"
    benchmark.extra_info["peak_extra_memory"] = format_bytes(peak)
    benchmark.extra_info["eager_nk_matrix"] = format_bytes(problem.nk_bytes())
    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    assert peak is None or peak < 256 * 2**20, f"fused search used {format_bytes(peak)} extra"
    assert torch.is_tensor(run()[0])
