"""The functional drop-in quantizer: search + gather + straight-through estimator."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._parts import bool_arg, float_arg, normalize_parts
from .ops.codebook_gather import codebook_gather
from .ops.codebook_search import codebook_search


class QuantizeResult(NamedTuple):
    """What :func:`quantize` returns.

    indices: int64 ``x.shape[:-1]``, the shared code index.
    codes: ``x.shape``, the chosen codebook rows (normalised per part if ``l2_norm``); gradients reach both
        codebooks.
    quantized: ``x.shape``, straight-through ``x_hat + (codes - x_hat).detach()``: the value of ``codes``
        with the gradient of ``x_hat`` (``x`` normalised per part if ``l2_norm``).
    distances: ``x.shape[:-1]`` float32 (float64 for float64 input), ``d(n, indices(n))``; differentiable.
    """

    indices: torch.Tensor
    codes: torch.Tensor
    quantized: torch.Tensor
    distances: torch.Tensor


def quantize(
    x: torch.Tensor,
    semantic_codebook: torch.Tensor,
    pixel_codebook: torch.Tensor | None = None,
    *,
    pixel_weight: float = 1.0,
    l2_norm: bool = True,
    deterministic: bool | None = None,
) -> QuantizeResult:
    """Quantize channel-last ``x (..., Ds [+ Dp])`` to the nearest shared-index code (TokenFlow's rule).

    ``index = argmin_k ||x_s - c_s(k)||^2 + w ||x_p - c_p(k)||^2`` on l2-normalised parts (``l2_norm``), with
    the fused search kernel (no N x K matrix), then one gather of both codebooks by that index.
    The vq / commitment losses of VQ-VAE training follow from the result, e.g.
    ``((res.codes - x_hat.detach()) ** 2).mean()`` and ``((res.codes.detach() - x_hat) ** 2).mean()``.
    See :func:`tokenflow_ext.codebook_search` and :func:`tokenflow_ext.codebook_gather` for the arguments.
    """
    pixel_weight = float_arg("tokenflow_ext.quantize", "pixel_weight", pixel_weight)
    l2_norm = bool_arg("tokenflow_ext.quantize", "l2_norm", l2_norm)
    indices, distances = codebook_search(
        x, semantic_codebook, pixel_codebook, pixel_weight=pixel_weight, l2_norm=l2_norm
    )
    codes = codebook_gather(indices, semantic_codebook, pixel_codebook, l2_norm=l2_norm, deterministic=deterministic)
    x_hat = normalize_parts(x, semantic_codebook.shape[-1]) if l2_norm else x
    quantized = x_hat + (codes - x_hat).detach()
    return QuantizeResult(indices, codes, quantized, distances)
