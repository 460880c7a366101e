"""codebook_gather: rows of one or two codebooks by one shared index, with a scatter-add backward."""

from __future__ import annotations

import torch

from .._parts import bool_arg, check_same_device_dtype, codebook_widths, promote_floats

_op = torch.ops.tokenflow_ext.codebook_gather


def codebook_gather(
    indices: torch.Tensor,
    semantic_codebook: torch.Tensor,
    pixel_codebook: torch.Tensor | None = None,
    *,
    l2_norm: bool = True,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Rows of both codebooks by one index: ``rows[..., :] = [c_s[idx], c_p[idx]]``.

    Args:
        indices: int64 (or int32) tensor of any shape ``(...)``, values in ``[0, K)``.
        semantic_codebook: ``(K, Ds)`` float tensor.
        pixel_codebook: optional ``(K, Dp)`` tensor, same device and dtype.
        l2_norm: divide each gathered part by ``max(||part||, 1e-12)`` (``F.normalize``), as TokenFlow does.
        deterministic: how the backward accumulates on CUDA: ``True`` sorts the indices and sums each code's
            rows in a fixed order (bitwise reproducible), ``False`` uses atomics (faster for uniform indices).
            ``None`` follows ``torch.are_deterministic_algorithms_enabled()``. The CPU is always deterministic.

    Returns:
        ``(..., Ds + Dp)`` tensor in the codebooks' dtype (their promoted dtype if they differ; autocast does
        not change it, as for eager indexing). Gradients reach both codebooks (a scatter-add by
        index, then back through the normalisation when ``l2_norm``).

    Raises:
        On the CPU, an out-of-range index raises an error naming ``indices``. On CUDA (as with torch's own
        indexing) it fires a device-side assert instead, which cannot be caught: the process's CUDA context is
        lost and every later CUDA call fails. Check indices from untrusted input first
        (``((indices >= 0) & (indices < K)).all()``).
    """
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    l2_norm = bool_arg("tokenflow_ext.codebook_gather", "l2_norm", l2_norm)
    deterministic = bool_arg("tokenflow_ext.codebook_gather", "deterministic", deterministic)
    semantic_codebook, pixel_codebook = promote_floats(semantic_codebook, pixel_codebook)
    return _op.default(indices, semantic_codebook, pixel_codebook, l2_norm, deterministic)


@torch.library.register_fake("tokenflow_ext::codebook_gather")
def _codebook_gather_fake(indices, semantic_codebook, pixel_codebook, l2_norm, deterministic):
    check_same_device_dtype(
        "tokenflow_ext.codebook_gather", {"semantic_codebook": semantic_codebook, "pixel_codebook": pixel_codebook}
    )
    semantic_dim, pixel_dim = codebook_widths(semantic_codebook, pixel_codebook)
    return semantic_codebook.new_empty((*indices.shape, semantic_dim + pixel_dim))


@torch.library.register_fake("tokenflow_ext::codebook_gather_backward")
def _codebook_gather_backward_fake(grad_rows, indices, semantic_codebook, pixel_codebook, l2_norm, deterministic):
    grad_pixel = semantic_codebook.new_empty((0,)) if pixel_codebook is None else torch.empty_like(pixel_codebook)
    return torch.empty_like(semantic_codebook), grad_pixel


# Autograd: in C++ (csrc/codebook_gather.cpp), with a differentiable formula for double backward.
