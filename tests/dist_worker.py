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


def run_empty_kmeans(rank, world_size, init_file, out_dir):
    """Both ranks start k-means on an empty batch: each must raise the same ValueError (none may hang)."""
    import datetime

    from tokenflow_ext.nn import DualCodebookQuantizer

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        q = DualCodebookQuantizer(16, kmeans_init=True).train()
        try:
            q(torch.zeros(0, 40, 2, 2))
            message = "no error"
        except ValueError as error:
            message = str(error)
        # one rank empty, the other not: k-means runs on the gathered rows, both ranks agree
        batch = torch.randn(2, 40, 3, 3, generator=torch.Generator().manual_seed(7)) if rank else torch.zeros(0, 40, 3, 3)
        q(batch)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(message)
        torch.save(q.embedding_vqkd.weight.detach().clone(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
