"""TokenFlow tokenizer training (official ``tokenizer/vq_train.py`` + ``vq_loss.py``), on :class:`Trainer`.

One step, as the official loop: the generator (the tokenizer) takes an Adam step on

    rec_weight * l2|l1(x, x_hat) + perceptual_weight * LPIPS(x, x_hat)
    + adaptive * disc_weight(step) * gen_adv(D(x_hat)) + vq + commit + entropy + semantic_weight * (1 - cos)

then the PatchGAN discriminator takes its own Adam step on ``disc_weight(step) * d_loss(D(x), D(x_hat))``
with the same (detached) reconstructions. ``disc_weight(step)`` is 0 before ``disc_start``. Gradients are
clipped per model (``max_grad_norm``), with one loss scaler per optimizer under fp16.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import hub
from ..models._checkpoint import StateDictMismatchError, load_checked, read_checkpoint
from ..models.tokenflow.config import (CLIP_MEAN, CLIP_STD, CONFIGS, SIGLIP_MEAN, SIGLIP_STD, TokenFlowConfig,
                                       resolve_config)
from ..models.tokenflow.tokenizer import ScalingLayer, TokenFlowTokenizer
from . import metrics, presets
from .data import ImageFolder, list_files, IMAGE_EXTENSIONS
from .losses import (D_LOSSES, G_LOSSES, LPIPS, PatchGANDiscriminator, SemanticTeacher, adaptive_weight,
                     adopt_weight, semantic_loss)
from .loop import LoopConfig, ModelEMA, Trainer, autocast, grad_scaler, unwrap, wrap_ddp

TEACHER_HELP = ("the frozen semantic teacher: a torch file with the teacher tower's state dict in the tokenizer's "
                "naming (clip: OpenAI CLIP ViT-B/16's `visual.*` keys without the `visual.` prefix, including `proj`; "
                "siglip: Hugging Face siglip-so400m-patch14-384 `vision_model.*` keys)")


@dataclasses.dataclass
class TokenizerTrainConfig(LoopConfig):
    """Defaults are the official ``vq_train.py`` ones (lr 1e-4, Adam betas (0.9, 0.95), clip 1.0, l2
    reconstruction, LPIPS 1.0, hinge GAN with ``disc_weight`` 0.5 from ``disc_start`` 20000, PatchGAN ndf 64
    with 3 layers, no adaptive weight)."""

    config: str = "clipb_256"
    overrides: dict = dataclasses.field(default_factory=dict)
    init: str | None = None  # tokenizer weights to start from (official checkpoint or save_pretrained file)
    teacher: str | None = None
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    reconstruction_loss: str = "l2"
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    vgg_weights: str | None = None
    lpips_weights: str | None = None
    semantic_weight: float = 1.0
    disc_weight: float = 0.5
    disc_start: int = 20000
    disc_loss: str = "hinge"
    gen_loss: str = "hinge"
    disc_adaptive_weight: bool = False
    disc_dim: int = 64
    disc_layers: int = 3
    finetune_decoder: bool = False
    enhanced_decoder: bool = False
    random_crop: bool = True
    flip: bool = True


def load_tokenizer_config(name_or_path: str, **overrides) -> TokenFlowConfig:
    """A named config (an official one, or a trial size of ``presets.TOKENIZER_TRIAL_CONFIGS`` such as ``tiny``),
    or a JSON file of :class:`TokenFlowConfig` fields (``"base"`` names a config to start from). Malformed JSON
    and unknown fields are errors naming the file."""
    if name_or_path.endswith(".json"):
        fields = presets.read_json_object(name_or_path, "--config")
        base = fields.pop("base", "clipb_256")
        presets.check_fields(fields, presets.tokenizer_config_fields(), f"--config {name_or_path}")
        if base in presets.TOKENIZER_TRIAL_CONFIGS:
            fields = {**presets.TOKENIZER_TRIAL_CONFIGS[base], **fields}
            base = "clipb_256"
        name = os.path.splitext(os.path.basename(name_or_path))[0]
        return resolve_config(base, **{"name": name, **fields, **overrides})
    if name_or_path in presets.TOKENIZER_TRIAL_CONFIGS:
        return resolve_config("clipb_256", **{**presets.TOKENIZER_TRIAL_CONFIGS[name_or_path], "name": name_or_path,
                                              **overrides})
    if name_or_path not in CONFIGS:
        raise ValueError(f"--config: unknown config {name_or_path!r}; choose from "
                         f"{sorted(CONFIGS) + sorted(presets.TOKENIZER_TRIAL_CONFIGS)} or give a .json file")
    return resolve_config(name_or_path, **overrides)


class _DiscriminatorPair(nn.Module):
    """``D(real), D(fake)`` in one forward (one DDP forward per backward)."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.disc = discriminator

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        return self.disc(real), self.disc(fake)


def build_teacher(model: TokenFlowTokenizer, path: str) -> SemanticTeacher:
    """A frozen copy of the model's semantic tower loaded from ``path`` (``proj`` kept aside for clip)."""
    import copy  # noqa: PLC0415

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--teacher {path}: file not found; {TEACHER_HELP}")
    state, _ = read_checkpoint(path)
    if any(key.startswith("visual.") for key in state):  # a whole OpenAI CLIP state dict: keep its visual tower
        state = {key[len("visual."):]: value for key, value in state.items() if key.startswith("visual.")}
    proj = state.pop("proj", None)
    tower = copy.deepcopy(model.encoder_vqkd)
    try:
        missing, _ = load_checked(tower, state, strict=False)
    except StateDictMismatchError as error:
        raise ValueError(f"--teacher {path} does not fit the {model.config.name} semantic tower: {error}") from error
    if missing:
        raise ValueError(f"--teacher {path}: {len(missing)} tensors of the teacher tower are missing, e.g. "
                         f"{missing[:3]}; {TEACHER_HELP}")
    if proj is None and model.config.teacher == "clip":
        raise ValueError(f"--teacher {path}: a CLIP teacher needs its `proj` ({model.config.semantic_width} x "
                         f"{model.config.decoder_out_dim}); {TEACHER_HELP}")
    return SemanticTeacher(tower, proj)


class TokenizerTrainer(Trainer):
    """Trains :class:`TokenFlowTokenizer` (``teacher`` / ``lpips`` may be given as modules: tests use random
    ones). Checkpoints load with ``TokenFlowTokenizer.from_pretrained`` (EMA weights when EMA is on)."""

    name = "tokenizer"

    def __init__(self, config: TokenizerTrainConfig, *, teacher: nn.Module | None = None,
                 lpips: nn.Module | None = None, setup=None):
        super().__init__(config, setup)
        if config.reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"reconstruction_loss must be 'l1' or 'l2', got {config.reconstruction_loss!r}")
        if config.disc_loss not in D_LOSSES or config.gen_loss not in G_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)} and gen_loss one of {sorted(G_LOSSES)}")
        self.dataset = ImageFolder(config.data, 0, random_crop=config.random_crop, flip=config.flip,
                                   seed=config.seed)
        overrides = dict(config.overrides)
        if config.enhanced_decoder:
            overrides["enhanced_decoder"] = True
        model_config = load_tokenizer_config(config.config, **overrides)
        self.dataset.size = model_config.image_size
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model = TokenFlowTokenizer(model_config)
        if config.init:
            state, _ = read_checkpoint(hub.resolve_file(config.init))  # a path or a Hub id (org/repo/file)
            if config.enhanced_decoder:  # switching to the enhanced decoder: the old decoder does not fit
                own = model.state_dict()
                state = {k: v for k, v in state.items() if not (k.startswith("decoder.") and
                                                              (k not in own or own[k].shape != v.shape))}
            load_checked(model, state, strict=not config.enhanced_decoder)
        if teacher is None and config.semantic_weight > 0:
            if not config.teacher:
                raise ValueError(f"tokenizer training needs --teacher PATH ({TEACHER_HELP}), or --semantic-weight 0")
            teacher = build_teacher(model, config.teacher)
            if not config.init:  # the semantic encoder starts from the teacher, as officially
                load_checked(model.encoder_vqkd, teacher.tower.state_dict(), strict=True)
        self.teacher = teacher.to(self.device) if teacher is not None and config.semantic_weight > 0 else None
        scaling = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}.get(
            model_config.teacher if model_config.teacher != "external" else (model_config.semantic_scaling or "clip"))
        self.teacher_scaling = ScalingLayer(*scaling).to(self.device)
        if lpips is None and config.perceptual_weight > 0:
            lpips = LPIPS.from_files(config.vgg_weights, config.lpips_weights)
        self.lpips = lpips.to(self.device) if lpips is not None and config.perceptual_weight > 0 else None
        # Random scale drop draws from a private generator seeded alike on every rank: all ranks (and a
        # 1-process run) drop the same scale in a step.
        model.residual_quantizer.rng = random.Random(config.seed)
        if config.finetune_decoder:  # official --finetune_decoder: only decoder.* trains
            for name, param in model.named_parameters():
                param.requires_grad_(name.startswith("decoder."))
        model.to(self.device).train()
        self.ema = ModelEMA(model, config.ema_decay) if config.ema_decay > 0 else None
        discriminator = PatchGANDiscriminator(3, config.disc_dim, config.disc_layers).to(self.device).train()
        self.seed_rank()  # back to the per-rank streams after the shared initialisation
        self.discriminator = discriminator
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        betas = (config.beta1, config.beta2)
        self.optimizer = torch.optim.Adam(self.trainable, lr=config.lr, betas=betas)
        self.optimizer_disc = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=betas)
        self.scaler = grad_scaler(self.device, self.precision)
        self.scaler_disc = grad_scaler(self.device, self.precision)
        pair = _DiscriminatorPair(discriminator)
        if self.setup.distributed:
            # without a teacher the semantic decoder gets no gradient: DDP must be told to look for that
            self.model = wrap_ddp(model, self.device, find_unused_parameters=self.teacher is None)
            self.disc_pair = wrap_ddp(pair, self.device)
        else:
            self.model, self.disc_pair = model, pair
        self.eval_files = (list_files(config.eval_data, IMAGE_EXTENSIONS) if config.eval_data
                           else self.dataset.files)[:config.eval_count]

    @property
    def tokenizer(self) -> TokenFlowTokenizer:
        return unwrap(self.model)

    # ------------------------------------------------------------------------------------- losses
    def generator_loss(self, images: torch.Tensor, semantic: torch.Tensor, reconstruction: torch.Tensor,
                       quantizer_losses: tuple, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """The official generator objective (``VQLoss.forward(optimizer_idx=0)``) -> ``(loss, parts)``."""
        config = self.config
        rec = (F.mse_loss if config.reconstruction_loss == "l2" else F.l1_loss)(images, reconstruction)
        zero = rec.new_zeros(())
        perceptual = self.lpips(images, reconstruction).mean() if self.lpips is not None else zero
        if self.teacher is not None:
            target = self.teacher(self.teacher_scaling(images))
            if target.shape != semantic.shape:
                raise ValueError(f"the teacher gives features {tuple(target.shape)} but the semantic decoder "
                                 f"reconstructs {tuple(semantic.shape)}: teacher and --config do not match")
            vqkd = semantic_loss(semantic.float(), target.float())
        else:
            vqkd = zero
        disc_weight = adopt_weight(config.disc_weight, step, threshold=config.disc_start)
        adaptive: Any = 1.0
        if disc_weight > 0 or config.disc_adaptive_weight:
            # D's parameters enter detached: the generator step gives them no gradient
            params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            params.update(dict(self.discriminator.named_buffers()))
            logits_fake = torch.func.functional_call(self.discriminator, params, (reconstruction,))
            gen_adv = G_LOSSES[config.gen_loss](logits_fake)
            if config.disc_adaptive_weight:
                nll = config.reconstruction_weight * rec + config.perceptual_weight * perceptual
                adaptive = adaptive_weight(nll, gen_adv, self.tokenizer.decoder.last_layer)
        else:
            gen_adv = zero
        vq, commit, entropy = (value if value is not None else zero for value in quantizer_losses[:3])
        loss = (config.reconstruction_weight * rec + config.perceptual_weight * perceptual
                + adaptive * disc_weight * gen_adv + vq + commit + entropy + config.semantic_weight * vqkd)
        usage = quantizer_losses[3]
        parts = {"loss": loss, "rec_loss": rec, "p_loss": perceptual, "vq_loss": vq, "commit_loss": commit,
                 "entropy_loss": entropy, "vqkd_loss": vqkd, "generator_adv_loss": gen_adv,
                 "disc_weight": disc_weight, "disc_adaptive_weight": adaptive, "codebook_usage": usage,
                 "d_vqkd": quantizer_losses[4], "d_vqgan": quantizer_losses[5]}
        return loss, parts

    def discriminator_loss(self, images: torch.Tensor, reconstruction: torch.Tensor, step: int):
        logits_real, logits_fake = self.disc_pair(images.detach(), reconstruction.detach())
        weight = adopt_weight(self.config.disc_weight, step, threshold=self.config.disc_start)
        loss = weight * D_LOSSES[self.config.disc_loss](logits_real, logits_fake)
        return loss, {"discriminator_adv_loss": loss, "logits_real": logits_real.detach().mean(),
                      "logits_fake": logits_fake.detach().mean()}

    # ------------------------------------------------------------------------------------- one step
    def _no_sync(self, module, index: int, count: int):
        return module.no_sync() if isinstance(module, DDP) and index < count - 1 else nullcontext()

    def train_step(self, micro_batches: list) -> dict[str, float]:
        config, count = self.config, len(micro_batches)
        global_step = self.step + 1  # the official loop passes train_steps + 1
        rows: list[dict[str, Any]] = []
        reconstructions = []
        self.optimizer.zero_grad(set_to_none=True)
        for index, images in enumerate(micro_batches):
            images = images.to(self.device, non_blocking=True)
            with self._no_sync(self.model, index, count):
                with autocast(self.device, self.precision):
                    (semantic, reconstruction), quantizer_losses = self.model(images)
                    loss, parts = self.generator_loss(images, semantic, reconstruction, quantizer_losses, global_step)
                self.scaler.scale(loss / count).backward()
            reconstructions.append(reconstruction.detach())
            rows.append(parts)
        if config.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.tokenizer)

        self.optimizer_disc.zero_grad(set_to_none=True)
        for index, (images, reconstruction) in enumerate(zip(micro_batches, reconstructions)):
            images = images.to(self.device, non_blocking=True)
            with self._no_sync(self.disc_pair, index, count):
                with autocast(self.device, self.precision):
                    loss, parts = self.discriminator_loss(images, reconstruction, global_step)
                self.scaler_disc.scale(loss / count).backward()
            rows[index].update(parts)
        if config.max_grad_norm:
            self.scaler_disc.unscale_(self.optimizer_disc)
            torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), config.max_grad_norm)
        self.scaler_disc.step(self.optimizer_disc)
        self.scaler_disc.update()
        return {key: sum(_number(row[key]) for row in rows) / count for key in rows[0]}

    # ------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, model: TokenFlowTokenizer | None = None) -> torch.Tensor:
        model = model or self.tokenizer
        was_training = model.training
        model.eval()
        try:
            features = model.encode(images.to(self.device)).features
            return model.decode_pixels(features).float().clamp(-1, 1).to(images.device)
        finally:
            model.train(was_training)

    def eval_images(self) -> torch.Tensor:
        size = self.tokenizer.config.image_size
        loaded = [ImageFolder(self.config.data, size, files=self.eval_files)[i] for i in range(len(self.eval_files))]
        return torch.stack([image for image in loaded if image is not None])

    def evaluate(self) -> dict[str, float]:
        """Rank 0: PSNR and SSIM of the model's reconstructions of the eval images, codebook usage and
        perplexity of the usage window, and ``samples/step_NNNNNNN.png``."""
        if not self.setup.is_main or not self.eval_files:
            return {}
        images = self.eval_images()
        reconstruction = self.reconstruct(images)
        row = {"psnr": float(metrics.psnr(images, reconstruction).mean()),
               "ssim": float(metrics.ssim(images, reconstruction).mean())}
        if self.ema is not None:
            row["ema_psnr"] = float(metrics.psnr(images, self.reconstruct(images, self.ema.module)).mean())
        quantize = self.tokenizer.quantize
        if hasattr(quantize, "codebook_used"):
            row.update(metrics.codebook_stats(quantize.codebook_used, quantize.n_e, quantize.usage_filled))
        folder = os.path.join(self.config.out_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        metrics.save_grid(os.path.join(folder, f"step_{self.step:07d}.png"), images[:8], reconstruction[:8])
        return row

    # ------------------------------------------------------------------------------------- checkpoints
    def model_state(self) -> dict[str, torch.Tensor]:
        return self.tokenizer.state_dict()

    def metadata(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.tokenizer.config)}

    def extra_state(self) -> dict[str, Any]:
        extra = {"optimizer": self.optimizer.state_dict(), "discriminator": self.discriminator.state_dict(),
                 "optimizer_disc": self.optimizer_disc.state_dict(), "scaler": self.scaler.state_dict(),
                 "scaler_disc": self.scaler_disc.state_dict(),
                 "scale_drop_rng": self.tokenizer.residual_quantizer.rng.getstate(),
                 "usage_filled": getattr(self.tokenizer.quantize, "usage_filled", 0),
                 "args": json.dumps(dataclasses.asdict(self.config), default=str)}
        if self.ema is not None:
            extra["ema"] = {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}
        return extra

    def load_extra_state(self, state: dict[str, Any]) -> None:
        load_checked(self.tokenizer, state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer_disc.load_state_dict(state["optimizer_disc"])
        if state["scaler"]:  # empty when the scaler is off (not fp16)
            self.scaler.load_state_dict(state["scaler"])
            self.scaler_disc.load_state_dict(state["scaler_disc"])
        if hasattr(self.tokenizer.quantize, "usage_filled") and "usage_filled" in state:
            self.tokenizer.quantize.usage_filled = state["usage_filled"]
        version, internal, gauss = state["scale_drop_rng"]
        self.tokenizer.residual_quantizer.rng.setstate((version, tuple(internal), gauss))
        if self.ema is not None:
            if "ema" not in state:
                raise ValueError("--resume: the checkpoint has no EMA weights but --ema-decay is set")
            self.ema.module.load_state_dict(state["ema"])


def _number(value) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def train_tokenizer(config: TokenizerTrainConfig, **kwargs) -> dict[str, float]:
    """Build a :class:`TokenizerTrainer` and run it; returns the last logged row."""
    return TokenizerTrainer(config, **kwargs).run_and_close()
