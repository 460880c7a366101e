"""CLIP score of generated images against their prompts: ``100 * max(cos(E_img(x), E_txt(c)), 0)`` averaged
over the pairs (the definition of torchmetrics' ``CLIPScore`` and of Hessel et al. without the 2.5 factor).

The encoders come from ``open_clip`` (an optional package) with a weights file the user gives; any pair of
callables ``encode_image(images) -> (B, D)`` and ``encode_text(prompts) -> (B, D)`` works too.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch


def clip_score(images: torch.Tensor, prompts: Sequence[str], encode_image: Callable, encode_text: Callable) -> float:
    """Mean CLIP score of ``images`` (whatever ``encode_image`` takes) against ``prompts`` (one per image)."""
    if len(prompts) != len(images):
        raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
    with torch.no_grad():
        image_features = torch.nn.functional.normalize(encode_image(images).double(), dim=-1)
        text_features = torch.nn.functional.normalize(encode_text(list(prompts)).double(), dim=-1)
    cosine = (image_features * text_features).sum(-1)
    return float((100 * cosine.clamp_min(0)).mean())


def open_clip_encoders(model_name: str, weights: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(encode_image, encode_text)`` of an open_clip model (e.g. ``"ViT-L-14"``) loaded from a local
    ``weights`` file; ``encode_image`` takes ``(B, 3, H, W)`` images in [0, 1] and applies the model's own
    resize and normalisation."""
    try:
        import open_clip  # noqa: PLC0415
    except ImportError as error:
        raise ImportError("the CLIP score needs open_clip: pip install open_clip_torch torch==<your torch version> "
                          "(pinned on the same line, or pip replaces torch)") from error
    if not os.path.isfile(os.fspath(weights)):
        raise FileNotFoundError(f"CLIP weights not found: {weights} (an open_clip checkpoint for {model_name})")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=os.fspath(weights),
                                                                 device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    mean = torch.tensor(getattr(model.visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073))
    std = torch.tensor(getattr(model.visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711))

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        images = torch.nn.functional.interpolate(images.float().to(device), size=(size, size), mode="bicubic",
                                                 align_corners=False, antialias=True).clamp(0, 1)
        return model.encode_image((images - mean.to(device)[:, None, None]) / std.to(device)[:, None, None])

    def encode_text(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(prompts).to(device))

    return encode_image, encode_text
