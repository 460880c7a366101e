"""Every CUDA op and mode, executed by the emulator, against the CPU op and the plain-PyTorch reference.

The cases live in ``tokenflow_ext.testing.cuda_parity`` so that ``python -m tokenflow_ext verify-gpu`` runs the
same shapes on a real GPU.
"""

import pytest

from tokenflow_ext.testing.cuda_parity import CASES, run_case

EMULATED = [case for case in CASES if case.emulate]


@pytest.mark.parametrize("case", EMULATED, ids=[case.name for case in EMULATED])
def test_emulated_cuda_matches_cpu(case, emu_ops):
    problems = run_case(case, "cpu", emu_ops)
    assert not problems, f"{case.name}:\n" + "\n".join(problems)
