"""Llama decoder blocks for TokenFlow's text-to-image model (Hugging Face Llama parameter names, no
transformers dependency), with the two changes the official t2i code makes to Llama
(``TF:t2i/llava_t2i/model/language_model/modeling_llama.py``):

- **QKNorm**: per-head RMSNorm (eps 1e-6) on the queries and keys, applied *before* RoPE, in every layer
  (``self_attn.qknorm.{query_norm,key_norm}.weight``, shape ``(head_dim,)``).
- **Post-norm residuals**: the official decoder layer normalises the *outputs* of attention and MLP,
  not their inputs::

      h   = x + input_layernorm(attention(x))
      out = h + post_attention_layernorm(mlp(h))

  (the Llama pre-norm lines are commented out there); the stack ends with ``norm``.

Attention runs through ``F.scaled_dot_product_attention`` with a boolean mask (or none) and an optional
key/value prefix, which is how :class:`~tokenflow_ext.models.TokenFlowT2I` implements its KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class LlamaShape:
    """The decoder's sizes (the Hugging Face ``LlamaConfig`` fields of the same names)."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of norms and softmax: float32 for half types and float32 (the official upcast), float64
    for float64."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dim, computed in :func:`compute_dtype` and cast
    back to the input dtype before the weight (official ``LlamaRMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(compute_dtype(x.dtype))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * wide.to(x.dtype)


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys ``(B, H, T, head_dim)`` (official ``QKNorm``, eps 1e-6)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim, eps=1e-6)
        self.key_norm = RMSNorm(head_dim, eps=1e-6)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


def rope_inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """``(head_dim / 2,)`` float32: ``theta^(-2i / head_dim)`` (Hugging Face's default RoPE)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponents)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions`` ``(T,)`` or ``(B, T)`` -> ``cos, sin`` ``(..., T, head_dim)`` in ``dtype``; angles
    ``p * inv_freq`` in float32, duplicated over both halves (``cat(freqs, freqs)``). Each entry depends only on
    its own position, so a block's table equals the same rows of a longer table bit for bit."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``cos, sin`` ``(B or 1, T, d)`` broadcast over heads."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


KeyValue = tuple[torch.Tensor, torch.Tensor]


class LlamaAttention(nn.Module):
    """Multi-head attention with QKNorm before RoPE; grouped-query heads when ``num_key_value_heads`` is
    smaller than ``num_attention_heads``. No biases (Llama-2)."""

    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.num_heads, self.num_key_value_heads = shape.num_attention_heads, shape.num_key_value_heads
        self.head_dim = shape.head_dim
        width = shape.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, width, bias=False)
        self.qknorm = QKNorm(self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                past: KeyValue | None = None) -> tuple[torch.Tensor, KeyValue]:
        """``x`` ``(B, n, C)``; ``past`` keys/values ``(B, H_kv, T_past, d)`` (after QKNorm and RoPE) that the
        ``n`` queries also see; ``mask`` boolean, broadcastable to ``(B, 1, n, T_past + n)``, True = attend.
        Returns the output ``(B, n, C)`` and the keys/values ``(B, H_kv, T_past + n, d)``."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        q, k = self.qknorm(q, k, v)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        repeat = self.num_heads // self.num_key_value_heads
        k_all = k.repeat_interleave(repeat, dim=1) if repeat > 1 else k
        v_all = v.repeat_interleave(repeat, dim=1) if repeat > 1 else v
        out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), (k, v)


class LlamaMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """The official t2i layer (post-norm residuals, see the module docstring)."""

    def __init__(self, shape: LlamaShape):
        super().__init__()
        self.self_attn = LlamaAttention(shape)
        self.mlp = LlamaMLP(shape)
        self.input_layernorm = RMSNorm(shape.hidden_size, eps=shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, eps=shape.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                past: KeyValue | None = None) -> tuple[torch.Tensor, KeyValue]:
        attended, key_value = self.self_attn(x, cos, sin, mask, past)
        h = x + self.input_layernorm(attended)
        return h + self.post_attention_layernorm(self.mlp(h)), key_value


def run_layers(layers: nn.ModuleList, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None = None, past: list[KeyValue] | None = None,
               gradient_checkpointing: bool = False) -> tuple[torch.Tensor, list[KeyValue]]:
    """Run ``h`` ``(B, n, C)`` through ``layers``; ``past[i]`` is layer ``i``'s key/value prefix. Returns the
    hidden states and every layer's keys/values including ``h``'s (store them to extend a cache)."""
    key_values = []
    for index, layer in enumerate(layers):
        layer_past = past[index] if past is not None else None
        if gradient_checkpointing and torch.is_grad_enabled():
            h, key_value = checkpoint(layer, h, cos, sin, mask, layer_past, use_reentrant=False)
        else:
            h, key_value = layer(h, cos, sin, mask, layer_past)
        key_values.append(key_value)
    return h, key_values
