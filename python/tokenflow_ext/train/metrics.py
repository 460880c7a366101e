"""Evaluation metrics: PSNR, SSIM, codebook usage / perplexity from the quantizer's usage window, and a
reconstruction grid PNG."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (compared in [0, 1], peak 1): ``(B,)``."""
    mse = ((to_unit(reference) - to_unit(reconstruction)) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def ssim(reference: torch.Tensor, reconstruction: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: Gaussian window 11 / sigma 1.5, K1 0.01, K2 0.03, valid region,
    averaged over channels) of images in [-1, 1], compared in [0, 1]: ``(B,)``."""
    x, y = to_unit(reference), to_unit(reconstruction)
    window = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window).to(x.device)
    blur = lambda t: F.conv2d(t, kernel, groups=x.shape[1])  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    sigma_x = blur(x * x) - mu_x ** 2
    sigma_y = blur(y * y) - mu_y ** 2
    sigma_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sigma_x + sigma_y + c2))
    return value.flatten(1).mean(1)


def codebook_stats(window: torch.Tensor, codebook_size: int, filled: int | None = None) -> dict[str, float]:
    """From the quantizer's usage window (``codebook_used``: the most recent indices, newest last):
    ``codes_used`` (distinct codes), ``usage`` (fraction of the codebook) and ``perplexity`` (``exp`` of the
    entropy of the code frequencies), over the ``filled`` newest slots only (the quantizer's
    ``usage_filled``; ``None``: the whole window). Never-filled slots hold zeros that are no code choices."""
    window = window.flatten()
    if filled is not None:
        window = window[window.numel() - min(filled, window.numel()):]
    counts = torch.bincount(window.long(), minlength=codebook_size).double()
    probabilities = counts / counts.sum().clamp_min(1)
    nonzero = probabilities[probabilities > 0]
    entropy = float(-(nonzero * nonzero.log()).sum())
    used = int((counts > 0).sum())
    return {"codes_used": used, "usage": used / codebook_size, "perplexity": math.exp(entropy)}


def save_grid(path: str, originals: torch.Tensor, reconstructions: torch.Tensor) -> str:
    """A PNG with the originals on the top row and their reconstructions below (images in [-1, 1])."""
    from PIL import Image  # noqa: PLC0415

    top = torch.cat(list(to_unit(originals).cpu()), dim=2)
    bottom = torch.cat(list(to_unit(reconstructions).cpu()), dim=2)
    grid = (torch.cat([top, bottom], dim=1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(grid).save(path)
    return path
