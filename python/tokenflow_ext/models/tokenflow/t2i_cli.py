"""``python -m tokenflow_ext generate "a red apple" --t2i-checkpoint DIR --tokenizer-checkpoint F --out out/``:
text -> TokenFlow image codes -> PNGs (``<out>/<index>_<slug>.png``), with a progress bar over the scales."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

from .t2i import OFFICIAL_NEGATIVE_PROMPT, SAMPLERS


class CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def load_text_tokenizer(path: str):
    """The prompt tokenizer of a t2i checkpoint folder (Hugging Face ``AutoTokenizer``: the released folder holds
    the Llama tokenizer with ``[PAD]`` and the image ids added)."""
    try:
        from transformers import AutoTokenizer  # noqa: PLC0415
    except ImportError as error:
        raise CliError("generate: encoding prompt text needs the `transformers` package (and `sentencepiece` for the "
                       "Llama tokenizer): pip install transformers sentencepiece") from error
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CliError(f"generate: no usable text tokenizer in {path!r} ({error}); pass --text-tokenizer DIR") from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", metavar="PROMPT")
    parser.add_argument("--t2i-checkpoint", required=True, metavar="DIR",
                        help="TokenFlow-t2i folder (config.json + *.safetensors / *.bin), e.g. ByteFlow-AI/TokenFlow-t2i")
    parser.add_argument("--tokenizer-checkpoint", required=True, metavar="FILE",
                        help="TokenFlow image tokenizer (official tokenflow_clipb_32k_enhanced.pt or save_pretrained)")
    parser.add_argument("--tokenizer-config", default="auto", metavar="NAME",
                        help="official tokenizer config; auto (default): the file's own config if it stores one "
                             "(save_pretrained), else clipb_256 (the t2i model's tokenizer)")
    parser.add_argument("--enhanced-decoder", action="store_true",
                        help="the tokenizer file has the enhanced pixel decoder (implied by 'enhanced' in the file name, as "
                             "tokenflow_clipb_32k_enhanced.pt)")
    parser.add_argument("--text-tokenizer", metavar="DIR", help="prompt tokenizer folder (default: --t2i-checkpoint)")
    parser.add_argument("--out", default="out", metavar="DIR", help="where the PNGs go (created)")
    parser.add_argument("--negative-prompt", default=OFFICIAL_NEGATIVE_PROMPT)
    parser.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (official 7.5)")
    parser.add_argument("--refinement", default="loop1", choices=["loop1", "loop2", "loop3"])
    parser.add_argument("--top-k", type=int, help="override the preset's top-k (every pass)")
    parser.add_argument("--top-p", type=float, help="override the preset's top-p (every pass)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--sampler", default="fused", choices=list(SAMPLERS),
                        help="fused: the sample_logits kernel; python: the official tensor ops (torch.multinomial)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "prompt"


class ScaleProgress:
    """Wraps a sampler: advances a progress bar when a scale's last refinement pass has been drawn."""

    def __init__(self, sampler, scales, passes: int, bar):
        self.sampler, self.bar, self.passes = sampler, bar, passes
        self.image_logits_only = getattr(sampler, "image_logits_only", False)  # keep the sampler's head contract
        self.scale_of_count = {s * s: i for i, s in enumerate(scales)}
        self.seen: dict[int, int] = {}

    def __call__(self, logits, **kwargs):
        codes = self.sampler(logits, **kwargs)
        scale = self.scale_of_count.get(logits.shape[1], -1)
        self.seen[scale] = self.seen.get(scale, 0) + 1
        if self.seen[scale] == (1 if scale == 0 else self.passes):
            self.bar.update(1)
        return codes


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CliError as error:
        print(error, file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .cli import save_image  # noqa: PLC0415
    from .t2i import TokenFlowT2I, refinement_lists, resolve_sampler  # noqa: PLC0415
    from .tokenizer import TokenFlowTokenizer  # noqa: PLC0415

    if not os.path.isdir(args.t2i_checkpoint):
        raise CliError(f"generate: --t2i-checkpoint {args.t2i_checkpoint!r} is not a folder (expected config.json and "
                       f"*.safetensors or *.bin weights)")
    if not os.path.isfile(os.path.join(args.t2i_checkpoint, "config.json")):
        raise CliError(f"generate: no config.json in --t2i-checkpoint {args.t2i_checkpoint!r}")
    if not os.path.isfile(args.tokenizer_checkpoint):
        raise CliError(f"generate: --tokenizer-checkpoint {args.tokenizer_checkpoint!r} does not exist")
    text_path = args.text_tokenizer or args.t2i_checkpoint
    if not os.path.exists(text_path):
        raise CliError(f"generate: --text-tokenizer {text_path!r} does not exist")
    if args.images_per_prompt < 1:
        raise CliError("generate: --images-per-prompt must be >= 1")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    started = time.perf_counter()
    # the official file name says it (tokenflow_clipb_32k_enhanced.pt); files from save_pretrained store it
    enhanced = args.enhanced_decoder or "enhanced" in os.path.basename(args.tokenizer_checkpoint)
    overrides = {"enhanced_decoder": True} if enhanced else {}
    config = None if args.tokenizer_config == "auto" else args.tokenizer_config
    try:
        try:
            image_tokenizer = TokenFlowTokenizer.from_pretrained(args.tokenizer_checkpoint, config=config, **overrides)
        except ValueError as error:
            if config is not None or "stores no tokenflow_ext config" not in str(error):
                raise
            image_tokenizer = TokenFlowTokenizer.from_pretrained(args.tokenizer_checkpoint, config="clipb_256",
                                                                 **overrides)
        model = TokenFlowT2I.from_pretrained(args.t2i_checkpoint, dtype=dtype, image_tokenizer=image_tokenizer.to(device))
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        raise CliError(f"generate: could not load the checkpoints: {error}") from error
    model = model.to(device)
    text_tokenizer = load_text_tokenizer(text_path)
    print(f"loaded {args.t2i_checkpoint} and {args.tokenizer_checkpoint} in {time.perf_counter() - started:.1f} s "
          f"({model.config.tokens_per_image} codes per image, {len(model.config.scales)} scales)", file=sys.stderr)

    prompts = [p for p in args.prompts for _ in range(args.images_per_prompt)]
    passes = len(refinement_lists(args.refinement, args.top_k, args.top_p)[0])
    os.makedirs(args.out, exist_ok=True)
    bar = tqdm(total=len(model.config.scales), desc="scales", unit="scale", disable=args.no_progress, file=sys.stderr)
    sampler = ScaleProgress(resolve_sampler(args.sampler), model.config.scales, passes, bar)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompts, negative_prompt=args.negative_prompt, tokenizer=text_tokenizer, cfg=args.cfg,
                             refinement=args.refinement, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             sampler=sampler)
    bar.close()
    seconds = time.perf_counter() - started
    paths = []
    for index, (prompt, image) in enumerate(zip(prompts, out.images)):
        path = os.path.join(args.out, f"{index:03d}_{_slug(prompt)}.png")
        save_image(image, path)
        paths.append(path)
    print(f"{len(paths)} image(s) in {seconds:.1f} s -> {', '.join(paths)}")
    return 0
