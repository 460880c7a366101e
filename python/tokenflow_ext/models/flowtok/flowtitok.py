"""FlowTiTok: FlowTok's 1-D VAE image tokenizer (TA-TiTok with 2-D RoPE and SwiGLU; the official FlowTok code).

Images ``(B, 3, S, S)`` in [0, 1] <-> latents ``(B, 16, 1, 77)``. Encoder: ViT-B (patch 16) over
``[patches, 77 latent tokens]`` with RoPE on the patch tokens' q and k; ``ln_post`` + 1x1 conv to
``[mu, log_var]``. Decoder: ViT-L over ``[mask tokens (grid^2), latents, 77 CLIP text tokens]`` with RoPE
on the mask tokens; 1x1 conv to ``16*16*3``, pixel shuffle, 3x3 conv. Official parameter names, including
the RoPE tables ``positional_embedding.freqs_cos`` / ``freqs_sin`` that the released files store.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checkpoint import load_checked, read_checkpoint
from .._inference import inference_when_eval
from .._layers import randn_like_on, trunc_normal_init_
from ..tokenflow.tokenizer import check_image_range

VIT_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}  # width, layers, heads
SCALE_FACTOR = 1.0143  # latents are multiplied by it for the flow model and divided before decoding
LOG_VAR_RANGE = (-30.0, 20.0)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs ``(x0, x1) -> (-x1, x0)``."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class RotaryEmbedding2D(nn.Module):
    """Axial 2-D RoPE over a ``grid x grid`` patch layout (official ``VisionRotaryEmbeddingFast`` with
    ``dim = head_dim / 2``, theta 10000): the first half of each head's channels rotates with the row, the
    second with the column, in interleaved pairs. Tables are persistent buffers ``(grid^2, head_dim)``."""

    def __init__(self, half_head_dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / theta ** (torch.arange(0, half_head_dim, 2)[:half_head_dim // 2].float() / half_head_dim)
        angles = torch.arange(grid).float()[:, None] * freqs[None]       # (grid, half/2)
        angles = angles.repeat_interleave(2, dim=-1)                     # (grid, half)
        table = torch.cat([angles[:, None, :].expand(grid, grid, -1), angles[None, :, :].expand(grid, grid, -1)],
                          dim=-1).reshape(grid * grid, -1)               # rows first, then columns
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.freqs_cos.to(x.dtype) + rotate_pairs(x) * self.freqs_sin.to(x.dtype)


class RoPEAttention(nn.Module):
    """Self-attention; RoPE on q and k of the first ``rope_tokens`` positions only."""

    def __init__(self, width: int, heads: int, rope_tokens: int):
        super().__init__()
        self.heads, self.rope_tokens = heads, rope_tokens
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        r = self.rope_tokens
        q = torch.cat([rope(q[:, :, :r]), q[:, :, r:]], dim=2)
        k = torch.cat([rope(k[:, :, :r]), k[:, :, r:]], dim=2)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class SwiGLU(nn.Module):
    """``w3(silu(x1) * x2)`` with ``[x1, x2] = w12(x)``; hidden ``int(2/3 * 4 * width)``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class RoPEBlock(nn.Module):
    def __init__(self, width: int, heads: int, rope_tokens: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = RoPEAttention(width, heads, rope_tokens)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = SwiGLU(width, int(2 / 3 * 4 * width))

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding2D) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


def _vit(size: str | tuple[int, int, int]) -> tuple[int, int, int]:
    if isinstance(size, str):
        if size not in VIT_SIZES:
            raise ValueError(f"FlowTiTok: unknown ViT size {size!r}; choose from {list(VIT_SIZES)}")
        return VIT_SIZES[size]
    return tuple(size)


class FlowTiTokEncoder(nn.Module):
    def __init__(self, image_size: int, patch_size: int, size, latent_tokens: int, token_size: int):
        super().__init__()
        width, layers, heads = _vit(size)
        self.width, self.grid, self.latent_tokens, self.token_size = width, image_size // patch_size, latent_tokens, token_size
        scale = width ** -0.5
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
        self.positional_embedding = RotaryEmbedding2D(width // heads // 2, self.grid)
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(latent_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([RoPEBlock(width, heads, self.grid ** 2) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.conv_out = nn.Conv2d(width, 2 * token_size, kernel_size=1)

    def forward(self, images: torch.Tensor, latent_tokens: torch.Tensor) -> torch.Tensor:
        """-> posterior parameters ``(B, 2 * token_size, 1, latent_tokens)``."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        latents = (latent_tokens + self.latent_token_positional_embedding).to(x.dtype).expand(x.shape[0], -1, -1)
        x = self.ln_pre(torch.cat([x, latents], dim=1))
        for block in self.transformer:
            x = block(x, self.positional_embedding)
        latents = self.ln_post(x[:, self.grid ** 2:])                       # (B, L, width)
        return self.conv_out(latents.transpose(1, 2).unsqueeze(-1)).squeeze(-1).unsqueeze(2)


class FlowTiTokDecoder(nn.Module):
    def __init__(self, image_size: int, patch_size: int, size, latent_tokens: int, token_size: int,
                 text_tokens: int = 77, text_dim: int = 768):
        super().__init__()
        width, layers, heads = _vit(size)
        self.width, self.grid, self.patch_size = width, image_size // patch_size, patch_size
        self.latent_tokens, self.text_tokens = latent_tokens, text_tokens
        scale = width ** -0.5
        self.decoder_embed = nn.Linear(token_size, width)
        self.positional_embedding = RotaryEmbedding2D(width // heads // 2, self.grid)
        self.mask_token = nn.Parameter(scale * torch.randn(1, 1, width))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(latent_tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([RoPEBlock(width, heads, self.grid ** 2) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Conv2d(width, patch_size * patch_size * 3, 1))
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)
        self.text_guidance_proj = nn.Linear(text_dim, width)
        self.text_guidance_positional_embedding = nn.Parameter(scale * torch.randn(text_tokens, width))

    def forward(self, latents: torch.Tensor, text_guidance: torch.Tensor) -> torch.Tensor:
        b = latents.shape[0]
        x = self.decoder_embed(latents.flatten(1, 2).transpose(1, 2)) + self.latent_token_positional_embedding
        masks = self.mask_token.to(x.dtype).expand(b, self.grid ** 2, -1)
        text = self.text_guidance_proj(text_guidance) + self.text_guidance_positional_embedding
        x = self.ln_pre(torch.cat([masks, x, text], dim=1))
        for block in self.transformer:
            x = block(x, self.positional_embedding)
        x = self.ln_post(x[:, :self.grid ** 2]).transpose(1, 2).reshape(b, self.width, self.grid, self.grid)
        # 'b (p1 p2 c) h w -> b c (h p1) (w p2)'
        p = self.patch_size
        pixels = self.ffn(x).reshape(b, p, p, 3, self.grid, self.grid).permute(0, 3, 4, 1, 5, 2)
        return self.conv_out(pixels.reshape(b, 3, self.grid * p, self.grid * p))


class Posterior(NamedTuple):
    """The diagonal Gaussian over latents ``(B, token_size, 1, L)``; ``log_var`` clamped to [-30, 20]."""
    mean: torch.Tensor
    log_var: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean + torch.exp(0.5 * self.log_var) * randn_like_on(self.mean, generator)

    def kl(self) -> torch.Tensor:
        """``0.5 * sum(mean^2 + var - 1 - log_var)`` over channels and tokens, per sample ``(B,)``."""
        return 0.5 * torch.sum(self.mean ** 2 + self.log_var.exp() - 1.0 - self.log_var, dim=[1, 2, 3])


class FlowTiTok(nn.Module):
    """``tokenizer = FlowTiTok()`` (256 px; ``FlowTiTok(image_size=512)`` for ``FlowTiTok_512.bin``).

    - ``encode(images)`` -> flow-ready latents ``(B, 77, 16)``: a posterior sample (``sample=False``: the
      mean) times ``scale_factor`` (1.0143); ``posterior(images)`` gives the distribution itself.
    - ``decode(latents, text)`` -> images ``(B, 3, S, S)`` in [0, 1] (clamped): divides by ``scale_factor``
      and decodes with the CLIP text tokens ``(B, 77, 768)`` as guidance.
    """

    def __init__(self, image_size: int = 256, patch_size: int = 16, encoder_size="base", decoder_size="large",
                 latent_tokens: int = 77, token_size: int = 16, text_dim: int = 768,
                 scale_factor: float = SCALE_FACTOR):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"FlowTiTok: image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.token_size, self.num_latent_tokens = image_size, token_size, latent_tokens
        self.text_dim, self.scale_factor = text_dim, scale_factor
        self.settings = dict(image_size=image_size, patch_size=patch_size, encoder_size=encoder_size,
                             decoder_size=decoder_size, latent_tokens=latent_tokens, token_size=token_size,
                             text_dim=text_dim, scale_factor=scale_factor)  # what save_pretrained records
        self.encoder = FlowTiTokEncoder(image_size, patch_size, encoder_size, latent_tokens, token_size)
        self.decoder = FlowTiTokDecoder(image_size, patch_size, decoder_size, latent_tokens, token_size,
                                        latent_tokens, text_dim)
        self.latent_tokens = nn.Parameter(self.encoder.width ** -0.5 * torch.randn(latent_tokens, self.encoder.width))
        trunc_normal_init_(self, kinds=(nn.Linear, nn.Conv2d))

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1:] != (3, size, size):
            raise ValueError(f"FlowTiTok: images must be (B, 3, {size}, {size}) in [0, 1], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if not images.is_floating_point():
            note = (" (uint8 images are not accepted: convert with images.float() / 255)"
                    if images.dtype == torch.uint8 else "")
            raise TypeError(f"FlowTiTok: images must be floating point in [0, 1], got {images.dtype}{note}")
        check_image_range(images, "FlowTiTok", 0.0, 1.0)

    def posterior(self, images: torch.Tensor) -> Posterior:
        self._check_images(images)
        parameters = self.encoder(images, self.latent_tokens).float()
        mean, log_var = parameters.chunk(2, dim=1)
        return Posterior(mean, log_var.clamp(*LOG_VAR_RANGE))

    @inference_when_eval
    def encode(self, images: torch.Tensor, *, sample: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, 3, S, S)`` in [0, 1] -> scaled latents ``(B, 77, 16)`` for the flow model."""
        posterior = self.posterior(images)
        latents = posterior.sample(generator) if sample else posterior.mean
        return (latents.squeeze(2).transpose(1, 2) * self.scale_factor).to(images.dtype)

    @inference_when_eval
    def decode(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, 77, 16)`` and CLIP tokens ``(B, 77, 768)`` -> images in [0, 1]."""
        if latents.dim() != 3 or latents.shape[1:] != (self.num_latent_tokens, self.token_size):
            raise ValueError(f"FlowTiTok: latents must be (B, {self.num_latent_tokens}, {self.token_size}), "
                             f"got {tuple(latents.shape)}")
        if text.dim() != 3 or text.shape[1:] != (self.decoder.text_tokens, self.text_dim) or text.shape[0] != latents.shape[0]:
            raise ValueError(f"FlowTiTok: text must be ({latents.shape[0]}, {self.decoder.text_tokens}, {self.text_dim}), "
                             f"got {tuple(text.shape)}")
        unscaled = (latents / self.scale_factor).transpose(1, 2).unsqueeze(2)
        return self.decoder(unscaled, text).clamp(0.0, 1.0)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, strict: bool = True, filename: str | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool | None = None, **kwargs) -> "FlowTiTok":
        """Load ``FlowTiTok_512.bin`` (or a 256 px file): the resolution is read from the stored RoPE table
        unless ``image_size`` is given. Strict by default. Eval mode. ``path`` may be a Hub id
        (``"turkeyju/FlowTok/FlowTiTok_512.bin"``, or the repository with ``filename=``; :mod:`tokenflow_ext.hub`)."""
        from ... import hub  # noqa: PLC0415
        from .. import _folder  # noqa: PLC0415

        path = hub.resolve_file(path, filename, revision=revision, cache_dir=cache_dir,
                                local_files_only=local_files_only)
        if _folder.is_model_folder(path):
            state, config = _folder.load_folder(path)
            stored = config.get("tokenflow_ext", {})
        else:
            state, metadata = read_checkpoint(path)
            stored = json.loads(metadata["flowtitok"]) if "flowtitok" in metadata else {}
        kwargs = {**stored, **kwargs}  # what save_pretrained recorded, unless given here
        table = state.get("decoder.positional_embedding.freqs_cos")
        if table is not None and "image_size" not in kwargs:
            kwargs["image_size"] = round(table.shape[0] ** 0.5) * kwargs.get("patch_size", 16)
        with torch.device("meta"):
            model = cls(**kwargs)
        load_checked(model, state, strict=strict, assign=True)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> str:
        """The weights (the released file's keys) and the constructor settings: a torch file for a ``.pt`` /
        ``.pth`` / ``.bin`` path, one ``.safetensors`` file, or otherwise a Hugging Face-layout folder
        (indexed shards above ``max_shard_bytes``); :meth:`from_pretrained` reads each back."""
        from .._checkpoint import write_checkpoint  # noqa: PLC0415
        from .. import _folder  # noqa: PLC0415

        if os.fspath(path).endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt")):
            return write_checkpoint(path, self.state_dict(), {"flowtitok": self.settings})
        return _folder.save_folder(path, self.state_dict(), {"tokenflow_ext": self.settings, "model_type": "flowtitok"},
                                   max_shard_bytes=max_shard_bytes or _folder.DEFAULT_SHARD_BYTES)
