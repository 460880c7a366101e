"""Worker of the 2-process torch.distributed (gloo, CPU, loopback) quantizer test."""

import os

import torch
import torch.distributed as dist


def make_batches(rank, steps=3):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(2, 40, 4, 4, generator=g) for _ in range(steps)]


def train_quantizer(batches_per_step):
    """Seeded quantizer with k-means init and EMA; each step sees one batch (or the ranks' batches)."""
    from tokenflow_ext.nn import DualCodebookQuantizer

    torch.manual_seed(0)
    q = DualCodebookQuantizer(48, kmeans_init=True, ema=True, ema_decay=0.9).train()
    for batch in batches_per_step:
        q(batch)
    return q.embedding_vqkd.weight.detach().clone(), q.embedding_vqgan.weight.detach().clone()


def run(rank, world_size, init_file, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        semantic, pixel = train_quantizer(make_batches(rank))
        torch.save({"semantic": semantic, "pixel": pixel}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
