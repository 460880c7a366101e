"""One TokenFlow tokenizer training step (generator + discriminator, LPIPS and teacher on, random weights):
ours vs the same loop with the official eager quantizer. Seconds per step; see
`python -m tokenflow_ext bench --full --families train` for steps/s and peak memory in one table.

    pytest benchmarks/bench_train.py --benchmark-group-by=group
"""

import pytest
from conftest import DEVICES

from tokenflow_ext.bench.timing import format_bytes, peak_extra_memory
from tokenflow_ext.bench.train import TrainStepProblem, train_step_factories

PROBLEMS = {"clipb_256": TrainStepProblem("clipb_256", 2), "siglip_384": TrainStepProblem("siglip_384", 1)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(PROBLEMS))
@pytest.mark.parametrize("impl", ["fused", "official-eager"])
def test_tokenizer_train_step(benchmark, device, config, impl):
    problem = PROBLEMS[config]
    step = train_step_factories(problem, device)[impl]()  # builds this trainer only
    step()  # warm-up (allocates the optimizer state)
    benchmark.extra_info["peak_extra_memory"] = format_bytes(peak_extra_memory(step, device))
    benchmark.group = f"tokenizer train step {problem.shape} {device}"
    benchmark.pedantic(step, rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info["steps_per_s"] = 1 / benchmark.stats.stats.median
