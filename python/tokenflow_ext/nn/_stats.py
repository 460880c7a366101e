"""Bounded-memory versions of the official quantizer's N x K side computations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

MAX_TILE_ELEMENTS = 1 << 24  # rows x codes of one chunk's distance tile (64 MiB in fp32)


@torch.no_grad()
def mean_squared_distance_sum(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``mean_n sum_k d(n, k)^2`` with ``d = |z|^2 + |e|^2 - 2 z.e``, without the N x K matrix.

    Expanding the square over k needs only codebook moments: with ``a = |z|^2``, ``b_k = |e_k|^2``,
    ``sum_k d^2 = K a^2 + 2 a sum(b) + sum(b^2) - 4 a z.sum(e) - 4 z.sum(b e) + 4 z^T (sum e e^T) z``.
    Computed in float64; O((N + K) D^2). The official quantizer logs this value (``vqkd_d_norm``).
    """
    z64, e64 = z.double(), codes.double()
    a = (z64 * z64).sum(1)
    b = (e64 * e64).sum(1)
    moment1 = e64.sum(0)
    moment_b = (b[:, None] * e64).sum(0)
    second = e64.t() @ e64
    per_row = (codes.shape[0] * a * a + 2 * a * b.sum() + (b * b).sum() - 4 * a * (z64 @ moment1)
               - 4 * (z64 @ moment_b) + 4 * ((z64 @ second) * z64).sum(1))
    return per_row.mean().to(torch.float32)


def _expanded_distance(z, e):
    return (z * z).sum(1, keepdim=True) + (e * e).sum(1) - 2 * z @ e.t()


def _entropy_chunk(z_s, z_p, e_s, e_p, pixel_weight: float, temperature: float):
    d = _expanded_distance(z_s, e_s)
    if e_p is not None:
        d = d + pixel_weight * _expanded_distance(z_p, e_p)
    logits = -d / temperature
    probs = F.softmax(logits, dim=-1)
    log_probs = F.log_softmax(logits + 1e-5, dim=-1)
    return -(probs * log_probs).sum(), probs.sum(0)


def entropy_loss(z_s, z_p, e_s, e_p, *, pixel_weight: float = 1.0, temperature: float = 0.01) -> torch.Tensor:
    """The official ``compute_entropy_loss(-d)``: mean sample entropy minus the entropy of the mean
    distribution, over a softmax with temperature 0.01 of the negative shared distance.

    Row chunks of at most 2^24 distances are recomputed in the backward pass (activation checkpointing), so
    memory stays bounded at any N. The result and its gradients equal the one-shot N x K computation.
    """
    n, k = z_s.shape[0], e_s.shape[0]
    chunk = max(1, MAX_TILE_ELEMENTS // k)
    sample_total = z_s.new_zeros(())
    prob_total = z_s.new_zeros(k)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        sample, probs = checkpoint(_entropy_chunk, z_s[start:stop], None if z_p is None else z_p[start:stop], e_s,
                                   e_p, pixel_weight, temperature, use_reentrant=False)
        sample_total = sample_total + sample
        prob_total = prob_total + probs
    avg_probs = prob_total / n
    avg_entropy = -(avg_probs * torch.log(avg_probs + 1e-5)).sum()
    return sample_total / n - avg_entropy
