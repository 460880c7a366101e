"""Tiny TokenFlow configs: the official module layout at a size that runs in milliseconds."""

import torch

from tokenflow_ext.models import TokenFlowTokenizer

TINY = dict(image_size=32, scales=(1, 2, 4), semantic_width=64, semantic_layers=2, semantic_heads=2,
            semantic_patch=8, semantic_mlp_width=128, semantic_pretrain_size=32, decoder_width=64, decoder_heads=2,
            decoder_grid=4, decoder_out_dim=48, codebook_size=64, pixel_channels=32, channel_multipliers=(1, 1, 2, 2),
            encoder_res_blocks=1, decoder_channels=32, decoder_res_blocks=1, z_channels=32)

# clipb_256-like: the CLIP tower stores a 3x3 grid and runs at 4x4 (interpolated positions, as at 256 px).
TINY_CLIP = dict(TINY, semantic_pretrain_size=24, decoder_grid=3)
# siglip_384-like: 30 px input, patch 10 -> 3x3 grid; the pixel branch runs at 24 px and is resized back.
TINY_SIGLIP = dict(TINY, image_size=30, semantic_patch=10, semantic_pretrain_size=30, scales=(1, 2, 3), decoder_grid=3)

TINY_VARIANTS = {"clipb_256": TINY_CLIP, "siglip_384": TINY_SIGLIP}


def tiny_tokenizer(name="clipb_256", seed=0, **overrides):
    torch.manual_seed(seed)
    return TokenFlowTokenizer(name, **dict(TINY_VARIANTS[name], **overrides))


def tiny_images(tokenizer, batch=2, seed=0):
    size = tokenizer.config.image_size
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
