"""What was compiled: version, torch, CUDA kernels and their architectures."""

from __future__ import annotations

import torch

from . import _C


def build_info() -> dict:
    """Build facts of the installed extension.

    Keys: ``version``; ``torch_built_against`` and ``torch_runtime`` (they must match in major.minor);
    ``with_cuda`` (CUDA kernels compiled); ``cuda_archs`` (list of ints); ``cuda_available`` (a GPU is
    visible now); ``cuda_verified`` (whether the CUDA kernels of this release were run on a GPU).
    """
    archs = [int(a) for a in str(_C.cuda_archs).replace(",", ";").split(";") if a.strip().isdigit()]
    return {
        "version": _C.__version__,
        "torch_built_against": _C.torch_version,
        "torch_runtime": torch.__version__,
        "with_cuda": bool(_C.with_cuda),
        "cuda_archs": archs,
        "cuda_available": torch.cuda.is_available(),
        "cuda_verified": False,
    }
