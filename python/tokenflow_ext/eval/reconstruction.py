"""Reconstruction evaluation of a TokenFlow tokenizer over a folder of images: PSNR, SSIM, LPIPS, rFID and
per-scale codebook usage / perplexity, by the official protocol (``protocol``).

The folder is processed in shards of ``shard_size`` images; each finished shard is written atomically to
``OUT/shards/shard_NNNNN.npz`` (per-image metrics, Inception features of both image sets, code counts per
scale). A rerun with the same settings skips the shards that exist, so an interrupted evaluation of a large
set resumes where it stopped and gives the same report. The report is ``OUT/report.json`` and
``OUT/report.md``; ``OUT/grid.png`` shows the first images over their reconstructions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import warnings
from typing import Any

import numpy as np
import torch

from ..train.data import IMAGE_EXTENSIONS, list_files, require_pillow
from . import protocol

SHARD_FORMAT = 1


@dataclasses.dataclass
class ReconstructionEval:
    """Settings of one evaluation. ``image_size`` defaults to the tokenizer's; ``limit`` takes the first
    images of the sorted file list."""

    data: str
    out_dir: str
    batch_size: int = 8
    shard_size: int = 256
    limit: int | None = None
    image_size: int | None = None
    save_reconstructions: bool = False
    grid: bool = True
    progress: bool = True
    checkpoint: str = ""  # recorded in the report


def _fingerprint(settings: dict[str, Any], files: list[str]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        digest.update(path.encode())
    return digest.hexdigest()[:16]


def _load(path: str, size: int) -> np.ndarray | None:
    from PIL import Image  # noqa: PLC0415

    try:
        with Image.open(path) as image:
            return protocol.center_crop_arr(image, size)
    except Exception as error:  # PIL raises many types for broken files
        warnings.warn(f"skipping unreadable image {path}: {type(error).__name__}: {error}", RuntimeWarning,
                      stacklevel=2)
        return None


class _Scales:
    """Per-scale index counts of a multi-scale tokenizer."""

    def __init__(self, scales: tuple[int, ...], codebook_size: int):
        self.scales, self.codebook_size = scales, codebook_size

    def counts(self, indices: torch.Tensor) -> np.ndarray:
        rows, start = [], 0
        for side in self.scales:
            chunk = indices[:, start:start + side * side].reshape(-1)
            rows.append(torch.bincount(chunk.cpu(), minlength=self.codebook_size).numpy())
            start += side * side
        return np.stack(rows).astype(np.int64)


@torch.no_grad()
def _evaluate_shard(tokenizer, arrays: np.ndarray, batch_size: int, inception, lpips, scales: _Scales,
                    device: torch.device, bar) -> dict[str, np.ndarray]:
    psnr, ssim, lpips_values, real_features, fake_features = [], [], [], [], []
    counts = np.zeros((len(scales.scales), scales.codebook_size), dtype=np.int64)
    reconstructions = []
    for start in range(0, len(arrays), batch_size):
        batch = torch.from_numpy(arrays[start:start + batch_size])
        inputs = protocol.to_model_input(batch).to(device)
        result = tokenizer.encode(inputs)
        decoded = tokenizer.decode_pixels(result.features).float()
        fake = protocol.reconstruction_to_uint8(decoded).cpu()
        truth = ((inputs.cpu().permute(0, 2, 3, 1) + 1.0) / 2.0)  # the unquantised ground truth in [0, 1]
        psnr.append(protocol.psnr(fake.double() / 255.0, truth).numpy())
        ssim.append(protocol.ssim(fake.double() / 255.0, truth).numpy())
        counts += scales.counts(result.indices)
        real_uint8 = torch.clip(truth * 255, 0, 255).to(torch.uint8)  # as the official gts/ PNGs
        if lpips is not None:  # LPIPS on the images in [-1, 1]
            value = lpips(inputs, decoded.clamp(-1, 1).to(inputs.dtype))
            lpips_values.append(value.reshape(-1).double().cpu().numpy())
        if inception is not None:
            real_features.append(_features(inception, real_uint8, device))
            fake_features.append(_features(inception, fake, device))
        reconstructions.append(fake.numpy())
        bar.update(len(batch))
    out = {"psnr": np.concatenate(psnr), "ssim": np.concatenate(ssim), "counts": counts,
           "reconstructions": np.concatenate(reconstructions)}
    if lpips_values:
        out["lpips"] = np.concatenate(lpips_values)
    if real_features:
        out["real_features"] = np.concatenate(real_features)
        out["fake_features"] = np.concatenate(fake_features)
    return out


def _features(inception, images_uint8: torch.Tensor, device: torch.device) -> np.ndarray:
    images = images_uint8.permute(0, 3, 1, 2).to(device).float() / 255.0
    return inception.features(images).double().cpu().numpy()


def _write_npz(path: str, **arrays) -> None:
    temporary = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def evaluate_reconstruction(tokenizer, settings: ReconstructionEval, *, inception=None, lpips=None,
                            device: str | torch.device | None = None) -> dict[str, Any]:
    """Evaluate ``tokenizer`` (a :class:`TokenFlowTokenizer`) on ``settings.data``; returns the report (also
    written to ``settings.out_dir``). ``inception``: a ``FIDInceptionV3`` (rFID) or ``None`` (no rFID);
    ``lpips``: an LPIPS module or ``None``."""
    require_pillow()
    device = torch.device(device) if device is not None else next(tokenizer.parameters()).device
    tokenizer.eval()
    size = settings.image_size or tokenizer.config.image_size
    files = list_files(settings.data, IMAGE_EXTENSIONS)
    if settings.limit is not None:
        files = files[:settings.limit]
    if settings.batch_size < 1 or settings.shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {settings.batch_size}, {settings.shard_size}")
    shard_folder = os.path.join(settings.out_dir, "shards")
    os.makedirs(shard_folder, exist_ok=True)
    recorded = {"checkpoint": settings.checkpoint, "image_size": size, "config": tokenizer.config.name,
                "inception": inception is not None, "lpips": lpips is not None, "format": SHARD_FORMAT}
    scales = _Scales(tuple(tokenizer.config.scales), tokenizer.config.codebook_size)
    from tqdm.auto import tqdm  # noqa: PLC0415

    bar = tqdm(total=len(files), desc="eval reconstruction", unit="img", disable=not settings.progress,
               file=sys.stderr)
    shards, skipped, resumed = [], [], 0
    for number, start in enumerate(range(0, len(files), settings.shard_size)):
        chunk = files[start:start + settings.shard_size]
        path = os.path.join(shard_folder, f"shard_{number:05d}.npz")
        fingerprint = _fingerprint(recorded, chunk)
        if os.path.exists(path):
            with np.load(path) as stored:
                if str(stored["fingerprint"]) == fingerprint:
                    shards.append(dict(stored))
                    resumed += 1
                    bar.update(len(chunk))
                    continue
            raise ValueError(f"{path} was written with other settings or files; use another --out or remove "
                             f"{shard_folder}")
        arrays, names = [], []
        for file in chunk:
            array = _load(file, size)
            if array is None:
                skipped.append(file)
                bar.update(1)
                continue
            arrays.append(array)
            names.append(os.path.relpath(file, settings.data))
        if not arrays:
            result = {"psnr": np.zeros(0), "ssim": np.zeros(0), "counts": np.zeros((len(scales.scales),
                                                                                     scales.codebook_size), np.int64)}
        else:
            result = _evaluate_shard(tokenizer, np.stack(arrays), settings.batch_size, inception, lpips, scales,
                                     device, bar)
        reconstructions = result.pop("reconstructions", None)
        if settings.save_reconstructions and reconstructions is not None:
            _save_pngs(os.path.join(settings.out_dir, "reconstructions"), names, reconstructions)
        if settings.grid and number == 0 and reconstructions is not None:
            _save_grid(os.path.join(settings.out_dir, "grid.png"), np.stack(arrays[:8]), reconstructions[:8])
        result.update(names=np.array(names), skipped=np.array([os.path.relpath(f, settings.data) for f in chunk
                                                               if f in skipped]), fingerprint=np.array(fingerprint))
        _write_npz(path, **result)
        shards.append(result)
    bar.close()
    report = summarise(shards, scales, recorded, len(files))
    write_report(settings.out_dir, report)
    if resumed and settings.progress:
        print(f"eval reconstruction: {resumed} shard(s) taken from {shard_folder}", file=sys.stderr)
    return report


def summarise(shards: list[dict], scales: _Scales, recorded: dict[str, Any], listed: int) -> dict[str, Any]:
    """The report from the shards' arrays (what a resumed evaluation recomputes)."""
    psnr = np.concatenate([s["psnr"] for s in shards])
    ssim = np.concatenate([s["ssim"] for s in shards])
    counts = sum(s["counts"] for s in shards)
    report: dict[str, Any] = {
        "settings": {**recorded, "protocol": "TokenFlow reconstruction_vq_ddp.py: ADM centre crop, uint8 "
                     "reconstructions, scikit-image PSNR (data range 1) and SSIM (7x7 window, data_range=2.0), "
                     "rFID of pt_inception-2015-12-05 pool3 features"},
        "images": int(psnr.size), "listed": listed,
        "skipped": sorted(str(name) for s in shards for name in s["skipped"]),
        "psnr": float(psnr.mean()) if psnr.size else None,
        "ssim": float(ssim.mean()) if ssim.size else None,
        "lpips": None, "rfid": None,
        "scales": [{"scale": side, **protocol.code_usage(torch.from_numpy(row))}
                   for side, row in zip(scales.scales, counts)],
    }
    with_lpips = [s["lpips"] for s in shards if "lpips" in s]
    if recorded["lpips"] and with_lpips:
        report["lpips"] = float(np.concatenate(with_lpips).mean())
    with_features = [s for s in shards if "real_features" in s]
    if recorded["inception"] and with_features:
        from .fid import activation_statistics, frechet_distance  # noqa: PLC0415

        real = np.concatenate([s["real_features"] for s in with_features])
        fake = np.concatenate([s["fake_features"] for s in with_features])
        if len(real) >= 2:
            report["rfid"] = frechet_distance(*activation_statistics(real), *activation_statistics(fake))
    totals = counts.sum(0)
    report["all_scales"] = protocol.code_usage(torch.from_numpy(totals))
    return report


def write_report(out_dir: str, report: dict[str, Any]) -> None:
    with open(os.path.join(out_dir, "report.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as handle:
        handle.write(report_markdown(report))


def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [f"# Reconstruction: {settings['checkpoint'] or settings['config']}", "",
             f"{report['images']} images at {settings['image_size']} px ({len(report['skipped'])} unreadable skipped). "
             f"Protocol: {settings['protocol']}.", "",
             "| PSNR (dB) | SSIM | LPIPS | rFID |", "|---|---|---|---|",
             f"| {_number(report['psnr'], 3)} | {_number(report['ssim'])} | {_number(report['lpips'])} | "
             f"{_number(report['rfid'], 3)} |", "",
             "| scale | codes used | usage | perplexity |", "|---|---|---|---|"]
    for row in report["scales"] + [{"scale": "all", **report["all_scales"]}]:
        lines.append(f"| {row['scale']} | {row['codes_used']} | {row['usage']:.4f} | {row['perplexity']:.1f} |")
    notes = []
    if report["lpips"] is None:
        notes.append("LPIPS: not computed (give --vgg-weights and --lpips-weights).")
    if report["rfid"] is None:
        notes.append("rFID: not computed (give --inception-weights pt_inception-2015-12-05-6726825d.pth).")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _save_pngs(folder: str, names: list[str], images: np.ndarray) -> None:
    from PIL import Image  # noqa: PLC0415

    for name, image in zip(names, images):
        path = os.path.join(folder, os.path.splitext(name)[0] + ".png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image).save(path)


def _save_grid(path: str, originals: np.ndarray, reconstructions: np.ndarray) -> None:
    from PIL import Image  # noqa: PLC0415

    grid = np.concatenate([np.concatenate(list(originals), axis=1), np.concatenate(list(reconstructions), axis=1)])
    Image.fromarray(grid).save(path)
