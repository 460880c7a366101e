import pytest
import torch

import tokenflow_ext
from tokenflow_ext.bench.timing import machine_description

CUDA_READY = torch.cuda.is_available() and tokenflow_ext.build_info()["with_cuda"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if CUDA_READY:
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU and tokenflow_ext built with CUDA kernels"))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["tokenflow_ext"] = tokenflow_ext.build_info()
    machine_info["cpu_description"] = machine_description("cpu")
    if CUDA_READY:
        machine_info["gpu_description"] = machine_description("cuda")
