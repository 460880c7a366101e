"""FlowTok's text side after CLIP (the official FlowTok code): the variational text projector ``FlowEncoder``
(official ``context_encoder``), the alignment MLP (``context_projector``), the contrastive alignment loss
and the two KL forms. Official parameter names (``layers.{i}.attn.W_Q``, ``norm1.g``, ``feed_forward.ffn_1``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._layers import projected_attention


class LayerNorm(nn.Module):
    """FlowTok's LayerNorm variant: ``g * (x - mean) / (std_unbiased + eps) + b``. Not ``nn.LayerNorm``
    (biased variance inside the square root): kept as is, since the released weights were trained with it."""

    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.ones(size))
        self.b = nn.Parameter(torch.zeros(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        return self.g * (x - mean) / (x.std(-1, keepdim=True) + self.eps) + self.b


class MultiHeadAttention(nn.Module):
    """Unmasked multi-head self-attention with ``W_Q``, ``W_K``, ``W_V``, ``W_O`` and dropout on the
    attention probabilities."""

    def __init__(self, width: int, heads: int, dropout: float = 0.1):
        super().__init__()
        if width % heads:
            raise ValueError(f"MultiHeadAttention: width {width} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.W_Q = nn.Linear(width, width)
        self.W_K = nn.Linear(width, width)
        self.W_V = nn.Linear(width, width)
        self.W_O = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return projected_attention(x, self.W_Q, self.W_K, self.W_V, self.W_O, self.heads,
                                   self.dropout if self.training else 0.0)


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.ffn_1 = nn.Linear(width, hidden)
        self.ffn_2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_2(self.dropout(F.relu(self.ffn_1(x))))


class EncoderLayer(nn.Module):
    """Post-LN: ``t = norm1(x + drop(attn(x)))``, ``y = norm2(t + drop(ffn(t)))``."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.attn = MultiHeadAttention(width, heads, dropout)
        self.feed_forward = FeedForward(width, hidden, dropout)
        self.norm1, self.norm2 = LayerNorm(width), LayerNorm(width)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm1(x + self.dropout1(self.attn(x)))
        return self.norm2(t + self.dropout2(self.feed_forward(t)))


class FlowEncoder(nn.Module):
    """CLIP token features ``(B, 77, width)`` -> ``(B, 77, 2 * channels)`` = ``[mu, log_var]`` per token
    (6 post-LN layers, 8 heads, ReLU FFN 1024, dropout 0.1 in the official configs)."""

    def __init__(self, width: int = 768, layers: int = 6, heads: int = 8, hidden: int = 1024, channels: int = 16,
                 dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(width, heads, hidden, dropout) for _ in range(layers)])
        self.linear = nn.Linear(width, 2 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.linear(x)


def alignment_mlp(width: int = 768, channels: int = 16) -> nn.Sequential:
    """Official ``context_projector``: per token 768 -> 512 -> 512 -> 16 with SiLU."""
    return nn.Sequential(nn.Linear(width, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(), nn.Linear(512, channels))


def contrastive_alignment_loss(text_latents: torch.Tensor, aligned: torch.Tensor,
                               log_temperature: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between flattened, l2-normalised ``text_latents`` and ``aligned`` (both
    ``(B, 77, 16)``) with logit scale ``exp(log_temperature)``, on the local batch (official form)."""
    a = F.normalize(text_latents.reshape(text_latents.shape[0], -1), dim=-1)
    b = F.normalize(aligned.reshape(aligned.shape[0], -1), dim=-1)
    logits = log_temperature.exp() * a @ b.t()
    targets = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def kl_divergence(mu: torch.Tensor, log_var: torch.Tensor, form: str = "official") -> torch.Tensor:
    """KL term of the text VAE, summed over all elements (as the official code).

    ``"official"``: ``-0.5 * sum(1 + log_var - (0.3 mu)^6 - exp(log_var))`` (FlowTok's form, a sixth power
    of the scaled mean); ``"standard"``: ``-0.5 * sum(1 + log_var - mu^2 - exp(log_var))``, the Gaussian KL
    to N(0, I)."""
    if form == "official":
        penalty = (0.3 * mu) ** 6
    elif form == "standard":
        penalty = mu ** 2
    else:
        raise ValueError(f"kl_divergence: form must be 'official' or 'standard', got {form!r}")
    return -0.5 * torch.sum(1 + log_var - penalty - log_var.exp())


INITIAL_LOG_TEMPERATURE = math.log(1 / 0.07)
