import pytest
import torch

import tokenflow_ext

CUDA_READY = torch.cuda.is_available() and tokenflow_ext.build_info()["with_cuda"]


def pytest_collection_modifyitems(config, items):
    if CUDA_READY:
        return
    reason = "needs a CUDA GPU and tokenflow_ext built with CUDA kernels"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
