"""TokenFlow tokenizer encode (eval, batch 8, full official size, random weights): ours vs the same model
with the official eager quantizer. Seconds per call on a CPU; see `python -m tokenflow_ext bench --full`
for images/s and peak memory in one table.

    pytest benchmarks/bench_tokenizer.py --benchmark-group-by=group
"""

import pytest
import torch
from conftest import DEVICES

from tokenflow_ext.bench.models import TokenizerProblem, tokenizer_encode_callables
from tokenflow_ext.bench.timing import format_bytes, peak_extra_memory

PROBLEMS = {"clipb_256": TokenizerProblem("clipb_256", enhanced_decoder=True), "siglip_384": TokenizerProblem("siglip_384")}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(PROBLEMS))
@pytest.mark.parametrize("impl", ["fused", "official-eager"])
def test_tokenizer_encode(benchmark, device, config, impl):
    problem = PROBLEMS[config]
    callables = tokenizer_encode_callables(problem, device)
    step = callables[impl]
    if impl == "official-eager":
        assert torch.equal(step(), callables["fused"]())
    benchmark.extra_info["peak_extra_memory"] = format_bytes(peak_extra_memory(step, device))
    benchmark.group = f"tokenizer encode {problem.shape} {device}"
    benchmark.pedantic(step, rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info["images_per_s"] = problem.batch / benchmark.stats.stats.median
