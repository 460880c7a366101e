"""The CLIP ViT-L/14-336 text tower in open_clip naming (``token_embedding``, ``positional_embedding``,
``transformer.resblocks.{i}``, ``ln_final``, ``text_projection``): FlowTok's text encoder. FlowTok reads the
``ln_final`` output of all 77 tokens, ``(B, 77, 768)``, not the pooled embedding.

Strings need a BPE tokenizer: :func:`tokenize` uses open_clip's (``pip install open_clip_torch``; it ships the
vocabulary and works offline). Without it, pass token ids ``(B, 77)`` or precomputed features.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from .._checkpoint import load_checked, read_checkpoint
from .._layers import causal_mask
from ..tokenflow.clip_vision import QuickGELU

CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        normed = self.ln_1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([_Block(width, heads) for _ in range(layers)])


class CLIPTextEncoder(nn.Module):
    """Token ids ``(B, 77)`` int64 -> ``ln_final`` features ``(B, 77, width)`` (causal attention).
    Defaults: ViT-L/14-336's text tower (width 768, 12 layers, 12 heads, projection 768)."""

    def __init__(self, width: int = 768, layers: int = 12, heads: int = 12, vocab_size: int = VOCAB_SIZE,
                 context_length: int = CONTEXT_LENGTH, embed_dim: int = 768):
        super().__init__()
        self.context_length, self.vocab_size = context_length, vocab_size
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = _Transformer(width, layers, heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.register_buffer("attn_mask", causal_mask(context_length), persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.dim() != 2 or token_ids.shape[1] != self.context_length:
            raise ValueError(f"CLIPTextEncoder: token ids must be (B, {self.context_length}), got {tuple(token_ids.shape)}")
        if token_ids.is_floating_point() or token_ids.dtype == torch.bool:
            raise TypeError(f"CLIPTextEncoder: token ids must be integers, got {token_ids.dtype}")
        x = self.token_embedding(token_ids) + self.positional_embedding
        mask = self.attn_mask.to(x.dtype)
        for block in self.transformer.resblocks:
            x = block(x, mask)
        return self.ln_final(x)

    def pooled(self, token_ids: torch.Tensor) -> torch.Tensor:
        """CLIP's text embedding: the end-of-text token's feature times ``text_projection``."""
        features = self.forward(token_ids)
        return features[torch.arange(features.shape[0]), token_ids.argmax(dim=-1)] @ self.text_projection

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "CLIPTextEncoder":
        """Load the text tower from a local open_clip / OpenAI CLIP state dict (``visual.*`` and
        ``logit_scale`` are ignored) or a TorchScript OpenAI file."""
        try:
            state, _ = read_checkpoint(path)
        except RuntimeError:  # TorchScript archive (OpenAI's released .pt files)
            state = torch.jit.load(os.fspath(path), map_location="cpu").state_dict()
        text_state = {k: v for k, v in state.items() if not k.startswith("visual.")
                      and k not in ("logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size")}
        with torch.device("meta"):
            model = cls(**kwargs)
        load_checked(model, text_state, strict=True, assign=True)
        model.attn_mask = causal_mask(model.context_length)  # non-persistent: still on the meta device
        return model.eval()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """Strings -> CLIP token ids ``(B, 77)`` with open_clip's BPE tokenizer (ViT-L-14-336)."""
    try:
        import open_clip  # noqa: PLC0415
    except ImportError as error:
        raise ImportError("tokenizing strings needs open_clip (pip install open_clip_torch); or pass CLIP token ids "
                          "(B, 77) or text features (B, 77, 768) instead") from error
    return open_clip.get_tokenizer("ViT-L-14-336")(texts, context_length=context_length)
