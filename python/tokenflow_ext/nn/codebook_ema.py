"""EMA codebook updates and cosine k-means initialisation for the shared-index dual codebook.

Both codebooks are handled together (the official code only initialises and updates the semantic one,
leaving the pixel codebook at zero): a code k is the pair (semantic row k, pixel row k), assigned by the
shared-index search. Assignments use :func:`tokenflow_ext.codebook_search`; statistics are a bincount and
an ``index_add_`` (no N x K one-hot). Under ``torch.distributed`` the EMA statistics are all-reduced and
k-means runs on rank 0 over the all-gathered samples and is broadcast, so every rank keeps identical
codebooks, provided that they start identical: initialise them from the same seed on every rank (or with
``kmeans_init``, which broadcasts rank 0's result), since EMA updates never re-synchronise the rows.

Non-finite feature rows (a NaN or an infinity anywhere in the row) are left out of the k-means samples
and of the EMA statistics, with a warning that counts them: one NaN row would otherwise make its code's
row NaN for good.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from .._parts import normalize_parts
from ..ops.codebook_search import codebook_search


def distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate ``rows (n_r, D)`` of every rank in rank order (ranks may hold different n_r)."""
    if not distributed_ready():
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = rows.new_zeros(longest, rows.shape[1])
    padded[:rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:int(c.item())] for g, c in zip(gathered, counts)])


def _code_statistics(samples: torch.Tensor, indices: torch.Tensor, num_codes: int):
    bins = torch.bincount(indices, minlength=num_codes).to(samples.dtype)
    sums = samples.new_zeros(num_codes, samples.shape[1]).index_add_(0, indices, samples)
    return bins, sums


def _cluster_means(bins, sums, old_codes, semantic_dim):
    """Per-part normalised means; empty clusters keep their old rows."""
    means = normalize_parts(sums / bins.clamp_min(1)[:, None], semantic_dim)
    return torch.where((bins == 0)[:, None], old_codes, means)


@torch.no_grad()
def cosine_kmeans(samples: torch.Tensor, num_codes: int, semantic_dim: int, *, iterations: int = 10,
                  pixel_weight: float = 1.0, generator: torch.Generator | None = None):
    """Cosine k-means over unit-normalised ``[x_s, x_p]`` samples with the shared-index distance.

    Seeds: ``num_codes`` distinct samples (``randperm``), or drawn with replacement when there are fewer
    samples than codes, as the official ``sample_vectors``. Returns ``(codes (K, D), cluster sizes (K,))``.
    """
    count = samples.shape[0]
    if count >= num_codes:
        seeds = torch.randperm(count, generator=generator, device="cpu")[:num_codes]
    else:
        seeds = torch.randint(0, count, (num_codes,), generator=generator, device="cpu")
    codes = samples[seeds.to(samples.device)]
    bins = samples.new_zeros(num_codes)
    for _ in range(iterations):
        pixel = codes[:, semantic_dim:] if codes.shape[1] > semantic_dim else None
        indices, _ = codebook_search(samples, codes[:, :semantic_dim], pixel, pixel_weight=pixel_weight, l2_norm=True)
        bins, sums = _code_statistics(samples, indices, num_codes)
        codes = _cluster_means(bins, sums, codes, semantic_dim)
    return codes, bins


def _finite_rows(rows: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(rows).all(dim=1)


def _warn_skipped(count: int, total: int, where: str) -> None:
    if count:
        warnings.warn(f"DualCodebookQuantizer: {count} of {total} feature rows are not finite (NaN or inf); "
                      f"{where} leaves them out", RuntimeWarning, stacklevel=3)


@torch.no_grad()
def kmeans_init_(semantic: torch.Tensor, pixel: torch.Tensor, local_samples: torch.Tensor, *, iterations: int = 10,
                 pixel_weight: float = 1.0) -> None:
    """Initialise both codebooks in place by cosine k-means over the (all-gathered) samples.

    Every rank sees the same gathered samples, so every rank agrees on their count: when no rank has a
    finite feature row, all of them raise the same ValueError (none is left waiting in a broadcast)."""
    samples = all_gather_rows(local_samples.float())
    finite = _finite_rows(samples)
    total = samples.shape[0]
    samples = samples[finite]
    _warn_skipped(total - samples.shape[0], total, "k-means initialisation")
    if samples.shape[0] == 0:
        ranks = f" on any of the {dist.get_world_size()} ranks" if distributed_ready() else ""
        raise ValueError(f"DualCodebookQuantizer: kmeans_init needs feature rows, but the first training batch has "
                         f"{'none' if total == 0 else 'no finite ones'}{ranks}: start training with a non-empty "
                         "batch (or initialise the codebooks yourself and pass kmeans_init=False)")
    semantic_dim = semantic.shape[1]
    if not distributed_ready() or dist.get_rank() == 0:
        codes, _ = cosine_kmeans(samples, semantic.shape[0], semantic_dim, iterations=iterations,
                                 pixel_weight=pixel_weight)
        semantic.copy_(codes[:, :semantic_dim])
        pixel.copy_(codes[:, semantic_dim:])
    if distributed_ready():
        dist.broadcast(semantic, src=0)
        dist.broadcast(pixel, src=0)


@torch.no_grad()
def ema_update_(semantic: torch.Tensor, pixel: torch.Tensor, samples: torch.Tensor, indices: torch.Tensor, *,
                decay: float = 0.99) -> int:
    """One EMA step of both codebooks (official ``norm_ema_inplace``), with all-reduced statistics.

    ``new(k)`` = per-part normalised mean of the samples assigned to k (old row if none);
    ``codebook = normalize(decay * codebook + (1 - decay) * new)``. Non-finite sample rows are left out
    (warned about); returns their number over all ranks.
    """
    semantic_dim = semantic.shape[1]
    samples = samples.float()
    indices = indices.reshape(-1)
    finite = _finite_rows(samples)
    # Masked instead of filtered: the same shapes on every rank, and a zero weight for a skipped row.
    weights = finite.to(samples.dtype)
    bins = samples.new_zeros(semantic.shape[0]).index_add_(0, indices, weights)
    sums = samples.new_zeros(semantic.shape[0], samples.shape[1]).index_add_(
        0, indices, torch.where(finite[:, None], samples, samples.new_zeros(())))
    counts = torch.stack([(1 - weights).sum(), samples.new_tensor(float(samples.shape[0]))])  # skipped, rows
    if distributed_ready():
        dist.all_reduce(bins)
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    skipped, rows = (int(c) for c in counts.tolist())
    _warn_skipped(skipped, rows, "the EMA update")
    old = torch.cat([semantic, pixel], dim=1).float()
    target = _cluster_means(bins, sums, old, semantic_dim)
    updated = normalize_parts(decay * old + (1 - decay) * target, semantic_dim)
    semantic.copy_(updated[:, :semantic_dim])
    pixel.copy_(updated[:, semantic_dim:])
    return skipped
