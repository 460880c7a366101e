"""A small text decoder for FlowTok's image -> text direction: 77x16 text latents -> CLIP token ids.

The official FlowTok release has no text decoder, so this one is ours: non-autoregressive, one token per
latent position (the text latents are 77 tokens, like CLIP's context): ``Linear(16 -> width)`` plus learned
positions, ``layers`` pre-LN Transformer encoder layers, ``LayerNorm``, ``Linear(width -> vocab)``. Train it
with :meth:`loss` on pairs ``(text latents, token ids)``; the latents come from the text projector
(``FlowTransformer.encode_text(..., sample=False)``) of the same captions, and at inference from the
reverse flow (``FlowTok.image_to_text``). Padding after the end-of-text token is predicted like any token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TextDecoder(nn.Module):
    def __init__(self, vocab_size: int = 49408, tokens: int = 77, channels: int = 16, width: int = 512,
                 layers: int = 4, heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.tokens, self.channels, self.vocab_size = tokens, channels, vocab_size
        self.embed = nn.Linear(channels, width)
        self.positions = nn.Parameter(0.02 * torch.randn(tokens, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Text latents ``(B, 77, 16)`` -> logits ``(B, 77, vocab_size)``."""
        if latents.dim() != 3 or latents.shape[1:] != (self.tokens, self.channels):
            raise ValueError(f"TextDecoder: latents must be (B, {self.tokens}, {self.channels}), got {tuple(latents.shape)}")
        return self.head(self.norm(self.transformer(self.embed(latents) + self.positions)))

    def loss(self, latents: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the token ids ``(B, 77)`` given the latents."""
        logits = self.forward(latents)
        return F.cross_entropy(logits.reshape(-1, self.vocab_size), token_ids.reshape(-1).long())

    @torch.no_grad()
    def generate(self, latents: torch.Tensor) -> torch.Tensor:
        """Greedy token ids ``(B, 77)``."""
        return self.forward(latents).argmax(dim=-1)
