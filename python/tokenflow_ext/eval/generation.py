"""FID of a folder of generated images against a reference folder or reference statistics (``.npz`` with
``mu`` / ``sigma``, ours or the ADM/OpenAI reference-batch form), pytorch-fid's protocol: each image read as
RGB ``uint8``, scaled to [0, 1] at its own size, resized to 299 px inside the Inception network, pool3
features, statistics in float64, the Fréchet distance (``fid.frechet_distance``).
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import torch

from ..train.data import IMAGE_EXTENSIONS, list_files, require_pillow


def folder_features(folder: str, inception, *, batch_size: int = 32, device: str | torch.device = "cpu",
                    limit: int | None = None, progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """``(features (N, 2048) float64, unreadable files)`` of the images under ``folder`` (sorted). Images of
    different sizes go in separate batches (each is resized to 299 px by the network, as pytorch-fid)."""
    require_pillow()
    from PIL import Image  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    files = list_files(folder, IMAGE_EXTENSIONS)[:limit]
    features, pending, skipped = [], [], []

    def flush():
        if pending:
            batch = torch.from_numpy(np.stack(pending)).permute(0, 3, 1, 2).to(device).float() / 255.0
            with torch.no_grad():
                features.append(inception.features(batch).double().cpu().numpy())
            pending.clear()

    for path in tqdm(files, desc=f"fid {os.path.basename(folder.rstrip('/'))}", unit="img", disable=not progress,
                     file=sys.stderr):
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except Exception as error:  # PIL raises many types for broken files
            warnings.warn(f"skipping unreadable image {path}: {type(error).__name__}: {error}", RuntimeWarning,
                          stacklevel=2)
            skipped.append(path)
            continue
        if pending and (array.shape != pending[0].shape or len(pending) == batch_size):
            flush()
        pending.append(array)
    flush()
    if not features:
        raise ValueError(f"{folder}: no readable image")
    return np.concatenate(features), skipped


def statistics_of(source: str, inception, **kwargs) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, count)`` of a folder (computed) or an ``.npz`` (read; count -1 when it holds none)."""
    from .fid import activation_statistics, load_statistics  # noqa: PLC0415

    if source.endswith(".npz"):
        mu, sigma = load_statistics(source)
        return mu, sigma, -1
    if inception is None:
        raise ValueError(f"{source}: computing statistics of a folder needs the Inception weights "
                         "(--inception-weights)")
    features, _ = folder_features(source, inception, **kwargs)
    mu, sigma = activation_statistics(features)
    return mu, sigma, len(features)


def fid_between(generated: str, reference: str, inception, *, save_stats: str | None = None,
                **kwargs) -> dict[str, float | int | str]:
    """FID of the images in ``generated`` against ``reference`` (a folder or ``.npz``); ``save_stats`` writes
    the generated set's statistics as ``.npz`` for reuse."""
    from .fid import frechet_distance, save_statistics  # noqa: PLC0415

    mu_g, sigma_g, count_g = statistics_of(generated, inception, **kwargs)
    mu_r, sigma_r, count_r = statistics_of(reference, inception, **kwargs)
    if save_stats:
        save_statistics(save_stats, mu_g, sigma_g)
    return {"fid": frechet_distance(mu_g, sigma_g, mu_r, sigma_r), "generated": generated, "reference": reference,
            "generated_images": count_g, "reference_images": count_r}


def folder_clip_score(folder: str, encode_image, encode_text, *, batch_size: int = 32,
                      limit: int | None = None) -> tuple[float, int]:
    """``(mean CLIP score, pairs)`` of the images under ``folder`` against the prompt in each one's same-name
    ``.txt`` file (images without one are left out, with a warning)."""
    from PIL import Image  # noqa: PLC0415

    from .clip_score import clip_score  # noqa: PLC0415

    total, count, images, prompts = 0.0, 0, [], []

    def flush():
        nonlocal total, count
        if images:
            batch = torch.stack(images)
            total += clip_score(batch, prompts, encode_image, encode_text) * len(images)
            count += len(images)
            images.clear()
            prompts.clear()

    for path in list_files(folder, IMAGE_EXTENSIONS)[:limit]:
        caption = os.path.splitext(path)[0] + ".txt"
        if not os.path.exists(caption):
            warnings.warn(f"{path}: no prompt file {caption}; left out of the CLIP score", RuntimeWarning, stacklevel=2)
            continue
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        if images and (images[0].shape[1:] != array.shape[:2] or len(images) == batch_size):
            flush()
        images.append(torch.from_numpy(array).permute(2, 0, 1).float() / 255.0)
        with open(caption, encoding="utf-8") as handle:
            prompts.append(handle.read().strip())
    flush()
    if not count:
        raise ValueError(f"{folder}: no image with a same-name .txt prompt for the CLIP score")
    return total / count, count
