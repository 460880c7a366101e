"""``python -m tokenflow_ext eval reconstruction --checkpoint CKPT --data DIR``: score a TokenFlow tokenizer
on a folder of images by the official protocol (see ``eval.protocol``); ``eval generation --generated DIR
--reference DIR|NPZ``: FID of generated images (see ``eval.generation``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

INCEPTION_HELP = ("pt_inception-2015-12-05-6726825d.pth, the FID Inception weights of pytorch-fid (and of the "
                  "official evaluation), from https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                  "pt_inception-2015-12-05-6726825d.pth; without it there is no rFID")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", required=True)
    r = sub.add_parser("reconstruction", help="PSNR, SSIM, LPIPS, rFID and codebook usage of a tokenizer")
    r.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="official TokenFlow file or one written by save_pretrained / training")
    r.add_argument("--config", help="official config of an official file (clipb_256, siglip_384, ...)")
    r.add_argument("--enhanced-decoder", action="store_true", help="tokenflow_clipb_32k_enhanced.pt")
    r.add_argument("--data", required=True, metavar="DIR", help="folder of images (searched recursively)")
    r.add_argument("--out", default="eval_reconstruction", metavar="DIR",
                   help="report.json, report.md, grid.png, shards/ (default ./eval_reconstruction)")
    r.add_argument("--image-size", type=int, help="evaluation resolution (default: the tokenizer's, as officially)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--shard-size", type=int, default=256, help="images per resumable shard")
    r.add_argument("--limit", type=int, help="only the first N images of the sorted list")
    r.add_argument("--inception-weights", metavar="PATH", help=INCEPTION_HELP)
    r.add_argument("--vgg-weights", metavar="PATH", help="torchvision vgg16-397923af.pth (LPIPS)")
    r.add_argument("--lpips-weights", metavar="PATH", help="LPIPS linear heads vgg.pth")
    r.add_argument("--save-reconstructions", action="store_true", help="write every reconstruction as a PNG")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--no-progress", action="store_true")
    g = sub.add_parser("generation", help="FID of a folder of generated images against a folder or .npz statistics")
    g.add_argument("--generated", required=True, metavar="DIR", help="folder of generated images")
    g.add_argument("--reference", required=True, metavar="DIR|NPZ",
                   help="reference images, or their statistics (.npz with mu and sigma; ADM reference batches too)")
    g.add_argument("--inception-weights", required=True, metavar="PATH", help=INCEPTION_HELP)
    g.add_argument("--save-stats", metavar="NPZ", help="write the generated set's statistics for reuse")
    g.add_argument("--clip-model", metavar="NAME", help="open_clip model for the CLIP score, e.g. ViT-L-14 (prompts "
                                                        "from each image's same-name .txt file)")
    g.add_argument("--clip-weights", metavar="PATH", help="its open_clip weights file")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--limit", type=int, help="only the first N images of each folder")
    g.add_argument("--json", metavar="PATH", help="write the result as JSON")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    return (reconstruction if args.kind == "reconstruction" else generation)(args)


def generation(args) -> int:
    from .fid import FIDInceptionV3  # noqa: PLC0415
    from .generation import fid_between  # noqa: PLC0415

    try:
        inception = FIDInceptionV3.from_file(args.inception_weights).to(args.device)
        result = fid_between(args.generated, args.reference, inception, save_stats=args.save_stats,
                             batch_size=args.batch_size, device=args.device, limit=args.limit,
                             progress=not args.no_progress)
        if args.clip_model or args.clip_weights:
            if not (args.clip_model and args.clip_weights):
                raise ValueError("the CLIP score needs both --clip-model and --clip-weights")
            from .clip_score import open_clip_encoders  # noqa: PLC0415
            from .generation import folder_clip_score  # noqa: PLC0415

            encoders = open_clip_encoders(args.clip_model, args.clip_weights, args.device)
            result["clip_score"], result["clip_pairs"] = folder_clip_score(args.generated, *encoders,
                                                                           batch_size=args.batch_size, limit=args.limit)
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"eval generation: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    print(f"FID {result['fid']:.4f} ({result['generated_images']} generated images against {args.reference})"
          + (f"; CLIP score {result['clip_score']:.2f} over {result['clip_pairs']} pairs" if "clip_score" in result
             else ""))
    return 0


def reconstruction(args) -> int:
    from ..models import TokenFlowTokenizer  # noqa: PLC0415
    from ..models._checkpoint import CheckpointError, StateDictMismatchError  # noqa: PLC0415
    from ..train.data import DataError  # noqa: PLC0415
    from .reconstruction import ReconstructionEval, evaluate_reconstruction  # noqa: PLC0415

    try:
        overrides = {"enhanced_decoder": True} if args.enhanced_decoder else {}
        tokenizer = TokenFlowTokenizer.from_pretrained(args.checkpoint, args.config, **overrides).to(args.device)
        inception = lpips = None
        if args.inception_weights:
            from .fid import FIDInceptionV3  # noqa: PLC0415

            inception = FIDInceptionV3.from_file(args.inception_weights).to(args.device)
        else:
            print(f"eval: no --inception-weights: no rFID ({INCEPTION_HELP})", file=sys.stderr)
        if args.vgg_weights or args.lpips_weights:
            from ..train.losses import LPIPS  # noqa: PLC0415

            lpips = LPIPS.from_files(args.vgg_weights, args.lpips_weights).to(args.device)
        settings = ReconstructionEval(data=args.data, out_dir=args.out, batch_size=args.batch_size,
                                      shard_size=args.shard_size, limit=args.limit, image_size=args.image_size,
                                      save_reconstructions=args.save_reconstructions, progress=not args.no_progress,
                                      checkpoint=os.fspath(args.checkpoint))
        report = evaluate_reconstruction(tokenizer, settings, inception=inception, lpips=lpips, device=args.device)
    except (DataError, FileNotFoundError, ValueError, ImportError, CheckpointError, StateDictMismatchError) as error:
        print(f"eval {args.kind}: error: {error}", file=sys.stderr)
        return 2
    print(open(os.path.join(args.out, "report.md")).read())
    print(json.dumps({k: report[k] for k in ("images", "psnr", "ssim", "lpips", "rfid")}))
    return 0
