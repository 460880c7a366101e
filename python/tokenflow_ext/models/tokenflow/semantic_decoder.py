"""TokenFlow's semantic decoder ``decoder_vqkd``: a BEiT-v2-style ViT over the 32-d semantic codes
(patch size 1, CLS token, absolute positions, ``q_bias``/``v_bias`` without a k bias, mean-pooling mode so
``fc_norm`` normalises the returned patch tokens; the official TokenFlow code). Official parameter names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._layers import GeluMlp, resize_positions, trunc_normal_init_


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(attended.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = GeluMlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, width, kernel_size=1)


class SemanticDecoder(nn.Module):
    """Codes ``(B, in_channels, g, g)`` -> ``fc_norm`` of the patch tokens ``(B, g*g, width)``.

    ``grid`` is the stored positional grid; other grids (clipb at 256: 16 vs 14) use a bicubic resize with
    the official ``+0.1`` scale factor. Init as the official: trunc-normal(0.02) for positions, CLS and
    linear weights, zero biases, ``attn.proj`` and ``mlp.fc2`` weights divided by ``sqrt(2 * layer_id)``.
    """

    def __init__(self, in_channels: int = 32, width: int = 768, depth: int = 3, heads: int = 12, grid: int = 14,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.patch_embed = PatchEmbed(in_channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.fc_norm = nn.LayerNorm(width, eps=1e-6)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_init_(self)
        for layer_id, block in enumerate(self.blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))

    def positional_embedding_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        return resize_positions(self.pos_embed[0], grid_h, grid_w).unsqueeze(0)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, C, h, w)`` -> tokens ``(B, 1 + h*w, width)``: patch projection, class token, positions."""
        tokens = self.patch_embed.proj(codes)
        grid_h, grid_w = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        return tokens + self.positional_embedding_for(grid_h, grid_w).to(tokens.dtype)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(codes)
        for block in self.blocks:
            tokens = block(tokens)
        return self.fc_norm(tokens[:, 1:])
