"""``python -m tokenflow_ext tokenize IMAGE... --checkpoint PATH [--config NAME]``: images -> indices
(``<name>.tokens.npy``) and the reconstruction from those indices (``<name>.recon.png``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from .config import CONFIGS


def load_image(path: str, size: int) -> torch.Tensor:
    """RGB image -> ``(1, 3, size, size)`` in [-1, 1]: shorter side resized to ``size`` (bicubic), then a
    centre crop."""
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return (pixels.permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0)


def save_image(image: torch.Tensor, path: str) -> None:
    """``(3, H, W)`` in [-1, 1] -> 8-bit PNG."""
    from PIL import Image  # noqa: PLC0415

    pixels = ((image.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(pixels).save(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="official TokenFlow file or one written by save_pretrained")
    parser.add_argument("--config", choices=sorted(CONFIGS),
                        help="official config (omit for files written by save_pretrained)")
    parser.add_argument("--enhanced-decoder", action="store_true",
                        help="the checkpoint has the enhanced pixel decoder (tokenflow_clipb_32k_enhanced.pt)")
    parser.add_argument("--out-dir", default=".", metavar="DIR", help="where to write the .npy and .png files")
    parser.add_argument("--no-reconstruction", action="store_true", help="write the indices only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    from .tokenizer import TokenFlowTokenizer  # noqa: PLC0415

    missing = [path for path in args.images if not os.path.isfile(path)]
    if missing:
        print(f"tokenize: no such file(s): {missing}", file=sys.stderr)
        return 2
    overrides = {"enhanced_decoder": True} if args.enhanced_decoder else {}
    started = time.perf_counter()
    tokenizer = TokenFlowTokenizer.from_pretrained(args.checkpoint, config=args.config, **overrides).to(args.device)
    print(f"loaded {args.checkpoint} ({tokenizer.config.name}, {tokenizer.tokens_per_image} tokens per image) "
          f"in {time.perf_counter() - started:.2f} s")
    os.makedirs(args.out_dir, exist_ok=True)
    for path in args.images:
        stem = os.path.join(args.out_dir, os.path.splitext(os.path.basename(path))[0])
        images = load_image(path, tokenizer.config.image_size).to(args.device)
        started = time.perf_counter()
        with torch.no_grad():
            indices = tokenizer.tokenize(images)
            encode_seconds = time.perf_counter() - started
            np.save(stem + ".tokens.npy", indices[0].cpu().numpy())
            line = f"{path}: {indices.shape[1]} tokens, encode {encode_seconds:.3f} s -> {stem}.tokens.npy"
            if not args.no_reconstruction:
                started = time.perf_counter()
                save_image(tokenizer.decode_indices(indices)[0], stem + ".recon.png")
                line += f"; decode {time.perf_counter() - started:.3f} s -> {stem}.recon.png"
        print(line)
    return 0
