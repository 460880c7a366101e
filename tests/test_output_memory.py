"""The CPU kernels' output allocation (csrc/common/output_memory.h): a cache of freed blocks, huge-page advice."""

import os
import subprocess
import sys

import torch

from tokenflow_ext import flow

SHAPE = (64, 128, 64)  # 2 MiB per fp32 tensor: cached (>= 256 KiB)


def test_cached_outputs_never_alias_live_tensors():
    """Blocks go back to the cache only when their tensor dies: outputs kept alive keep their values while
    later calls of the same size allocate, free and reuse other blocks."""
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    kept, expected = [], []
    for step in range(12):
        t = torch.full((SHAPE[0],), step / 12)
        x_t, v_target = flow.interpolate(x0, x1, t)
        if step % 3 == 0:
            kept.append(x_t)
            expected.append(x_t.clone())
        del v_target  # freed at once: back to the cache, handed out to a later call
    pointers = {x.data_ptr() for x in kept}
    assert len(pointers) == len(kept)
    for x, want in zip(kept, expected):
        assert torch.equal(x, want)


def test_reuse_gives_the_same_values_as_fresh_memory():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(SHAPE, generator=g), torch.randn((2 * SHAPE[0], *SHAPE[1:]), generator=g)
    first = flow.euler_step(x, v, dt=0.1, guidance_scale=2.0)
    pointer, values = first.data_ptr(), first.clone()
    del first
    again = flow.euler_step(x, v, dt=0.1, guidance_scale=2.0)
    assert again.data_ptr() == pointer  # the freed block came back from the cache
    assert torch.equal(again, values)


def test_cache_and_huge_pages_can_be_turned_off():
    code = ("import torch; from tokenflow_ext import flow; x = torch.randn(64, 4096, 64); v = torch.randn(128, 4096, 64);"
            "a = flow.euler_step(x, v, dt=0.1, guidance_scale=2.0); "
            "b = x + 0.1 * (v[64:] + 2.0 * (v[:64] - v[64:])); print(float((a - b).abs().max()))")
    for env in ({"TOKENFLOW_EXT_CPU_CACHE_MB": "0"}, {"TOKENFLOW_EXT_HUGE_PAGES": "0"}, {"TOKENFLOW_EXT_CPU_CACHE_MB": "x"}):
        result = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        assert float(result.stdout.strip()) < 1e-5
