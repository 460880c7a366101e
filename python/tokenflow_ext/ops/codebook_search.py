"""codebook_search: fused distance + argmin over one or two codebooks that share one index."""

from __future__ import annotations

import torch

from .._parts import (
    accumulate_dtype,
    bool_arg,
    check_same_device_dtype,
    codebook_widths,
    float_arg,
    normalize_parts,
    normalize_parts_backward,
    part_weights,
    promote_floats,
)

_op = torch.ops.tokenflow_ext.codebook_search
_gather = torch.ops.tokenflow_ext.codebook_gather
_gather_backward = torch.ops.tokenflow_ext.codebook_gather_backward


def codebook_search(
    x: torch.Tensor,
    semantic_codebook: torch.Tensor,
    pixel_codebook: torch.Tensor | None = None,
    *,
    pixel_weight: float = 1.0,
    l2_norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code under the shared-index dual-codebook distance, without an N x K matrix.

    ``d(n, k) = ||x_s(n) - c_s(k)||^2 + w * ||x_p(n) - c_p(k)||^2`` where ``x = [x_s, x_p]`` is split after
    ``Ds`` channels; with ``l2_norm`` every part of ``x`` and every codebook row is first divided by
    ``max(||part||, 1e-12)`` (``F.normalize``), exactly as TokenFlow's quantizer does.

    Args:
        x: ``(..., Ds + Dp)`` float32 / float16 / bfloat16 / float64, channel-last, any strides.
        semantic_codebook: ``(K, Ds)``, same device as ``x``. Mixed float dtypes (e.g. bf16 ``x`` from an
            autocast region with fp32 codebooks) are computed in their promoted dtype, as eager would; under
            ``torch.autocast`` the op itself runs in float32 (float64 inputs stay float64).
        pixel_codebook: optional ``(K, Dp)``; without it the search runs on the semantic codebook alone.
        pixel_weight: ``w >= 0`` (TokenFlow's ``w_dis``; ignored without a pixel codebook).
        l2_norm: normalise each part of ``x`` and of the codebooks first.

    Returns:
        ``indices`` int64 ``(...)``: ``argmin_k d``, the lowest ``k`` on ties (as ``torch.argmin``), whatever
        the batch. CPU: codes whose GEMM scores lie within a rounding margin of the best are re-ranked by
        their exact distance (from differences), then by index. CUDA: each (row, code) score comes from one
        fixed FMA sequence, so bitwise-identical codes tie exactly; codes closer than fp32 rounding may
        resolve differently from the CPU.
        ``min_distance`` ``(...)``: ``d(n, indices(n))`` computed directly from the differences, float32
        (float64 for float64 inputs). It is differentiable w.r.t. ``x`` and both codebooks.

    Arithmetic is fp32 for fp32/fp16/bf16 inputs (fp64 for fp64); CPU tiles go through torch's GEMM,
    CUDA through a fused SIMT kernel. Memory is O((N + K) * D).
    """
    pixel_weight = float_arg("tokenflow_ext.codebook_search", "pixel_weight", pixel_weight)
    l2_norm = bool_arg("tokenflow_ext.codebook_search", "l2_norm", l2_norm)
    x, semantic_codebook, pixel_codebook = promote_floats(x, semantic_codebook, pixel_codebook)
    return _op(x, semantic_codebook, pixel_codebook, pixel_weight, l2_norm)


@torch.library.register_fake("tokenflow_ext::codebook_search")
def _codebook_search_fake(x, semantic_codebook, pixel_codebook, pixel_weight, l2_norm):
    check_same_device_dtype(
        "tokenflow_ext.codebook_search",
        {"semantic_codebook": semantic_codebook, "pixel_codebook": pixel_codebook, "x": x},
    )
    semantic_dim, pixel_dim = codebook_widths(semantic_codebook, pixel_codebook)
    torch._check(
        x.dim() >= 1 and x.shape[-1] == semantic_dim + pixel_dim,
        lambda: f"tokenflow_ext.codebook_search: the last dim of x is {x.shape[-1]} but the codebooks need "
        f"{semantic_dim + pixel_dim}",
    )
    acc = accumulate_dtype(x.dtype)
    limit = torch.finfo(acc).max / 16  # C++: max_pixel_weight
    torch._check(
        pixel_weight <= limit,
        lambda: f"tokenflow_ext.codebook_search: pixel_weight = {pixel_weight} overflows the {acc} arithmetic of "
        f"these inputs; it must be <= {limit}",
    )
    shape = x.shape[:-1]
    return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=acc)


def _setup_context(ctx, inputs, output):
    x, semantic_codebook, pixel_codebook, pixel_weight, l2_norm = inputs
    indices, _ = output
    ctx.save_for_backward(x, semantic_codebook, pixel_codebook, indices)
    ctx.pixel_weight = pixel_weight
    ctx.l2_norm = l2_norm


def _backward(ctx, grad_indices, grad_distance):
    # d = sum_c weight_c (x_hat_c - c_hat_c)^2  =>  dd/dx_hat = 2 weight (x_hat - c_hat) = -dd/dc_hat,
    # then back through both normalisations (the codebook side by the gather backward op).
    x, semantic_codebook, pixel_codebook, indices = ctx.saved_tensors
    if grad_distance is None:
        return None, None, None, None, None
    semantic_dim, pixel_dim = codebook_widths(semantic_codebook, pixel_codebook)
    compute_dtype = grad_distance.dtype
    x_compute = x.to(compute_dtype)
    x_hat = normalize_parts(x_compute, semantic_dim) if ctx.l2_norm else x_compute
    codes = _gather(indices, semantic_codebook, pixel_codebook, ctx.l2_norm, True).to(compute_dtype)
    weights = part_weights(semantic_dim, pixel_dim, ctx.pixel_weight, x_hat)
    grad_x_hat = 2.0 * grad_distance.unsqueeze(-1) * (x_hat - codes) * weights

    grad_x = grad_semantic = grad_pixel = None
    if ctx.needs_input_grad[0]:
        grad_x = normalize_parts_backward(x_compute, grad_x_hat, semantic_dim) if ctx.l2_norm else grad_x_hat
        grad_x = grad_x.to(x.dtype)
    if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) and torch.is_grad_enabled():
        # double backward: the gather's vector-Jacobian product through the gather's own (C++) autograd, whose
        # backward is differentiable too
        books = [book for book, needed in ((semantic_codebook, ctx.needs_input_grad[1]),
                                           (pixel_codebook, ctx.needs_input_grad[2])) if needed]
        grads = iter(torch.autograd.grad(codes, books, -grad_x_hat, create_graph=True, allow_unused=True))
        grad_semantic = next(grads) if ctx.needs_input_grad[1] else None
        grad_pixel = next(grads) if ctx.needs_input_grad[2] else None
    elif ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        grad_semantic, grad_pixel = _gather_backward(
            (-grad_x_hat).to(semantic_codebook.dtype).contiguous(),
            indices,
            semantic_codebook,
            pixel_codebook,
            ctx.l2_norm,
            True,
        )
        if pixel_codebook is None:
            grad_pixel = None
    return grad_x, grad_semantic, grad_pixel, None, None


torch.library.register_autograd("tokenflow_ext::codebook_search", _backward, setup_context=_setup_context)
# Autocast: the search runs in float32 arithmetic anyway; casting low-precision inputs up lets autocast-region
# features meet fp32 codebooks (as the official eager quantizer does), and the indices do not depend on it.
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("tokenflow_ext::codebook_search", _device_type, torch.float32)
