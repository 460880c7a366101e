import os

import pytest
import torch

import tokenflow_ext

CUDA_READY = torch.cuda.is_available() and tokenflow_ext.build_info()["with_cuda"]

# Tests of whole models on tiny configs run with one intra-op thread: their ops are far too small to gain
# from a second thread, and on a machine shared with other jobs every multi-threaded op waits for its
# descheduled sibling thread for a scheduler tick (measured: a tiny FlowTok training step took 1.25 s with
# 2 threads and 0.07 s with 1 on a loaded 2-core machine). The op tests keep torch's default threads, so the
# kernels' parallel paths stay covered.
SINGLE_THREAD_FILES = {"test_tokenflow_model.py", "test_flowtok_model.py", "test_tokenflow_generation.py",
                       "test_ema_kmeans_edge_cases.py", "test_readme.py", "test_bench_cli.py", "test_t2i.py",
                       "test_sample_logits.py"}
SINGLE_THREAD_PREFIXES = ("test_train_",)  # the training tests: tiny models too


def pytest_collection_modifyitems(config, items):
    if CUDA_READY:
        return
    reason = "needs a CUDA GPU and tokenflow_ext built with CUDA kernels"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    name = os.path.basename(str(request.node.path))
    if name not in SINGLE_THREAD_FILES and not name.startswith(SINGLE_THREAD_PREFIXES):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
