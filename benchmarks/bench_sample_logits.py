"""sample_logits and the t2i sampling loop (issue 13, part 6).

    pytest benchmarks/bench_sample_logits.py --benchmark-group-by=group
    pytest benchmarks/bench_sample_logits.py -k loop --benchmark-group-by=group   # minutes on a CPU

- The fused op vs the official per-scale draw (CFG mix, text ids to -inf, ``sample_with_top_k_top_p_``) on
  ``(2B, n, 64769)`` float32 logits (32768 image ids after 32001 text ids), for the loop1 and loop3 presets.
- The t2i sampling loop on a small random-weight model with the real 817-code schedule: the KV-cached loop
  (official sampling ops, or the fused sampler) vs the official-style no-cache recompute loop.

Every implementation is checked before it is timed: fused codes inside the official kept set; the cached
loop's codes against the official loop's.
"""

import pytest
import torch
from conftest import DEVICES

from tokenflow_ext.bench.t2i import (SampleOpProblem, T2IProblem, sample_op_callables, sample_op_inputs,
                                     t2i_callables)
from tokenflow_ext.reference import sample_logits_filter_reference

PRESETS = [(600, 0.6), (1200, 0.8), (100, 0.8), (1, 0.0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"k{p[0]}-p{p[1]:g}")
@pytest.mark.parametrize("impl", ["fused", "official"])
def test_sample_logits_vs_official(benchmark, device, preset, impl):
    problem = SampleOpProblem(positions=16, top_k=preset[0], top_p=preset[1])
    run = sample_op_callables(problem, device)[impl]
    kept, _ = sample_logits_filter_reference(sample_op_inputs(problem, device), guidance=problem.guidance,
                                             top_k=problem.top_k, top_p=problem.top_p,
                                             image_token_start=problem.image_token_start, image_vocab_size=32768)
    codes = run()
    assert kept.gather(-1, codes.unsqueeze(-1)).all()
    benchmark.group = f"t2i draw {problem.shape} {device}"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("refinement", ["loop1", "loop3"])
@pytest.mark.parametrize("impl", ["cached-fused", "cached", "official-eager"])
def test_t2i_sampling_loop(benchmark, device, refinement, impl):
    problem = T2IProblem(refinement=refinement)
    callables = t2i_callables(problem, device)
    run = callables[impl]
    codes = run()
    assert codes.shape == (problem.batch, 817) and codes.min() >= 0 and codes.max() < 32768
    benchmark.group = f"t2i sampling {problem.shape} {device}"
    benchmark.extra_info["images"] = problem.batch
    benchmark.extra_info["tokens"] = problem.batch * 817
    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
