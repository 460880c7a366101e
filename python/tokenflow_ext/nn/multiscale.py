"""MultiScaleQuantizer: the VAR-style residual loop of TokenFlow's ``encode`` / ``decode_code``."""

from __future__ import annotations

import random
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dual_codebook import DualCodebookQuantizer

# The official scale lists (TokenFlow `scale_rq_layers`); tokens per image = sum of s^2.
SCALE_PRESETS: dict[str, tuple[int, ...]] = {
    "clipb_224": (1, 2, 4, 6, 8, 10, 12, 14),  # 561 tokens
    "clipb_256": (1, 2, 4, 6, 8, 10, 12, 14, 16),  # 817 tokens (clipb_224 + infer_interpolate, the t2i tokenizer)
    "vitamin_256": (1, 2, 4, 6, 8, 10, 12, 14, 16),  # 817 tokens
    "siglip_384": (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 17, 22, 27),  # 2227 tokens
}


class MultiScaleQuantizer(nn.Module):
    """Residual multi-scale quantization over one shared-index dual codebook (TokenFlow ``enable_var``).

    For each scale ``s`` (the last one is the feature size ``S``): area-downsample the residual to
    ``s x s``, quantize it, bicubic-upsample the result to ``S x S`` (``align_corners=False``), add it to
    the output and subtract it, detached, from the residual. Losses are averaged over scales (``None``
    stays ``None``); indices are concatenated scale by scale, row-major within a scale: ``(B, sum s^2)``.

    In training, with probability ``drop_probability`` (official: 0.1) ``drop_count`` scales (official: 1)
    chosen uniformly among all but the first are skipped for that step, as the official code does with
    Python's ``random`` module (pass ``rng`` for a private ``random.Random``).

    An empty batch (``B = 0``) gives zero losses (with a warning in training) instead of NaN means.

    The quantizer is stored as ``self.quantize``, so state-dict keys read ``quantize.embedding_vqkd.weight``
    as in TokenFlow's checkpoints.
    """

    def __init__(self, quantizer: DualCodebookQuantizer, scales: str | Sequence[int] = "siglip_384", *,
                 random_scale_drop: bool = True, drop_probability: float = 0.1, drop_count: int = 1,
                 rng: random.Random | None = None):
        super().__init__()
        if isinstance(scales, str):
            if scales not in SCALE_PRESETS:
                raise ValueError(f"MultiScaleQuantizer: unknown preset {scales!r}; choose from {sorted(SCALE_PRESETS)}")
            scales = SCALE_PRESETS[scales]
        scales = tuple(int(s) for s in scales)
        if not scales or min(scales) < 1:
            raise ValueError(f"MultiScaleQuantizer: scales must be positive ints, got {scales}")
        if drop_count < 0 or (random_scale_drop and drop_probability > 0 and 0 < drop_count
                              and drop_count >= len(scales) - 1):
            raise ValueError(f"MultiScaleQuantizer: cannot drop {drop_count} of {len(scales)} scales "
                             "(scale 0 is never dropped and one more must remain)")
        self.quantize = quantizer
        self.scales = scales
        self.random_scale_drop = random_scale_drop
        self.drop_probability = drop_probability
        self.drop_count = drop_count
        self.rng = rng or random

    @property
    def tokens_per_image(self) -> int:
        return sum(s * s for s in self.scales)

    def extra_repr(self) -> str:
        return f"scales={self.scales}, tokens_per_image={self.tokens_per_image}"

    def _scales_this_step(self) -> tuple[int, ...]:
        if not (self.training and self.random_scale_drop and self.drop_count > 0):
            return self.scales
        if self.rng.random() >= self.drop_probability:
            return self.scales
        dropped = set(self.rng.sample(range(1, len(self.scales)), self.drop_count))
        return tuple(s for i, s in enumerate(self.scales) if i not in dropped)

    def forward(self, h: torch.Tensor):
        """h ``(B, Ds + Dp, S, S)`` with ``S = scales[-1]`` -> ``(features (B, C, S, S), losses, indices)``."""
        size = self.scales[-1]
        if h.dim() != 4 or h.shape[-2:] != (size, size):
            raise ValueError(f"MultiScaleQuantizer: h must be (B, C, {size}, {size}) for scales {self.scales}, "
                             f"got {tuple(h.shape)}")
        residual = h
        features = 0.0
        all_losses, all_indices = [], []
        for scale in self._scales_this_step():
            residual_s = F.interpolate(residual, size=(scale, scale), mode="area")
            quantized, losses, info = self.quantize(residual_s)
            upsampled = F.interpolate(quantized, size=(size, size), mode="bicubic")
            features = features + upsampled
            residual = residual - upsampled.detach()
            all_losses.append(losses)
            all_indices.append(info[-1].reshape(-1, scale * scale))
        averaged = tuple(None if group[0] is None else sum(group) / len(group) for group in zip(*all_losses))
        if h.shape[0] == 0:  # means over no rows are NaN: report zeros instead (after the quantizer ran, so
            # that k-means / EMA collectives still happen on this rank under torch.distributed)
            if self.training:
                warnings.warn("MultiScaleQuantizer: empty batch (B = 0); its losses are reported as zeros",
                              RuntimeWarning, stacklevel=2)
            averaged = tuple(torch.nan_to_num(value, nan=0.0) if isinstance(value, torch.Tensor) else value
                             for value in averaged)
        return features, averaged, torch.cat(all_indices, dim=1)

    def scales_for_length(self, num_tokens: int) -> tuple[int, ...]:
        """The prefix of the scale list whose token count is ``num_tokens`` (ValueError if there is none)."""
        total, used = 0, []
        for scale in self.scales:
            if total + scale * scale > num_tokens:
                break
            used.append(scale)
            total += scale * scale
            if total == num_tokens:
                return tuple(used)
        prefixes = [sum(s * s for s in self.scales[:i + 1]) for i in range(len(self.scales))]
        raise ValueError(f"MultiScaleQuantizer: {num_tokens} tokens is no prefix of scales {self.scales}; "
                         f"valid lengths are {prefixes}")

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` indices of a scale prefix -> summed features ``(B, C, S, S)`` (``decode_code``'s input)."""
        if indices.dim() != 2:
            raise ValueError(f"MultiScaleQuantizer: indices must be (B, L), got {tuple(indices.shape)}")
        size = self.scales[-1]
        features = 0.0
        position = 0
        for scale in self.scales_for_length(indices.shape[1]):
            rows = self.quantize.get_codebook_entry(indices[:, position:position + scale * scale])
            position += scale * scale
            grid = rows.reshape(indices.shape[0], scale, scale, rows.shape[-1]).permute(0, 3, 1, 2)
            features = features + F.interpolate(grid, size=(size, size), mode="bicubic")
        return features
