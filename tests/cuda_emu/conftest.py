"""Fixtures of the emulated CUDA tests: the emulation library, built once per test run (cached on disk).

``TFX_EMU_SANITIZE=address|thread`` selects an instrumented build; the Python process must then have been
started with the sanitizer's runtime preloaded (``.ci/run`` does this), since an instrumented library cannot
be loaded otherwise.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emu_build  # noqa: E402

# Two emulated SMs: the search's launch plan then splits K across blocks for N <= 256 and not for N >= 512, so
# small shapes cover both paths. Read by the emulated cudaDeviceGetAttribute, before the first launch.
os.environ.setdefault("TFX_EMU_SM_COUNT", "2")

SANITIZER = os.environ.get("TFX_EMU_SANITIZE") or None


@pytest.fixture(scope="session")
def emu_library() -> Path:
    """The emulation library, built (or found in the cache) and loaded into this process."""
    if shutil.which("g++") is None:
        pytest.skip("the CUDA emulation needs g++ on PATH (apt-get install g++)")
    if SANITIZER and emu_build.SANITIZER_RUNTIME[SANITIZER] not in os.environ.get("LD_PRELOAD", ""):
        pytest.fail(f"TFX_EMU_SANITIZE={SANITIZER} needs LD_PRELOAD={emu_build.sanitizer_runtime(SANITIZER)} "
                    "set when Python starts")
    library = emu_build.build(SANITIZER)
    torch.ops.load_library(str(library))
    return library


@pytest.fixture(scope="session")
def emu_ops(emu_library):
    """``torch.ops.tokenflow_ext_emu``: the CUDA entry points of ``csrc/cuda/*.cu`` on CPU tensors."""
    return torch.ops.tokenflow_ext_emu
