"""Reference for codebook_search / codebook_gather / quantize: TokenFlow's official eager formulation.

The official VectorQuantizer (split=[32, 8]) builds two full N x K distance matrices,
``d = (|z|^2 + |e|^2 - 2 z.e)_sem + w (|z|^2 + |e|^2 - 2 z.e)_pix``, and takes ``argmin``. These functions do
the same (optionally in row chunks, to bound memory in tests) and are the baseline of the benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._parts import NORM_EPS, accumulate_dtype, codebook_widths


def _unit(t: torch.Tensor, l2_norm: bool) -> torch.Tensor:
    return F.normalize(t, dim=-1, eps=NORM_EPS) if l2_norm else t


def _parts(x, semantic_codebook, pixel_codebook, l2_norm):
    semantic_dim, pixel_dim = codebook_widths(semantic_codebook, pixel_codebook)
    flat = x.reshape(-1, semantic_dim + pixel_dim)
    z_s, z_p = flat[:, :semantic_dim], flat[:, semantic_dim:]
    e_s = _unit(semantic_codebook, l2_norm)
    e_p = None if pixel_codebook is None else _unit(pixel_codebook, l2_norm)
    return _unit(z_s, l2_norm), (None if e_p is None else _unit(z_p, l2_norm)), e_s, e_p


def _expanded_distance(z, e):
    return (z**2).sum(dim=1, keepdim=True) + (e**2).sum(dim=1) - 2 * torch.einsum("bd,dn->bn", z, e.t())


def codebook_distances(x, semantic_codebook, pixel_codebook=None, indices=None, *, pixel_weight=1.0, l2_norm=True,
                       dtype=torch.float64):
    """Exact ``d(n, k)`` as sums of squared differences in ``dtype`` (float64 by default).

    With ``indices`` (shape ``x.shape[:-1]``) returns ``d(n, indices(n))`` with that shape; without, the full
    ``(N, K)`` matrix (small problems only).
    """
    z_s, z_p, e_s, e_p = _parts(x.to(dtype), semantic_codebook.to(dtype),
                                None if pixel_codebook is None else pixel_codebook.to(dtype), l2_norm)
    if indices is None:
        d = torch.cdist(z_s, e_s) ** 2
        if e_p is not None:
            d = d + pixel_weight * torch.cdist(z_p, e_p) ** 2
        return d
    flat = indices.reshape(-1)
    d = ((z_s - e_s[flat]) ** 2).sum(dim=1)
    if e_p is not None:
        d = d + pixel_weight * ((z_p - e_p[flat]) ** 2).sum(dim=1)
    return d.reshape(indices.shape)


def codebook_search_reference(x, semantic_codebook, pixel_codebook=None, *, pixel_weight=1.0, l2_norm=True,
                              chunk_size=None):
    """The official formula: full (per chunk) N x K expanded distances in fp32 (fp64 for fp64), then argmin.

    Returns ``(indices int64 x.shape[:-1], min_distance)`` with the distance recomputed exactly for the
    chosen code, as :func:`tokenflow_ext.codebook_search` defines it.
    """
    compute = accumulate_dtype(x.dtype)
    z_s, z_p, e_s, e_p = _parts(x.to(compute), semantic_codebook.to(compute),
                                None if pixel_codebook is None else pixel_codebook.to(compute), l2_norm)
    n = z_s.shape[0]
    chunk = n if chunk_size is None else max(1, chunk_size)
    pieces = []
    for start in range(0, n, max(chunk, 1)):
        d = _expanded_distance(z_s[start:start + chunk], e_s)
        if e_p is not None:
            d = d + pixel_weight * _expanded_distance(z_p[start:start + chunk], e_p)
        pieces.append(torch.argmin(d, dim=1))
    flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=x.device)
    indices = flat.reshape(x.shape[:-1])
    distance = codebook_distances(x, semantic_codebook, pixel_codebook, indices, pixel_weight=pixel_weight,
                                  l2_norm=l2_norm, dtype=compute)
    return indices, distance


def codebook_gather_reference(indices, semantic_codebook, pixel_codebook=None, *, l2_norm=True):
    """``cat(normalize(E_s)[idx], normalize(E_p)[idx])``, differentiable through ``torch`` indexing."""
    rows = [_unit(semantic_codebook, l2_norm)[indices]]
    if pixel_codebook is not None:
        rows.append(_unit(pixel_codebook, l2_norm)[indices])
    return torch.cat(rows, dim=-1)


def quantize_reference(x, semantic_codebook, pixel_codebook=None, *, pixel_weight=1.0, l2_norm=True):
    """The official quantizer's forward: ``(indices, codes, quantized)`` with the straight-through output."""
    indices, _ = codebook_search_reference(x.detach(), semantic_codebook.detach(),
                                           None if pixel_codebook is None else pixel_codebook.detach(),
                                           pixel_weight=pixel_weight, l2_norm=l2_norm)
    codes = codebook_gather_reference(indices, semantic_codebook, pixel_codebook, l2_norm=l2_norm)
    semantic_dim = semantic_codebook.shape[-1]
    if l2_norm:
        parts = [_unit(x[..., :semantic_dim], True)]
        if pixel_codebook is not None:
            parts.append(_unit(x[..., semantic_dim:], True))
        x_hat = torch.cat(parts, dim=-1)
    else:
        x_hat = x
    return indices, codes, x_hat + (codes - x_hat).detach()


def index_agreement(x, semantic_codebook, pixel_codebook, indices_a, indices_b, *, pixel_weight=1.0, l2_norm=True,
                    tie_tolerance=1e-4):
    """Compare two index choices with the near-tie rule.

    Returns ``(exact_fraction, worst_gap, ok)``: the fraction of identical indices, the largest float64
    distance gap ``|d(a) - d(b)|`` where they differ, and whether every disagreement is a near-tie
    (gap <= ``tie_tolerance``), i.e. both codes are equally close within rounding of the compute dtype.
    """
    same = indices_a == indices_b
    exact = same.double().mean().item() if same.numel() else 1.0
    if bool(same.all()):
        return exact, 0.0, True
    d_a = codebook_distances(x, semantic_codebook, pixel_codebook, indices_a, pixel_weight=pixel_weight, l2_norm=l2_norm)
    d_b = codebook_distances(x, semantic_codebook, pixel_codebook, indices_b, pixel_weight=pixel_weight, l2_norm=l2_norm)
    gap = (d_a - d_b).abs()[~same].max().item()
    return exact, gap, gap <= tie_tolerance
