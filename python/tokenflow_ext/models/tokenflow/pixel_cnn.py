"""The pixel branch: TokenFlow's VQGAN CNN encoder and decoder (LlamaGen layout, as in the official TokenFlow code).

Parameter names follow the official modules (``conv_blocks.{i}.res.{j}``, ``.attn.{j}``, ``.downsample.conv``,
``.upsample.conv``, ``mid.{0,1,2}``, ``norm_out``, ``conv_out``), so official weights load without renaming.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._layers import fused_weights


def channels_last_inference(x: torch.Tensor) -> bool:
    """The pixel CNN runs its activations channels-last (NHWC) for CPU inference: oneDNN's convolutions,
    GroupNorm and the 1x1 projections as plain GEMMs over ``(B*H*W, C)`` then need no layout reorders.
    Training and CUDA keep the default NCHW layout."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> dropout -> conv3x3, plus a 1x1 ``nin_shortcut``
    when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x).to(x.dtype)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 convolutions ``q, k, v, proj_out`` (scale ``C^-1/2``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if x.is_contiguous(memory_format=torch.channels_last) and not torch.is_grad_enabled():
            return self._forward_nhwc(x)
        normed = self.norm(x)
        q, k, v = (conv(normed).reshape(b, 1, c, h * w).transpose(-1, -2) for conv in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c)
        return x + self.proj_out(attended.transpose(-1, -2).reshape(b, c, h, w))

    def _forward_nhwc(self, x: torch.Tensor) -> torch.Tensor:
        """Inference on a channels-last ``x``: the 1x1 convolutions are GEMMs over ``(B, HW, C)`` views,
        q, k and v one GEMM on their cached concatenated weights; no copies between layouts."""
        b, c, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, 1, h * w, c)
        weight, bias = fused_weights(self, (self.q, self.k, self.v))
        q, k, v = F.linear(tokens, weight, bias).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c)
        out = F.linear(attended, self.proj_out.weight.reshape(c, c), self.proj_out.bias)
        return x + out.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1) then a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``res`` blocks, each followed by its ``attn`` block when there are any."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module]):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class PixelEncoder(nn.Module):
    """Image ``(B, in_channels, H, W)`` -> ``(B, z_channels, H/2^(L-1), W/2^(L-1))``; attention only at the
    deepest level (official ``Encoder``)."""

    def __init__(self, in_channels: int = 3, channels: int = 128, channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, dropout: float = 0.0):
        super().__init__()
        levels = len(channel_multipliers)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = channels
        for level, multiplier in enumerate(channel_multipliers):
            block_out = channels * multiplier
            res, attn = [], []
            for _ in range(num_res_blocks):
                res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if level == levels - 1:
                    attn.append(AttnBlock(block_in))
            stage = _Level(res, attn)
            if level != levels - 1:
                stage.downsample = Downsample(block_in)
            self.conv_blocks.append(stage)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in),
                                  ResnetBlock(block_in, block_in, dropout)])
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if channels_last_inference(x):
            x = x.contiguous(memory_format=torch.channels_last)
        stream = self.conv_in.weight.dtype  # the residual stream keeps it under autocast (a no-op otherwise)
        h = self.conv_in(x).to(stream)
        for stage in self.conv_blocks:
            h = stage(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h).to(stream)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()


class PixelDecoder(nn.Module):
    """``(B, z_channels, h, w)`` -> image ``(B, out_channels, h*2^(L-1), w*2^(L-1))``; the deepest level is
    stored first (``conv_blocks.0``) and is the only one with attention (official ``Decoder``)."""

    def __init__(self, z_channels: int = 256, channels: int = 128, channel_multipliers: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, out_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        levels = len(channel_multipliers)
        block_in = channels * channel_multipliers[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in),
                                  ResnetBlock(block_in, block_in, dropout)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            block_out = channels * channel_multipliers[level]
            res, attn = [], []
            for _ in range(num_res_blocks + 1):
                res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if level == levels - 1:
                    attn.append(AttnBlock(block_in))
            stage = _Level(res, attn)
            if level != 0:
                stage.upsample = Upsample(block_in)
            self.conv_blocks.append(stage)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if channels_last_inference(z):
            z = z.contiguous(memory_format=torch.channels_last)
        stream = self.conv_in.weight.dtype  # the residual stream keeps it under autocast (a no-op otherwise)
        h = self.conv_in(z).to(stream)
        for block in self.mid:
            h = block(h)
        for stage in self.conv_blocks:
            h = stage(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h).to(stream)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()
