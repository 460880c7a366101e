"""Training data: image folders, (image, caption) folders, precomputed FlowTok features, and a resumable
``DistributedSampler``. Nothing is downloaded.

Augmentation is drawn from a generator seeded by ``(seed, epoch, index)``, so a sample looks the same
whatever worker, rank or resume point loads it: a resumed run and a run over several processes see the
exact images an uninterrupted single-process run sees. Unreadable samples are skipped with a warning and
counted (:func:`collate_skipping`); a missing or empty folder is an error at construction.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
FEATURE_EXTENSIONS = (".npy", ".safetensors")


class DataError(ValueError):
    """The data folder is missing, empty or has no usable pairs: the message says which and where."""


def list_files(root: str | os.PathLike, extensions: Sequence[str]) -> list[str]:
    """Files under ``root`` (recursive, sorted) whose names end in ``extensions``; errors for a missing
    folder or no such file."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"data folder not found: {root}" if not os.path.exists(root)
                        else f"data path {root} is not a folder")
    found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root, followlinks=True)
                   for name in names if name.lower().endswith(tuple(extensions)))
    if not found:
        raise DataError(f"data folder {root} holds no files ending in {', '.join(extensions)} (searched recursively)")
    return found


def _augment_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def load_image(path: str, size: int, *, random_crop: bool, flip: bool, rng: np.random.Generator) -> torch.Tensor:
    """RGB ``(3, size, size)`` in [-1, 1]: short side resized to ``size`` (bicubic; a random crop first
    resizes the short side to a random value in [size, 1.25 size], as LlamaGen's ``random_crop_arr``), centre
    or random crop, optional horizontal flip."""
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as image:
        image = image.convert("RGB")
        short = min(image.size)
        target = size if not random_crop else int(rng.integers(size, math.ceil(size * 1.25) + 1))
        scale = target / short
        width, height = max(size, round(image.size[0] * scale)), max(size, round(image.size[1] * scale))
        image = image.resize((width, height), Image.BICUBIC)
        if random_crop:
            left, top = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
        else:
            left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        array = np.asarray(image, dtype=np.float32)
    if flip and rng.random() < 0.5:
        array = array[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1) / 127.5 - 1.0


class _Epoched(Dataset):
    def __init__(self, seed: int):
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def require_pillow() -> None:
    """Reading images needs Pillow (a dependency of the package; an environment may still lack it)."""
    try:
        import PIL.Image  # noqa: F401, PLC0415
    except ImportError:
        raise DataError("reading images needs Pillow, which is not installed in this environment: "
                        "pip install pillow") from None


class ImageFolder(_Epoched):
    """Images under ``root`` (recursive, common formats, any mode converted to RGB) as ``(3, size, size)``
    tensors in [-1, 1]. ``random_crop`` / ``flip`` are the training augmentation; off gives a centre crop.
    An unreadable file yields ``None`` and a warning (see :func:`collate_skipping`)."""

    def __init__(self, root, size: int, *, random_crop: bool = False, flip: bool = False, seed: int = 0,
                 files: Sequence[str] | None = None):
        super().__init__(seed)
        require_pillow()
        self.root, self.size, self.random_crop, self.flip = os.fspath(root), size, random_crop, flip
        self.files = list(files) if files is not None else list_files(root, IMAGE_EXTENSIONS)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            return load_image(path, self.size, random_crop=self.random_crop, flip=self.flip,
                              rng=_augment_generator(self.seed, self.epoch, index))
        except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            warnings.warn(f"skipping unreadable image {path}: {type(error).__name__}: {error}", RuntimeWarning,
                          stacklevel=2)
            return None


class CaptionedImageFolder(ImageFolder):
    """``(image, caption)`` pairs: each image beside a same-name ``.txt`` file. Images without a caption
    are kept in the list and skipped (``None``) when loaded, with a warning, so they are counted."""

    def __getitem__(self, index: int):
        path = self.files[index]
        caption_path = os.path.splitext(path)[0] + ".txt"
        try:
            with open(caption_path, encoding="utf-8") as handle:
                caption = handle.read().strip()
        except OSError as error:
            warnings.warn(f"skipping {path}: no readable caption {caption_path} ({error})", RuntimeWarning,
                          stacklevel=2)
            return None
        image = super().__getitem__(index)
        return None if image is None else (image, caption)


def _read_array(path: str, key: str) -> torch.Tensor:
    if path.endswith(".npy"):
        return torch.from_numpy(np.load(path))
    from safetensors.torch import load_file  # noqa: PLC0415

    tensors = load_file(path)
    return tensors[key] if key in tensors else next(iter(tensors.values()))


class FeaturePairs(Dataset):
    """Precomputed FlowTok pairs: ``root/latents/NAME.npy`` ``(77, 16)`` (FlowTiTok latents) and
    ``root/text/NAME.npy`` ``(77, 768)`` float (CLIP features) or ``(77,)`` int (token ids); ``.safetensors``
    files hold one tensor (``"latent"`` / ``"text"``). A name missing its text file is skipped with a warning."""

    def __init__(self, root):
        self.root = os.fspath(root)
        if not os.path.isdir(os.path.join(self.root, "latents")):
            raise DataError(f"precomputed-feature folder {self.root} needs a 'latents' and a 'text' subfolder")
        self.files = list_files(os.path.join(self.root, "latents"), FEATURE_EXTENSIONS)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        latent_path = self.files[index]
        stem = os.path.splitext(os.path.basename(latent_path))[0]
        for extension in FEATURE_EXTENSIONS:
            text_path = os.path.join(self.root, "text", stem + extension)
            if os.path.exists(text_path):
                break
        else:
            warnings.warn(f"skipping {latent_path}: no text features text/{stem}.npy", RuntimeWarning, stacklevel=2)
            return None
        try:
            return _read_array(latent_path, "latent").float(), _read_array(text_path, "text")
        except Exception as error:
            warnings.warn(f"skipping unreadable pair {stem}: {type(error).__name__}: {error}", RuntimeWarning,
                          stacklevel=2)
            return None


def collate_skipping(samples):
    """Default collation of the samples that loaded; ``None`` ones are dropped and counted. Returns
    ``(batch or None, skipped)`` so the count also crosses worker-process boundaries."""
    from torch.utils.data import default_collate  # noqa: PLC0415

    kept = [sample for sample in samples if sample is not None]
    skipped = len(samples) - len(kept)
    return (default_collate(kept) if kept else None), skipped


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch after its first ``start`` indices (a resumed run
    continues mid-epoch without loading the skipped samples)."""

    def __init__(self, dataset, num_replicas: int, rank: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start
