"""Quantizer training edge cases (issue 12, item 9): empty batches under torch.distributed k-means, NaN
features with EMA, empty training batches."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from tokenflow_ext.nn import DualCodebookQuantizer, MultiScaleQuantizer
from tokenflow_ext.nn.codebook_ema import ema_update_, kmeans_init_


def test_every_rank_raises_the_same_error_when_all_first_batches_are_empty(tmp_path):
    from dist_worker import run_empty_kmeans

    # Before the fix rank 0 raised "random_ expects 'from' < 'to'" and rank 1 hung in broadcast.
    mp.spawn(run_empty_kmeans, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    messages = [open(tmp_path / f"rank{r}.txt").read() for r in range(2)]
    assert messages[0] == messages[1] and "kmeans_init needs feature rows" in messages[0] and "2 ranks" in messages[0]
    assert torch.equal(torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt"))


def test_kmeans_on_an_empty_or_non_finite_batch_raises_a_clear_error():
    semantic, pixel = torch.zeros(8, 32), torch.zeros(8, 8)
    with pytest.raises(ValueError, match="kmeans_init needs feature rows, but the first training batch has none"):
        kmeans_init_(semantic, pixel, torch.zeros(0, 40))
    with pytest.raises(ValueError, match="no finite ones"), pytest.warns(RuntimeWarning, match="3 of 3"):
        kmeans_init_(semantic, pixel, torch.full((3, 40), float("nan")))


def test_non_finite_features_are_left_out_of_the_ema_statistics():
    torch.manual_seed(0)
    q = DualCodebookQuantizer(16, ema=True, ema_decay=0.5).train()
    z = torch.randn(2, 40, 3, 3)
    z[0, 5, 1, 1] = float("nan")
    z[1, 33, 0, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="2 of 18 feature rows are not finite"):
        q(z)
    assert torch.isfinite(q.embedding_vqkd.weight).all() and torch.isfinite(q.embedding_vqgan.weight).all()
    # the bad rows are simply absent: the same update as without them
    samples = torch.nn.functional.normalize(torch.randn(10, 40), dim=-1)
    indices = torch.randint(0, 16, (10,), generator=torch.Generator().manual_seed(1))
    bad = samples.clone()
    bad[[2, 7], 3] = float("nan")
    books = [(q.embedding_vqkd.weight.detach().clone(), q.embedding_vqgan.weight.detach().clone()) for _ in range(2)]
    with pytest.warns(RuntimeWarning, match="2 of 10"):
        assert ema_update_(*books[0], bad, indices, decay=0.5) == 2
    keep = torch.tensor([i not in (2, 7) for i in range(10)])
    assert ema_update_(*books[1], samples[keep], indices[keep], decay=0.5) == 0
    assert torch.allclose(books[0][0], books[1][0]) and torch.allclose(books[0][1], books[1][1])


def test_empty_training_batch_gives_zero_losses_with_a_warning():
    quantizer = MultiScaleQuantizer(DualCodebookQuantizer(16), (1, 2, 3), random_scale_drop=False).train()
    with pytest.warns(RuntimeWarning, match="empty batch"):
        features, losses, indices = quantizer(torch.zeros(0, 40, 3, 3))
    assert features.shape == (0, 40, 3, 3) and indices.shape == (0, 14)
    values = [value.detach() for value in losses if isinstance(value, torch.Tensor)]
    assert len(values) == 5 and all(float(value) == 0 for value in values)  # NaN before the fix
