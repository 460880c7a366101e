"""FlowTok's flow transformer (official ``FlowTok`` nnet of ``libs/model/flowtok_t2i.py``): a DiT with
adaLN-Zero over 77 tokens of 16 channels, no patchify, fixed 1-D sin-cos positions, the timestep embedded
from raw ``t`` in [0, 1], and a null-indicator embedding for classifier-free guidance. It also holds the
text projector (``context_encoder``), the alignment MLP (``context_projector``) and the contrastive
temperature (``t2t_temperature``), so its state dict is the released ``FlowTok-XL.pth`` / ``FlowTok-H.pth``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .._layers import GeluMlp, randn_like_on
from .text_projector import INITIAL_LOG_TEMPERATURE, FlowEncoder, alignment_mlp

# Official FlowTok_{S,B,L,XL,H}: (depth, width, heads); MLP ratio 4.
FLOW_PRESETS: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16), "H": (36, 1280, 20)}


def sincos_positions(width: int, count: int) -> torch.Tensor:
    """``(count, width)``: ``[sin(p w_d), cos(p w_d)]`` with ``w_d = 10000^(-2d/width)`` (float64 then float32)."""
    omega = 1.0 / 10000 ** (torch.arange(width // 2, dtype=torch.float64) / (width / 2))
    angles = torch.arange(count, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of raw ``t`` (256 frequencies, ``[cos, sin]``, max period 10000) -> MLP."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, classes: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(classes, width)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels.long())


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class DiTBlock(nn.Module):
    """adaLN-Zero block: ``x += gate_msa * attn(mod(norm1 x))``, ``x += gate_mlp * mlp(mod(norm2 x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = GeluMlp(width, int(width * mlp_ratio), approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, width: int, channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class FlowTransformer(nn.Module):
    """``velocity = model(x_t (B, 77, 16), t (B,), null_indicator (B,) bool)`` -> ``(B, 77, 16)``.

    ``preset`` is one of ``FLOW_PRESETS`` or ``(depth, width, heads)``. Text projector sizes:
    ``clip_dim`` 768, ``text_layers`` 6, ``text_heads`` 8, ``text_hidden`` 1024, ``text_dropout`` 0.1.
    ``gradient_checkpointing`` (off by default; the official code always checkpoints every block)
    recomputes each block in the backward pass.
    """

    def __init__(self, preset: str | tuple[int, int, int] = "XL", *, tokens: int = 77, channels: int = 16,
                 clip_dim: int = 768, text_layers: int = 6, text_heads: int = 8, text_hidden: int = 1024,
                 text_dropout: float = 0.1, mlp_ratio: float = 4.0, gradient_checkpointing: bool = False):
        super().__init__()
        if isinstance(preset, str):
            if preset not in FLOW_PRESETS:
                raise ValueError(f"FlowTransformer: unknown preset {preset!r}; choose from {list(FLOW_PRESETS)}")
            preset = FLOW_PRESETS[preset]
        depth, width, heads = preset
        self.tokens, self.channels, self.clip_dim = tokens, channels, clip_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.x_embedder = nn.Linear(channels, width)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(2, width)
        self.t2t_temperature = nn.Parameter(torch.tensor(INITIAL_LOG_TEMPERATURE))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, width), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(width, channels)
        self._init_weights()
        self.context_encoder = FlowEncoder(clip_dim, text_layers, text_heads, text_hidden, channels, text_dropout)
        self.context_projector = alignment_mlp(clip_dim, channels)

    @torch.no_grad()
    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.copy_(sincos_positions(self.pos_embed.shape[-1], self.tokens).unsqueeze(0))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for linear in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, null_indicator: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.tokens, self.channels):
            raise ValueError(f"FlowTransformer: x must be (B, {self.tokens}, {self.channels}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"FlowTransformer: t must be ({x.shape[0]},), got {tuple(t.shape)}")
        if null_indicator is None:
            null_indicator = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(null_indicator)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        return self.final_layer(h, c)

    def encode_text(self, text_features: torch.Tensor, *, sample: bool = True,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CLIP features ``(B, 77, clip_dim)`` -> ``(z, mu, log_var)``, each ``(B, 77, 16)``;
        ``z = mu + exp(log_var / 2) * eps`` (``z = mu`` without ``sample``)."""
        if text_features.dim() != 3 or text_features.shape[1:] != (self.tokens, self.clip_dim):
            raise ValueError(f"FlowTransformer: text features must be (B, {self.tokens}, {self.clip_dim}), "
                             f"got {tuple(text_features.shape)}")
        mu, log_var = self.context_encoder(text_features).chunk(2, dim=-1)
        if not sample:
            return mu, mu, log_var
        return mu + torch.exp(0.5 * log_var) * randn_like_on(mu, generator), mu, log_var

    def align_text(self, text_features: torch.Tensor) -> torch.Tensor:
        """The alignment target: ``context_projector`` per token, ``(B, 77, 16)``."""
        return self.context_projector(text_features)
