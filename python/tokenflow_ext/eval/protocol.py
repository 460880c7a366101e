"""The official TokenFlow reconstruction protocol (``tokenflow/tokenizer/reconstruction_vq_ddp.py`` and
``scripts/reconstruction_vq*.sh``), step by step, so our numbers are computed as the published ones:

1. ``center_crop_arr`` (ADM's): halve the image with a box filter while its short side is at least twice the
   target, resize the short side to ``image_size`` (bicubic), centre-crop; then ``[0, 255] -> [-1, 1]``.
2. Encode and decode at ``image_size`` (the clipb_256 tokenizer at 256, siglip_384 at 384).
3. The reconstruction becomes ``uint8`` as ``clamp(127.5 x + 128, 0, 255)`` truncated (the official ``+128``,
   which rounds half up), the ground truth as ``clip(255 g, 0, 255)`` truncated (``g`` in [0, 1]).
4. PSNR and SSIM per image with scikit-image's definitions: PSNR of the reconstruction ``uint8 / 255``
   against the unquantised ground truth ``g`` (data range 1), SSIM with a 7x7 uniform window, sample
   covariances and ``data_range=2.0`` (the official call's value, though the images span [0, 1]; it lowers
   the SSIM constants' weight, and the published SSIM comes from it).
5. rFID between the two ``uint8`` image sets with pytorch-fid's Inception (see ``fid``).

:func:`psnr` and :func:`ssim` are batched torch versions of scikit-image's ``peak_signal_noise_ratio`` and
``structural_similarity(channel_axis=-1)`` (tested against scikit-image on real photographs).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

OFFICIAL_SSIM_DATA_RANGE = 2.0


def center_crop_arr(image, image_size: int) -> np.ndarray:
    """ADM's centre crop of a PIL image: ``(image_size, image_size, 3)`` uint8 RGB."""
    from PIL import Image  # noqa: PLC0415

    image = image.convert("RGB")
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - image_size) // 2, (array.shape[1] - image_size) // 2
    return np.ascontiguousarray(array[top:top + image_size, left:left + image_size])


def to_model_input(arrays: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float32 in [-1, 1] (``ToTensor`` then ``Normalize(0.5, 0.5)``)."""
    tensor = torch.as_tensor(arrays).permute(0, 3, 1, 2).float() / 255.0
    return (tensor - 0.5) / 0.5


def reconstruction_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] ``(B, 3, H, W)`` -> ``(B, H, W, 3)`` uint8, as the official script."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def psnr(reference: torch.Tensor, test: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """scikit-image's ``peak_signal_noise_ratio`` per image of ``(B, H, W, C)`` float arrays: ``(B,)`` float64."""
    reference, test = reference.double(), test.double()
    mse = ((reference - test) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def ssim(reference: torch.Tensor, test: torch.Tensor, data_range: float = OFFICIAL_SSIM_DATA_RANGE,
         window: int = 7) -> torch.Tensor:
    """scikit-image's ``structural_similarity(..., channel_axis=-1)`` per image of ``(B, H, W, C)`` float
    arrays: uniform ``window`` x ``window`` filter, sample covariances (``N / (N - 1)``), K1 0.01, K2 0.03,
    the mean over the interior (a ``(window - 1) // 2`` border cropped) and over channels. ``(B,)`` float64."""
    x = reference.double().permute(0, 3, 1, 2)
    y = test.double().permute(0, 3, 1, 2)
    channels = x.shape[1]
    kernel = torch.full((channels, 1, window, window), 1.0 / window ** 2, dtype=torch.float64, device=x.device)

    def blur(t: torch.Tensor) -> torch.Tensor:  # scipy's uniform_filter in 'reflect' mode, then cropped: 'valid'
        return F.conv2d(t, kernel, groups=channels)

    count = window ** 2
    covariance_norm = count / (count - 1)
    ux, uy = blur(x), blur(y)
    vx = covariance_norm * (blur(x * x) - ux * ux)
    vy = covariance_norm * (blur(y * y) - uy * uy)
    vxy = covariance_norm * (blur(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def code_usage(counts: torch.Tensor) -> dict[str, float]:
    """Usage of one scale's codebook from its index counts ``(K,)``: ``codes_used``, ``usage`` (fraction of
    the codebook) and ``perplexity`` (``exp`` of the entropy of the code frequencies)."""
    counts = counts.double()
    total = float(counts.sum())
    used = int((counts > 0).sum())
    if total == 0:
        return {"codes_used": 0, "usage": 0.0, "perplexity": 0.0}
    p = counts[counts > 0] / total
    return {"codes_used": used, "usage": used / counts.numel(), "perplexity": math.exp(float(-(p * p.log()).sum()))}
