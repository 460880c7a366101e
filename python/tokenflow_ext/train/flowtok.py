"""FlowTok training (``FlowTok.training_loss``) with the official optimisation (``FT:configs``, SPEC §3.3):
AdamW lr 4e-4, weight decay 0.03, betas (0.9, 0.95), linear warm-up (5000 steps) then constant, EMA of the
flow transformer's weights (0.9999), gradient checkpointing on.

Data: a folder with ``latents/`` and ``text/`` subfolders of precomputed pairs (``FeaturePairs``: FlowTiTok
latents ``(77, 16)`` with CLIP text features ``(77, 768)`` or token ids ``(77,)``), or a folder of images with
same-name ``.txt`` captions (needs ``--flowtitok`` and ``--clip-text`` weights, and open_clip's tokenizer for
the caption strings). Checkpoints hold the flow transformer's state dict (``nnet``) and its preset: they load
with ``FlowTok.from_pretrained(path)`` (the EMA weights when EMA is on).
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import nullcontext
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import hub
from ..models._checkpoint import load_checked, read_checkpoint
from ..models.flowtok import FlowTok
from .data import CaptionedImageFolder, DataError, FeaturePairs
from .loop import LoopConfig, ModelEMA, Trainer, autocast, grad_scaler, wrap_ddp


@dataclasses.dataclass
class FlowTokTrainConfig(LoopConfig):
    preset: str = "XL"
    flow_kwargs: dict = dataclasses.field(default_factory=dict)
    init: str | None = None  # flow-transformer weights to start from
    flowtitok: str | None = None  # FlowTiTok weights (image folders)
    clip_text: str | None = None  # CLIP text-encoder weights (captions / token ids)
    image_size: int = 256
    lr: float = 4e-4
    weight_decay: float = 0.03
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 5000
    ema_decay: float = 0.9999
    gradient_checkpointing: bool = True


def tokenize_captions(captions) -> torch.Tensor:
    """Caption strings -> CLIP token ids ``(B, 77)`` with open_clip's tokenizer."""
    try:
        import open_clip  # noqa: PLC0415
    except ImportError as error:
        raise ImportError("caption strings need open_clip's tokenizer (pip install open_clip_torch); or give "
                          "precomputed text features / token ids in <data>/text/") from error
    return open_clip.tokenize(list(captions))


class _TrainingLoss(torch.nn.Module):
    """``forward = FlowTok.training_loss`` (what DDP wraps)."""

    def __init__(self, flowtok: FlowTok):
        super().__init__()
        self.flowtok = flowtok

    def forward(self, *args, **kwargs):
        return self.flowtok.training_loss(*args, **kwargs)


class FlowTokTrainer(Trainer):
    name = "flowtok"

    def __init__(self, config: FlowTokTrainConfig, *, model: FlowTok | None = None, setup=None):
        super().__init__(config, setup)
        self.dataset = self._dataset(config.data, config)
        self.eval_dataset = self._dataset(config.eval_data, config) if config.eval_data else None
        if model is None:
            torch.manual_seed(config.seed)
            flow_kwargs = {"gradient_checkpointing": config.gradient_checkpointing, **config.flow_kwargs}
            model = FlowTok(config.preset, text_encoder=False, tokenizer=False, image_size=config.image_size,
                            **flow_kwargs)
            if config.flowtitok:
                from ..models.flowtok import FlowTiTok  # noqa: PLC0415
                model.tokenizer = FlowTiTok.from_pretrained(config.flowtitok).requires_grad_(False)
            if config.clip_text:
                from ..models.flowtok.clip_text import CLIPTextEncoder  # noqa: PLC0415
                model.text_encoder = CLIPTextEncoder.from_pretrained(config.clip_text).requires_grad_(False)
        self._check_parts(model, config.data)
        if config.init:
            state, _ = read_checkpoint(hub.resolve_file(config.init))  # a path or a Hub id (org/repo/file)
            load_checked(model.nnet, state, strict=True)
        model.to(self.device).train()
        self.seed_rank()  # back to the per-rank streams after the shared initialisation
        self.flowtok = model
        self.ema = ModelEMA(model.nnet, config.ema_decay) if config.ema_decay > 0 else None
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay,
                                           betas=(config.beta1, config.beta2))
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
        self.scaler = grad_scaler(self.device, self.precision)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed * 1000 + self.setup.rank)
        if self.setup.distributed:
            self.model = wrap_ddp(_TrainingLoss(model), self.device)
        else:
            self.model = model

    def _check_parts(self, model: FlowTok, data: str) -> None:
        """Stop before any work when the data needs a part the model lacks: images need FlowTiTok
        (--flowtitok), token ids and captions the CLIP text encoder (--clip-text). Reads the first sample
        that loads."""
        sample = next((item for item in (self.dataset[i] for i in range(min(len(self.dataset), 16)))
                       if item is not None), None)
        if sample is not None:
            images, text = sample[0][None], sample[1][None] if isinstance(sample[1], torch.Tensor) else [sample[1]]
        elif isinstance(self.dataset, CaptionedImageFolder):  # none loads yet: what the folder kind holds
            images, text = torch.zeros(1, 3, 8, 8), ["caption"]
        else:
            return  # unreadable data: the loop's own checks report it
        flags = {"tokenizer": "--flowtitok (FlowTiTok weights: the data holds images)",
                 "text_encoder": "--clip-text (CLIP text-encoder weights: the data holds token ids or captions)"}
        missing = [flags[part] for part in model.missing_parts(images, text)]
        if missing:
            raise ValueError(f"training FlowTok on {data} needs {' and '.join(missing)}; or precompute FlowTiTok "
                             "latents and CLIP text features (latents/ and text/ folders)")

    @staticmethod
    def _dataset(root, config):
        if root is None:
            raise DataError("no data folder given")
        if os.path.isdir(os.path.join(os.fspath(root), "latents")):
            return FeaturePairs(root)
        return CaptionedImageFolder(root, config.image_size, random_crop=False, flip=False, seed=config.seed)

    def _inputs(self, micro_batch):
        images, text = micro_batch
        if isinstance(text, (list, tuple)) and text and isinstance(text[0], str):
            text = tokenize_captions(text)
        images = images.to(self.device)
        if images.dim() == 4:  # ImageFolder gives [-1, 1]; FlowTiTok reads [0, 1]
            images = (images + 1) / 2
        return images, text.to(self.device)

    def _loss(self, images, text, generator):
        if isinstance(self.model, DDP):  # route through DDP's forward for the gradient all-reduce
            return self.model(images, text, generator=generator)
        return self.flowtok.training_loss(images, text, generator=generator)

    def train_step(self, micro_batches: list) -> dict[str, float]:
        count = len(micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for index, micro in enumerate(micro_batches):
            images, text = self._inputs(micro)
            sync = self.model.no_sync() if isinstance(self.model, DDP) and index < count - 1 else nullcontext()
            with sync:
                with autocast(self.device, self.precision):
                    loss, parts = self._loss(images, text, self.generator)
                self.scaler.scale(loss / count).backward()
            for key, value in {"loss": loss, **parts}.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) / count
        if self.config.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.get_scale() >= scale:  # fp16: a step with inf/NaN gradients lowers the scale, skips Adam
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.flowtok.nnet)
        return totals

    @torch.no_grad()
    def held_out_flow_loss(self, model: FlowTok | None = None) -> float:
        """Mean flow loss over the held-out pairs with fixed draws (eval mode: no CFG nulls)."""
        dataset = self.eval_dataset or self.dataset
        model = model or self.flowtok
        was_training = model.training
        model.eval()
        generator = torch.Generator(device=self.device).manual_seed(12345)
        total, count = 0.0, 0
        try:
            for index in range(min(len(dataset), self.config.eval_count)):
                sample = dataset[index]
                if sample is None:
                    continue
                images, text = self._inputs((sample[0][None], sample[1][None] if isinstance(sample[1], torch.Tensor)
                                             else [sample[1]]))
                _, parts = model.training_loss(images, text, generator=generator)
                total, count = total + float(parts["flow"]), count + 1
        finally:
            model.train(was_training)
        return total / max(count, 1)

    def evaluate(self) -> dict[str, float]:
        if not self.setup.is_main:
            return {}
        return {"flow_loss": self.held_out_flow_loss()}

    def model_state(self) -> dict[str, torch.Tensor]:
        return self.flowtok.nnet.state_dict()

    def metadata(self) -> dict[str, Any]:
        return {"preset": self.config.preset, "flow_kwargs": self.config.flow_kwargs}

    def extra_state(self) -> dict[str, Any]:
        extra = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(),
                 "args": json.dumps(dataclasses.asdict(self.config), default=str)}
        if self.ema is not None:
            extra["ema"] = {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}
        return extra

    def per_rank_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state().cpu()}

    def load_per_rank_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def load_extra_state(self, state: dict[str, Any]) -> None:
        load_checked(self.flowtok.nnet, state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])


def train_flowtok(config: FlowTokTrainConfig, **kwargs) -> dict[str, float]:
    """Build a :class:`FlowTokTrainer` and run it; returns the last logged row."""
    return FlowTokTrainer(config, **kwargs).run_and_close()
