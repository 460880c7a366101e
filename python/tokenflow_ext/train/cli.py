"""``python -m tokenflow_ext train {tokenizer,flowtok} ...`` (also under ``torchrun --nproc-per-node N -m
tokenflow_ext train ...``): parse the flags into a trainer config and run it."""

from __future__ import annotations

import argparse
import os
import sys


def _common(parser: argparse.ArgumentParser, *, lr: float, ema: float) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="training data folder (searched recursively)")
    parser.add_argument("--out", dest="out_dir", default="runs/train", metavar="DIR",
                        help="run folder: log.csv, log.jsonl, samples/, checkpoints/ (default runs/train)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (default 1000)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch over processes and accumulation")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches accumulated per step")
    parser.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="autocast dtype (auto: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help=f"EMA of the weights (0: off; default {ema}, or the trial preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes per rank")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="torch intra-op threads per process on the CPU (default 0: 1 for models under 20M "
                             "parameters, whose ops gain nothing from more and stall on a busy machine; else the "
                             "cores divided among the processes of this machine)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=500, help="evaluation period in steps (0: off)")
    parser.add_argument("--eval-data", metavar="DIR", help="held-out folder (default: the first training samples)")
    parser.add_argument("--eval-count", type=int, default=8, help="samples evaluated")
    parser.add_argument("--ckpt-every", type=int, default=500,
                        help="checkpoint period in steps (0: only at the end); the run's last step, a SIGTERM and a "
                             "Ctrl-C always write one")
    parser.add_argument("--keep-last", type=int, default=0, metavar="N",
                        help="keep only the newest N step_*.pt files (0: keep all; last.pt always stays)")
    parser.add_argument("--resume", metavar="PATH", help="a run folder or checkpoint to continue from")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when visible)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def _flow_kwargs(text: str) -> dict:
    from . import presets  # noqa: PLC0415

    try:
        fields = presets.parse_json_object(text, "--flow-kwargs")
        presets.check_fields(fields, presets.flow_transformer_options(), "--flow-kwargs")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model", required=True)
    t = sub.add_parser("tokenizer", help="train or fine-tune a TokenFlow tokenizer")
    t.add_argument("--config", default="clipb_256",
                   help="clipb_224, clipb_256, siglip_384, tiny (a 64 px trial size for the CPU, not official) or a "
                        ".json of TokenFlowConfig fields (\"base\": a name)")
    t.add_argument("--init", metavar="PATH", help="tokenizer weights to start from (official .pt or save_pretrained; a "
                                                  "path or a Hub id org/repo/file)")
    t.add_argument("--teacher", metavar="PATH", help="frozen semantic teacher weights (see the README)")
    t.add_argument("--vgg-weights", metavar="PATH", help="torchvision vgg16-397923af.pth (for LPIPS)")
    t.add_argument("--lpips-weights", metavar="PATH", help="LPIPS linear heads vgg.pth")
    t.add_argument("--reconstruction-loss", choices=["l2", "l1"], default="l2")
    t.add_argument("--reconstruction-weight", type=float, default=1.0)
    t.add_argument("--perceptual-weight", type=float, default=1.0, help="LPIPS weight (0: no LPIPS files needed)")
    t.add_argument("--semantic-weight", type=float, default=1.0, help="teacher distillation weight (0: no teacher)")
    t.add_argument("--disc-weight", type=float, default=0.5)
    t.add_argument("--disc-start", type=int, default=20000, help="step from which the GAN losses count")
    t.add_argument("--disc-loss", choices=["hinge", "vanilla", "non-saturating"], default="hinge")
    t.add_argument("--gen-loss", choices=["hinge", "non-saturating"], default="hinge")
    t.add_argument("--disc-adaptive-weight", action="store_true", help="VQGAN's adaptive GAN weight (off officially)")
    t.add_argument("--disc-dim", type=int, default=64)
    t.add_argument("--finetune-decoder", action="store_true", help="train only decoder.* (official fine-tuning)")
    t.add_argument("--enhanced-decoder", action="store_true", help="the 2x decoder (with --finetune-decoder)")
    t.add_argument("--no-augment", action="store_true", help="centre crops, no flips")
    _common(t, lr=1e-4, ema=0.0)
    f = sub.add_parser("flowtok", help="train FlowTok's flow transformer")
    f.add_argument("--preset", default="XL",
                   help="S, B, L, XL, H (official), tiny (a trial size for the CPU: 2 blocks of width 64, warm-up "
                        "100, EMA 0.99 unless given), or depth,width,heads")
    f.add_argument("--flow-kwargs", type=_flow_kwargs, default={}, metavar="JSON",
                   help="JSON object of FlowTransformer options, e.g. '{\"text_layers\": 1}'")
    f.add_argument("--init", metavar="PATH", help="flow-transformer weights to start from")
    f.add_argument("--flowtitok", metavar="PATH", help="FlowTiTok weights (needed for image folders)")
    f.add_argument("--clip-text", metavar="PATH", help="CLIP text-encoder weights (for captions / token ids)")
    f.add_argument("--image-size", type=int, default=256)
    f.add_argument("--weight-decay", type=float, default=0.03)
    f.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default 5000, the official value, or the trial preset's)")
    f.add_argument("--no-gradient-checkpointing", action="store_true")
    _common(f, lr=4e-4, ema=0.9999)


def _loop_fields(args) -> dict:
    return dict(data=args.data, out_dir=args.out_dir, steps=args.steps, batch_size=args.batch_size,
                grad_accum=args.grad_accum, lr=args.lr, max_grad_norm=args.max_grad_norm, precision=args.precision,
                seed=args.seed, num_workers=args.num_workers, threads=args.threads, log_every=args.log_every,
                eval_every=args.eval_every, eval_data=args.eval_data, eval_count=args.eval_count,
                ckpt_every=args.ckpt_every, keep_last=args.keep_last, resume=args.resume, device=args.device, progress=not args.no_progress)


def _preset(text: str):
    """``"XL"`` or ``"depth,width,heads"``."""
    if "," not in text:
        return text
    try:
        depth, width, heads = (int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--preset {text!r}: expected a name or depth,width,heads (three integers)") from None
    return depth, width, heads


def _flowtok_fields(args) -> dict:
    """Preset, flow options and schedule of a FlowTok run: a trial preset fills what the flags leave open."""
    from .presets import FLOWTOK_TRIAL_PRESETS  # noqa: PLC0415

    trial = FLOWTOK_TRIAL_PRESETS.get(args.preset, {})
    return dict(preset=trial.get("preset", _preset(args.preset)),
                flow_kwargs={**trial.get("flow_kwargs", {}), **args.flow_kwargs},
                warmup_steps=args.warmup_steps if args.warmup_steps is not None else trial.get("warmup_steps", 5000),
                ema_decay=args.ema_decay if args.ema_decay is not None else trial.get("ema_decay", 0.9999))


def run(args) -> int:
    """Exit status: 0 when the run ended (also stopped by SIGTERM or the launcher's exit, with a checkpoint),
    2 for bad arguments, data or checkpoints, 130 after Ctrl-C."""
    from ..models._checkpoint import StateDictMismatchError  # noqa: PLC0415
    from .data import DataError  # noqa: PLC0415

    trainer = None
    try:
        if args.model == "tokenizer":
            from .tokenizer import TokenizerTrainConfig, TokenizerTrainer  # noqa: PLC0415

            config = TokenizerTrainConfig(
                **_loop_fields(args), ema_decay=args.ema_decay or 0.0, config=args.config, init=args.init,
                teacher=args.teacher, vgg_weights=args.vgg_weights, lpips_weights=args.lpips_weights,
                reconstruction_loss=args.reconstruction_loss, reconstruction_weight=args.reconstruction_weight,
                perceptual_weight=args.perceptual_weight, semantic_weight=args.semantic_weight,
                disc_weight=args.disc_weight, disc_start=args.disc_start, disc_loss=args.disc_loss,
                gen_loss=args.gen_loss, disc_adaptive_weight=args.disc_adaptive_weight, disc_dim=args.disc_dim,
                finetune_decoder=args.finetune_decoder, enhanced_decoder=args.enhanced_decoder,
                random_crop=not args.no_augment, flip=not args.no_augment)
            trainer = TokenizerTrainer(config)
        else:
            from .flowtok import FlowTokTrainConfig, FlowTokTrainer  # noqa: PLC0415

            config = FlowTokTrainConfig(
                **_loop_fields(args), **_flowtok_fields(args), init=args.init, flowtitok=args.flowtitok,
                clip_text=args.clip_text, image_size=args.image_size, weight_decay=args.weight_decay,
                gradient_checkpointing=not args.no_gradient_checkpointing)
            trainer = FlowTokTrainer(config)
        last = trainer.run_and_close()
    except (DataError, FileNotFoundError, ValueError, ImportError, StateDictMismatchError) as error:
        print(f"train {args.model}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of the step in flight
        saved = trainer.saved_step if trainer is not None else 0
        print(f"train {args.model}: interrupted" + (f"; the last checkpoint is at step {saved}, continue with the "
                                                    f"same command plus --resume {args.out_dir}" if saved else ""),
              file=sys.stderr)
        return 130
    if trainer.stopped_by == "SIGINT":
        return 130
    if last and os.environ.get("RANK", "0") == "0":
        print("last: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, (int, float))))
    return 0
