"""``python -m tokenflow_ext tokenize IMAGE... --checkpoint PATH [--config NAME]``: images -> indices
(``<name>.tokens.npy``) and the reconstruction from those indices (``<name>.recon.png``), written to
``--out-dir`` (default: the current folder).

Setup problems (a missing or unreadable checkpoint, an unusable ``--out-dir``, ``--device cuda`` without
CUDA) stop the command before any image with a one-line error and exit status 2. A file that cannot be
tokenized (missing, not an image, corrupt, truncated) gets a one-line error; the other files are still
processed and the exit status is 1 at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

import numpy as np
import torch

from .config import CONFIGS


def _convert(image):
    """A Pillow image of any mode -> ``("F", grey image in [0, 1])`` for 16-bit and float sources, else
    ``("RGB", 8-bit image)``.

    16-bit modes (``I;16*``, and ``I`` holding values above 255) are divided by 65535, ``I`` with 8-bit
    values by 255 (``convert("RGB")`` would clip them: a 16-bit PNG came out mostly white); float (``F``)
    images are taken as [0, 1] when their maximum is at most 1, else as 0-255. Transparency (RGBA, LA,
    palette or RGB with a transparent colour) is composited on white. Other modes go through
    ``convert("RGB")``.
    """
    from PIL import Image  # noqa: PLC0415

    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = float(np.nanmax(values)) if values.size else 0.0
        if mode == "F":
            values = values if top <= 1.0 else values / 255.0
        else:
            values = values / (65535.0 if mode.startswith("I;16") or top > 255 else 255.0)
        values = np.nan_to_num(np.clip(values, 0.0, 1.0), nan=0.0).astype(np.float32)
        return "F", Image.fromarray(values, mode="F")
    if mode in ("RGBA", "LA", "RGBa", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return "RGB", image.convert("RGB")


def load_image(path: str, size: int) -> torch.Tensor:
    """Image file -> ``(1, 3, size, size)`` in [-1, 1]: shorter side resized to ``size`` (bicubic), then a
    centre crop. 16-bit and float images keep their range (see :func:`_convert`); transparent images are
    composited on white. A corrupt or truncated file raises here, not later."""
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as source:
        source.load()  # decode now: a truncated or corrupt file fails here
        kind, image = _convert(source)
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    if kind == "F":
        return pixels.clamp(0.0, 1.0).expand(1, 3, -1, -1) * 2.0 - 1.0
    return pixels.permute(2, 0, 1).unsqueeze(0) / 127.5 - 1.0


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
    parser.add_argument("--out-dir", default=".", metavar="DIR",
                        help="where to write NAME.tokens.npy and NAME.recon.png (created if missing; default: the "
                             "current folder, with existing files of those names replaced)")
    parser.add_argument("--no-reconstruction", action="store_true", help="write the indices only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def config_label(config) -> str:
    """What the loaded config is, for the ``loaded PATH (...)`` line: an official name only when every field is
    that config's (``clipb_256, enhanced decoder`` for that variant); a config named after an official one but
    differing from it (a training run's overrides) is ``custom config based on NAME`` with the fields that differ
    (up to five); any other is ``custom config 'NAME'`` (the name a .json config file gave it)."""
    import dataclasses  # noqa: PLC0415

    official = CONFIGS.get(config.name)
    if official is not None:
        if config == official:
            return config.name
        if config == official.replace(enhanced_decoder=True):
            return f"{config.name}, enhanced decoder"
        changed = [f.name for f in dataclasses.fields(config)
                   if f.compare and getattr(config, f.name) != getattr(official, f.name)]
        shown = ", ".join(changed[:5]) + (f", ... ({len(changed) - 5} more)" if len(changed) > 5 else "")
        return f"custom config based on {config.name}, changed: {shown}"
    return f"custom config {config.name!r}"


def output_stems(paths: list[str], out_dir: str) -> list[str]:
    """``out_dir/<name>`` per input; inputs that share a file name get ``-2``, ``-3``... in order, so that no
    output overwrites another's."""
    names = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    totals, seen = Counter(names), Counter()
    stems = []
    for name in names:
        seen[name] += 1
        unique = name if totals[name] == 1 or seen[name] == 1 else f"{name}-{seen[name]}"
        while unique != name and unique in totals:  # "a-2" already taken by an input named a-2
            seen[name] += 1
            unique = f"{name}-{seen[name]}"
        stems.append(os.path.join(out_dir, unique))
    return stems


def _fail(message: str) -> int:
    print(f"tokenize: {message}", file=sys.stderr)
    return 2


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) < 300 else text[:297] + "..."


def run(args: argparse.Namespace) -> int:
    from .tokenizer import TokenFlowTokenizer  # noqa: PLC0415

    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        return _fail(f"--device {args.device!r}: {_one_line(error)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail(f"--device {args.device}: CUDA is not available here (no GPU visible, or torch without CUDA); "
                     "use --device cpu")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as error:
        return _fail(f"--out-dir {args.out_dir}: cannot create it ({error.strerror or _one_line(error)})")
    if not os.path.isdir(args.out_dir) or not os.access(args.out_dir, os.W_OK | os.X_OK):
        return _fail(f"--out-dir {args.out_dir}: not a writable directory")
    overrides = {"enhanced_decoder": True} if args.enhanced_decoder else {}
    started = time.perf_counter()
    try:
        tokenizer = TokenFlowTokenizer.from_pretrained(args.checkpoint, config=args.config, **overrides).to(device)
    except (OSError, ValueError, RuntimeError, TypeError) as error:  # incl. CheckpointError, mismatch reports
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return _fail(f"--checkpoint {args.checkpoint}: {first}")
    print(f"loaded {args.checkpoint} ({config_label(tokenizer.config)}, "
          f"{tokenizer.tokens_per_image} tokens per image) "
          f"in {time.perf_counter() - started:.2f} s")
    failed = 0
    for path, stem in zip(args.images, output_stems(args.images, args.out_dir)):
        try:
            if not os.path.isfile(path):
                raise FileNotFoundError("no such file" if not os.path.isdir(path) else "is a directory")
            images = load_image(path, tokenizer.config.image_size).to(device)
            started = time.perf_counter()
            indices = tokenizer.tokenize(images)
            encode_seconds = time.perf_counter() - started
            np.save(stem + ".tokens.npy", indices[0].cpu().numpy())
            line = f"{path}: {indices.shape[1]} tokens, encode {encode_seconds:.3f} s -> {stem}.tokens.npy"
            if not args.no_reconstruction:
                started = time.perf_counter()
                save_image(tokenizer.decode_indices(indices)[0], stem + ".recon.png")
                line += f"; decode {time.perf_counter() - started:.3f} s -> {stem}.recon.png"
        except KeyboardInterrupt:
            raise
        except Exception as error:  # one line per bad file; the others still run
            failed += 1
            print(f"tokenize: {path}: {type(error).__name__}: {_one_line(error)}", file=sys.stderr)
            continue
        print(line)
    if failed:
        print(f"tokenize: {failed} of {len(args.images)} file(s) failed", file=sys.stderr)
        return 1
    return 0
