"""The emulator can fail: its header reports broken barriers and launches, a kernel with a barrier removed is
caught by the parity cases, and a device-side assert ends the process as it ends a CUDA context."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import emu_build
from tokenflow_ext.testing.cuda_parity import CASES, run_case

SANITIZER = os.environ.get("TFX_EMU_SANITIZE") or None
STAGING_BARRIER = "      __syncthreads();\n#pragma unroll\n      for (int d = 0; d < kDepthChunk; ++d) {"


@pytest.fixture(scope="module")
def selftest_output(tmp_path_factory, emu_library):  # emu_library: skips where g++ is missing
    binary = tmp_path_factory.mktemp("selftest") / "selftest"
    subprocess.run(["g++", "-std=c++20", "-pthread", *emu_build.SANITIZER_FLAGS[SANITIZER],
                    f"-I{emu_build.EMU_DIR / 'include'}",
                    str(emu_build.EMU_DIR / "selftest.cpp"), "-o", str(binary)], check=True,
                   env=emu_build.build_env())
    result = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300, env=emu_build.build_env())
    return result.stdout + result.stderr


def test_header_runs_a_correct_block_reduction(selftest_output):
    assert "block_sum = 1000 (expect 1000), error: ''" in selftest_output


def test_header_reports_a_divergent_syncthreads(selftest_output):
    assert "divergent_sync error: 'divergent __syncthreads" in selftest_output


def test_header_reports_a_full_mask_shuffle_after_lanes_exited(selftest_output):
    assert "early_exit_shuffle error: 'a thread exited while others wait" in selftest_output or \
        "early_exit_shuffle error: '__shfl_sync" in selftest_output


def test_header_rejects_an_invalid_grid(selftest_output):
    assert "gridDim.y = 70000 error: 'invalid configuration" in selftest_output


@pytest.mark.skipif(SANITIZER is not None, reason="the mutant races on purpose; the sanitizer passes must stay clean")
def test_search_kernel_without_its_staging_barrier_is_caught(emu_ops):
    source = (emu_build.CSRC / "cuda" / "codebook_search_cuda.cu").read_text()
    assert source.count(STAGING_BARRIER) == 1, "the staging barrier of search_tiles_kernel moved: update this test"
    mutant = emu_build.CACHE / "mutants" / "codebook_search_no_staging_barrier.cu"
    mutant.parent.mkdir(parents=True, exist_ok=True)
    mutant.write_text(source.replace(STAGING_BARRIER, STAGING_BARRIER.replace("__syncthreads();", ";"), 1))
    library = emu_build.build(namespace="tokenflow_ext_emu_mutant", cu_files=[mutant],
                              schema_files=[emu_build.CSRC / "codebook_search.cpp"])
    torch.ops.load_library(str(library))
    search_cases = [case for case in CASES if case.emulate and case.name.startswith("codebook_search N=")]
    failed = [case.name for case in search_cases if run_case(case, "cpu", torch.ops.tokenflow_ext_emu_mutant)]
    # Without the barrier, threads read staging slots that others have not written yet.
    assert len(failed) >= len(search_cases) // 2, f"only {failed} of {len(search_cases)} search cases caught it"


def test_out_of_range_gather_index_fires_a_device_assert(emu_library):
    library = str(emu_library)
    script = (f"import torch, tokenflow_ext; torch.ops.load_library({library!r}); "
              "torch.ops.tokenflow_ext_emu.codebook_gather(torch.tensor([0, 7]), torch.randn(5, 4), None, True, False)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "index out of range" in result.stderr


@pytest.mark.cuda
def test_out_of_range_gather_index_on_a_gpu_ends_the_process_with_a_device_assert():
    script = ("import torch, tokenflow_ext; "
              "s = torch.randn(5, 4, device='cuda'); "
              "tokenflow_ext.codebook_gather(torch.tensor([0, 7], device='cuda'), s); torch.cuda.synchronize()")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "device-side assert" in result.stderr or "index out of range" in result.stderr
