"""The pieces of `python -m tokenflow_ext verify-gpu` that run without a GPU: every CUDA parity case (including
the GPU-only sizes) runs and passes its reference checks with the CPU ops, and the command refuses cleanly."""

import subprocess
import sys

import pytest
import torch

from tokenflow_ext.testing.cuda_parity import CASES, run_case
from tokenflow_ext.verify_gpu import gpu_slug


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_parity_case_passes_with_the_cpu_ops(case):
    # The CPU op against itself must be exact, so what is checked here is the case's reference comparison.
    assert run_case(case, "cpu", torch.ops.tokenflow_ext) == []


def test_gpu_slug():
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_verify_gpu_without_a_gpu_says_so():
    result = subprocess.run([sys.executable, "-m", "tokenflow_ext", "verify-gpu"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "no CUDA GPU" in result.stderr
