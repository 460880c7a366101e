"""Small layers shared by the TokenFlow and FlowTok modules (their attribute names are the official ones)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


class GeluMlp(nn.Module):
    """``fc2(gelu(fc1(x)))``; ``approximate="tanh"`` for SigLIP and DiT, exact GELU for the BEiT decoder."""

    def __init__(self, width: int, hidden: int, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def autocast_context(reference: torch.Tensor, dtype: torch.dtype | None):
    """``torch.autocast`` on ``reference``'s device type to ``dtype`` (the models' opt-in reduced-precision
    inference), or a no-op context for ``None`` (the default: exact fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {dtype}")
    return torch.autocast(reference.device.type, dtype=dtype)


def fused_weights(owner: nn.Module, modules: tuple[nn.Module, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(cat of the modules' weights as 2-D matrices, cat of their biases)``, cached on ``owner`` for
    inference: rebuilt whenever a weight or bias changes (storage, version counter, dtype or device), so
    loading a state dict, ``.to()`` or an optimizer step never leaves a stale copy. The state dict keeps the
    official separate keys; only the forward pass reads one matrix (one GEMM instead of several)."""
    tensors = [t for m in modules for t in (m.weight, m.bias) if t is not None]
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
    cached = owner.__dict__.get("_fused_cache")
    if cached is None or cached[0] != key:
        weight = torch.cat([m.weight.detach().reshape(m.weight.shape[0], -1) for m in modules])
        biases = [m.bias for m in modules]
        bias = None if any(b is None for b in biases) else torch.cat([b.detach() for b in biases])
        cached = (key, weight, bias)
        owner.__dict__["_fused_cache"] = cached
    return cached[1], cached[2]


def projected_attention(x: torch.Tensor, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear,
                        out_proj: nn.Linear, heads: int, dropout: float = 0.0) -> torch.Tensor:
    """Unmasked multi-head self-attention with separate q, k, v and output projections: ``(B, N, C)``."""
    b, n, c = x.shape
    if not torch.is_grad_enabled() and q_proj.weight.shape == k_proj.weight.shape == v_proj.weight.shape:
        # Inference: one GEMM on the concatenated weights (cached; the keys stay q/k/v_proj).
        weight, bias = fused_weights(q_proj, (q_proj, k_proj, v_proj))
        qkv = F.linear(x, weight, bias).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=dropout)
        return out_proj(attended.transpose(1, 2).reshape(b, n, c))
    q, k, v = (proj(x).reshape(b, n, heads, c // heads).transpose(1, 2) for proj in (q_proj, k_proj, v_proj))
    return out_proj(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout).transpose(1, 2).reshape(b, n, c))


@torch.no_grad()
def trunc_normal_init_(module: nn.Module, std: float = 0.02, kinds: tuple[type, ...] = (nn.Linear,)) -> None:
    """Trunc-normal(std) weights and zero biases for ``kinds``; LayerNorm weight 1, bias 0."""
    for child in module.modules():
        if isinstance(child, kinds):
            nn.init.trunc_normal_(child.weight, std=std)
            if child.bias is not None:
                nn.init.zeros_(child.bias)
        elif isinstance(child, nn.LayerNorm) and child.weight is not None:
            nn.init.ones_(child.weight)
            nn.init.zeros_(child.bias)


def randn_like_on(reference: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``randn`` of ``reference``'s shape, dtype and device, drawn on ``generator``'s device (a CPU generator
    works for CUDA tensors too, reproducibly)."""
    device = generator.device if generator is not None else reference.device
    noise = torch.randn(reference.shape, generator=generator, device=device, dtype=reference.dtype)
    return noise.to(reference.device)


def resize_positions(with_cls: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Positional table ``(1 + g*g, C)`` (CLS row first) for a ``grid_h x grid_w`` patch grid: the patch rows
    resized bicubically with TokenFlow's scale factor ``(grid + 0.1) / g`` (the +0.1 guards against floor()
    rounding below the target size); returned unchanged when the grid is the stored one."""
    stored_grid = math.isqrt(with_cls.shape[0] - 1)
    if grid_h == grid_w == stored_grid:
        return with_cls
    patches = with_cls[1:].reshape(1, stored_grid, stored_grid, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(patches, scale_factor=((grid_h + 0.1) / stored_grid, (grid_w + 0.1) / stored_grid),
                            mode="bicubic")
    if resized.shape[-2:] != (grid_h, grid_w):
        raise ValueError(f"cannot resize the {stored_grid}x{stored_grid} positional grid to {grid_h}x{grid_w}")
    return torch.cat([with_cls[:1], resized.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)], dim=0)


def causal_mask(length: int, device=None) -> torch.Tensor:
    """Additive ``(length, length)`` mask: 0 on and below the diagonal, -inf above."""
    return torch.full((length, length), float("-inf"), device=device).triu(1)
