"""The SigLIP vision tower with Hugging Face's parameter names (``vision_model.embeddings.*``,
``vision_model.encoder.layers.{i}.*``, ``vision_model.post_layernorm``, ``vision_model.head.*``), as
TokenFlow's ``encoder_vqkd`` for the siglip teacher (the official TokenFlow code). No dependency on transformers.

TokenFlow reads ``hidden_states[-2]``: the input of the last encoder layer. ``forward_features`` stops
there, so the last layer, ``post_layernorm`` and the pooling head are kept for checkpoint parity (and for
``forward``) but not run by the tokenizer; :meth:`SiglipVisionTower.freeze_unread` turns their gradients
off (as the official TokenFlow training does), so that DDP without ``find_unused_parameters`` works.
"""

from __future__ import annotations

import torch
from torch import nn

from .._layers import GeluMlp, projected_attention


class SiglipAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"SiglipAttention: width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return projected_attention(x, self.q_proj, self.k_proj, self.v_proj, self.out_proj, self.heads)


def SiglipMLP(width: int, mlp_width: int) -> GeluMlp:  # noqa: N802  (Hugging Face's module name)
    return GeluMlp(width, mlp_width, approximate="tanh")


class SiglipEncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = SiglipAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = SiglipMLP(width, mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)
        if tokens.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(f"SiglipVisionTower: {tokens.shape[1]} patches, but the positional embedding has "
                             f"{self.position_embedding.num_embeddings} (input {tuple(x.shape[-2:])})")
        # The residual stream stays in the parameters' dtype: under bf16 autocast only the GEMMs and the
        # patch convolution round to bf16, not the running sum over the 26 layers.
        positions = self.position_embedding.weight
        return tokens.to(positions.dtype) + positions


class SiglipEncoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, eps: float):
        super().__init__()
        self.layers = nn.ModuleList([SiglipEncoderLayer(width, heads, mlp_width, eps) for _ in range(layers)])


class SiglipPoolingHead(nn.Module):
    """Hugging Face's ``SiglipMultiheadAttentionPoolingHead``: a learned probe attends over the tokens."""

    def __init__(self, width: int, heads: int, mlp_width: int, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(width, eps=eps)
        self.mlp = SiglipMLP(width, mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probe = self.probe.expand(x.shape[0], -1, -1)
        pooled = self.attention(probe, x, x, need_weights=False)[0]
        return (pooled + self.mlp(self.layernorm(pooled)))[:, 0]


class SiglipVisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_width: int,
                 eps: float):
        super().__init__()
        self.embeddings = SiglipEmbeddings(image_size, patch_size, width)
        self.encoder = SiglipEncoder(width, layers, heads, mlp_width, eps)
        self.post_layernorm = nn.LayerNorm(width, eps=eps)
        self.head = SiglipPoolingHead(width, heads, mlp_width, eps)


class SiglipVisionTower(nn.Module):
    """Image ``(B, 3, S, S)`` normalised to [-1, 1] per SigLIP -> tokens ``(B, (S/p)^2, width)``.

    ``forward_features(x, layer=-2)`` is ``hidden_states[layer]`` of Hugging Face's ``SiglipVisionModel``
    (``hidden_states[0]`` is the embedding output, ``[-1]`` the last layer's output, before
    ``post_layernorm``). ``forward(x)`` returns ``(post_layernorm(last), pooled)``.
    Defaults: so400m-patch14-384.
    """

    def __init__(self, image_size: int = 384, patch_size: int = 14, width: int = 1152, layers: int = 27,
                 heads: int = 16, mlp_width: int = 4304, eps: float = 1e-6):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(image_size, patch_size, width, layers, heads, mlp_width, eps)

    def forward_features(self, x: torch.Tensor, layer: int = -2) -> torch.Tensor:
        layers = self.vision_model.encoder.layers
        count = len(layers) + 1 + layer if layer < 0 else layer  # number of encoder layers to run
        if not 0 <= count <= len(layers):
            raise ValueError(f"SiglipVisionTower: hidden state {layer} does not exist ({len(layers)} layers)")
        h = self.vision_model.embeddings(x)
        for block in layers[:count]:
            h = block(h)
        return h

    def freeze_unread(self, layer: int = -2) -> list[str]:
        """``requires_grad_(False)`` on what ``forward_features(x, layer)`` does not run: the later encoder
        layers, ``post_layernorm`` and ``head`` (so400m at ``layer=-2``: 29 tensors). Returns their names."""
        layers = self.vision_model.encoder.layers
        count = len(layers) + 1 + layer if layer < 0 else layer
        unread = [layers[i] for i in range(count, len(layers))]
        unread += [self.vision_model.post_layernorm, self.vision_model.head]
        ids = {id(p) for module in unread for p in module.parameters()}
        names = [name for name, p in self.named_parameters() if id(p) in ids]
        for module in unread:
            module.requires_grad_(False)
        return names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        last = self.vision_model.post_layernorm(self.forward_features(x, layer=-1))
        return last, self.vision_model.head(last)
