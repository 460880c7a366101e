"""Helpers for the channel-last "[semantic | pixel]" layout shared by the codebook ops."""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # F.normalize's default


def codebook_widths(semantic_codebook: torch.Tensor, pixel_codebook: torch.Tensor | None) -> tuple[int, int]:
    """(Ds, Dp) of the codebooks; Dp = 0 without a pixel codebook."""
    return semantic_codebook.shape[-1], (0 if pixel_codebook is None else pixel_codebook.shape[-1])


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic dtype of every op: float64 for float64 inputs, float32 otherwise (C++:
    ``accumulate_type_for``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_same_device_dtype(op: str, tensors: dict) -> None:
    """Raise like the C++ checks when named tensors (None skipped) differ in device or dtype.

    Used by the fake kernels, which run instead of the C++ ones for meta/fake tensors (and for mixed-device
    calls involving a meta tensor), so errors surface at trace time with the same wording.
    """
    named = [(name, t) for name, t in tensors.items() if t is not None]
    ref_name, ref = named[0]
    for name, t in named[1:]:
        if t.device != ref.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")
        if t.dtype != ref.dtype:
            raise RuntimeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def promote_floats(*tensors):
    """Mixed float dtypes (fp16/bf16 features with fp32 codebooks, autocast outputs): every tensor cast to the
    promoted dtype, as eager type promotion would compute. Left alone when one is not floating point (the op
    then reports it) or when they already agree; None passes through."""
    present = [t for t in tensors if t is not None]
    if not all(t.is_floating_point() for t in present) or len({t.dtype for t in present}) <= 1:
        return tensors
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def float_arg(op: str, name: str, value) -> float:
    """``value`` as a Python float, or a TypeError naming the op and the argument.

    A tensor is refused (``float(tensor)`` would silently drop its gradient and synchronise a GPU); so are
    bools and non-numbers.
    """
    if type(value) is float:  # the common case, without the checks below (ops call this on every step)
        return value
    if isinstance(value, torch.Tensor):
        why = " that requires grad (the op is not differentiable in it)" if value.requires_grad else ""
        raise TypeError(f"{op}: {name} must be a Python float, got a Tensor{why}; pass a float")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__} {value!r}")
    return float(value) if isinstance(value, numbers.Real) else value


def bool_arg(op: str, name: str, value) -> bool:
    """``value`` as a Python bool (``bool`` or ``numpy.bool_`` only), or a TypeError naming the op and argument."""
    if type(value) is bool:
        return value
    if not isinstance(value, (bool, np.bool_, torch.SymBool)):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value) if isinstance(value, (bool, np.bool_)) else value


def normalize_parts(x: torch.Tensor, semantic_dim: int) -> torch.Tensor:
    """x (..., Ds + Dp) with each part divided by max(||part||, 1e-12), as F.normalize does."""
    if semantic_dim == x.shape[-1]:
        return F.normalize(x, dim=-1, eps=NORM_EPS)
    semantic, pixel = x.split([semantic_dim, x.shape[-1] - semantic_dim], dim=-1)
    return torch.cat([F.normalize(semantic, dim=-1, eps=NORM_EPS), F.normalize(pixel, dim=-1, eps=NORM_EPS)], dim=-1)


def _normalize_backward(v: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    norm = v.norm(dim=-1, keepdim=True)
    denominator = norm.clamp_min(NORM_EPS)
    unit = v / denominator
    projection = (unit * grad).sum(dim=-1, keepdim=True)
    # Below eps the clamp stops the gradient of the norm: only g / eps remains.
    return (grad - torch.where(norm > NORM_EPS, unit * projection, torch.zeros_like(projection))) / denominator


def normalize_parts_backward(x: torch.Tensor, grad: torch.Tensor, semantic_dim: int) -> torch.Tensor:
    """Gradient w.r.t. x of normalize_parts(x, semantic_dim), given the gradient of its output."""
    if semantic_dim == x.shape[-1]:
        return _normalize_backward(x, grad)
    widths = [semantic_dim, x.shape[-1] - semantic_dim]
    parts = zip(x.split(widths, dim=-1), grad.split(widths, dim=-1))
    return torch.cat([_normalize_backward(v, g) for v, g in parts], dim=-1)


def part_weights(semantic_dim: int, pixel_dim: int, pixel_weight: float, like: torch.Tensor) -> torch.Tensor:
    """(Ds + Dp,) vector [1, ..., 1, w, ..., w] for weighting squared differences per channel."""
    weights = torch.ones(semantic_dim + pixel_dim, dtype=like.dtype, device=like.device)
    weights[semantic_dim:] = pixel_weight
    return weights
