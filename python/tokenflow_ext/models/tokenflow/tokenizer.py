"""TokenFlowTokenizer: the full TokenFlow image tokenizer on the fused quantizer kernels (arXiv 2412.03069)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.dual_codebook import DualCodebookQuantizer
from ...nn.multiscale import MultiScaleQuantizer
from .._checkpoint import CheckpointError, load_checked, read_checkpoint, write_checkpoint
from .._inference import evaluating, inference_when_eval
from .._layers import autocast_context
from .clip_vision import CLIPVisionTower
from .config import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, TokenFlowConfig, resolve_config
from .pixel_cnn import PixelDecoder, PixelEncoder
from .semantic_decoder import SemanticDecoder
from .siglip_vision import SiglipVisionTower


class EncodeResult(NamedTuple):
    """``features`` ``(B, 40, S, S)``: the sum of all scales' upsampled codes (official ``final_quantize``);
    ``losses``: ``(vq_loss, commit_loss, entropy_loss, codebook_usage, d_norm_semantic, d_norm_pixel)``
    averaged over scales (the first three ``None`` in eval); ``indices`` int64 ``(B, sum s^2)``."""
    features: torch.Tensor
    losses: tuple
    indices: torch.Tensor


class DecodeResult(NamedTuple):
    """``semantic`` ``(B, S*S, decoder_out_dim)``: the teacher-feature reconstruction; ``image``
    ``(B, 3, image_size, image_size)`` in [-1, 1]."""
    semantic: torch.Tensor
    image: torch.Tensor


def _tracing() -> bool:
    """Under torch.compile, FX/JIT tracing or CUDA-graph capture no value may be read back to the host."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and getattr(compiler, "is_compiling", lambda: False)():
        return True
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_image_range(images: torch.Tensor, who: str, low: float, high: float, *, argument: str = "images") -> None:
    """Raise a ``ValueError`` naming ``argument``, the expected range ``[low, high]`` and the observed minimum and
    maximum when the float ``images`` are clearly outside that range: below ``low`` or above ``high`` by more than
    half the range's width (``[-1, 1]``: outside ``[-2, 2]``; ``[0, 1]``: outside ``[-0.5, 1.5]``), e.g. 0-255 pixel
    values, or ``[-1, 1]`` images given to a ``[0, 1]`` model. A small overshoot (bicubic resampling) passes.

    Shared by the image entry points of both model families (``TokenFlowTokenizer.encode`` and what calls it,
    ``FlowTiTok.encode`` / ``posterior`` and FlowTok's image paths through it). Cost: one ``aminmax`` and one
    read-back of two numbers (one device sync) per call; skipped for empty and meta tensors and while
    compiling, tracing or capturing a CUDA graph. NaNs are not reported here."""
    if images.numel() == 0 or images.device.type == "meta" or _tracing():
        return
    with torch.no_grad():
        lowest, highest = torch.stack(torch.aminmax(images.detach())).float().tolist()  # one sync
    margin = 0.5 * (high - low)
    too_low, too_high = lowest < low - margin, highest > high + margin
    if not (too_low or too_high):
        return
    if too_high and not too_low:
        hint = "0-255 pixel values? convert with " + ("images / 255" if low == 0 else "images / 127.5 - 1")
    elif low == 0 and lowest >= -1.5:
        hint = "[-1, 1] images? convert with (images + 1) / 2"
    else:
        hint = "mean/std-normalised images? give the pixels scaled to that range instead"
    raise ValueError(f"{who}: {argument} must be in [{low:g}, {high:g}], got values from {lowest:.4g} to "
                     f"{highest:.4g} ({hint})")


class ScalingLayer(nn.Module):
    """[-1, 1] image -> [0, 1] (clamped as the official 8-bit round trip) -> ``(x - shift) / scale``."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("shift", torch.tensor(mean).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(std).reshape(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        unit = ((images + 1.0) * 127.5).clamp(0, 255.0) / 255.0
        return (unit - self.shift) / self.scale


def _task_layer(width: int, out_dim: int) -> nn.Sequential:
    layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, out_dim))
    for linear in (layer[0], layer[2]):
        nn.init.trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)
    return layer


def _semantic_encoder(config: TokenFlowConfig, external: nn.Module | None) -> nn.Module:
    if config.teacher == "external":
        if external is None:
            raise ValueError(
                f"TokenFlowTokenizer({config.name!r}): this config's semantic encoder is not built in; pass it as "
                "semantic_encoder=... (for vitamin_256: timm.create_model('vitamin_xlarge_256') with its `head` "
                "and `fc_norm` deleted; its forward_features must return (B, 256, 1152) tokens)")
        return external
    if external is not None:
        raise ValueError(f"TokenFlowTokenizer: semantic_encoder is only for teacher='external', not {config.teacher!r}")
    if config.teacher == "clip":
        return CLIPVisionTower(config.semantic_pretrain_size, config.semantic_patch, config.semantic_width,
                               config.semantic_layers, config.semantic_heads, config.semantic_mlp_width)
    tower = SiglipVisionTower(config.semantic_pretrain_size, config.semantic_patch, config.semantic_width,
                              config.semantic_layers, config.semantic_heads, config.semantic_mlp_width)
    tower.freeze_unread(layer=-2)  # the tokenizer reads hidden_states[-2]; the official run freezes the rest
    return tower


def _stored_config(path, text: str) -> TokenFlowConfig:
    """The config :meth:`TokenFlowTokenizer.save_pretrained` stored, or an error naming the file."""
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise TypeError(f"expected a JSON object, got {type(fields).__name__}")
        return TokenFlowConfig(**fields)
    except (TypeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{os.fspath(path)}: its stored tokenflow_ext config is broken ({error}); pass "
                              "config= one of 'clipb_224', 'clipb_256', 'siglip_384', 'vitamin_256' to use "
                              "the weights anyway") from error


class TokenFlowTokenizer(nn.Module):
    """TokenFlow's dual-encoder, shared-index tokenizer (official ``TokenFlow`` module, same state-dict keys).

    ::

        tok = TokenFlowTokenizer("clipb_256", enhanced_decoder=True)   # named config; kwargs override fields
        features, losses, indices = tok.encode(images)                 # images (B, 3, H, W) in [-1, 1]
        semantic, image = tok.decode(features)
        image = tok.decode_indices(indices)
        tok = TokenFlowTokenizer.from_pretrained("tokenflow_clipb_32k_enhanced.pt", config="clipb_256",
                                                 enhanced_decoder=True)

    Configs (``CONFIGS``): ``clipb_224`` (561 tokens), ``clipb_256`` (the t2i tokenizer: clipb at 256 px with
    interpolated positions, 817 tokens), ``siglip_384`` (the i2t tokenizer, 2227 tokens; the pixel branch
    runs at 432 px and its output is resized back to 384) and ``vitamin_256`` (needs timm's encoder passed
    as ``semantic_encoder``: ViTamin's hybrid conv/ViT stem is not rebuilt here).

    The multi-scale residual quantizer runs on the fused search and gather kernels: no ``N x K`` distance
    matrix, no one-hot. Differences from the official module: ``codebook_used`` is a buffer (a
    ``requires_grad`` Parameter officially), the SigLIP tower stops at the hidden state the tokenizer
    reads instead of running its last layer and head, and ``commit_loss_beta`` defaults to 0.25, the
    value of every released training run (``ModelArgs`` says 1.0).

    Inference: in eval mode (what :meth:`from_pretrained` returns), ``encode``, ``decode``,
    ``decode_indices``, ``features_from_indices`` and ``understanding_features`` run under
    ``torch.inference_mode()`` unless an input requires grad or the caller has turned autograd off itself;
    the results come back as normal tensors (usable later in autograd, e.g. by a trainable projector).
    :meth:`tokenize` always runs as inference. In training mode they build the autograd graph as usual.
    With ``teacher="siglip"`` the SigLIP parts the tokenizer never runs (the last layer,
    ``post_layernorm``, ``head``) are frozen, as in the official training.
    """

    def __init__(self, config: str | TokenFlowConfig = "clipb_256", *, semantic_encoder: nn.Module | None = None,
                 **overrides):
        super().__init__()
        self.config = config = resolve_config(config, **overrides)
        self.encoder = PixelEncoder(3, config.pixel_channels, config.channel_multipliers, config.encoder_res_blocks,
                                    config.z_channels, config.dropout)
        self.decoder = PixelDecoder(config.z_channels, config.decoder_channels, config.channel_multipliers,
                                    config.decoder_res_blocks, 3, config.dropout)
        self.quant_conv = nn.Conv2d(config.z_channels, config.pixel_code_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.pixel_code_dim, config.z_channels, 1)
        self.encoder_vqkd = _semantic_encoder(config, semantic_encoder)
        self.decoder_vqkd = SemanticDecoder(config.semantic_code_dim, config.decoder_width, config.decoder_layers,
                                            config.decoder_heads, config.decoder_grid)
        self.encode_task_layer = _task_layer(config.semantic_width, config.semantic_code_dim)
        self.decode_task_layer = _task_layer(config.decoder_width, config.decoder_out_dim)
        scaling = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}.get(config.semantic_scaling)
        self.scaling_layer = ScalingLayer(*scaling) if scaling else None
        self.quantize = DualCodebookQuantizer(config.codebook_size, config.semantic_code_dim, config.pixel_code_dim,
                                              beta=config.commit_loss_beta,
                                              entropy_loss_ratio=config.entropy_loss_ratio,
                                              pixel_weight=config.pixel_weight)
        # Shares self.quantize; kept out of the module tree so the state dict has the official keys only.
        self.__dict__["residual_quantizer"] = MultiScaleQuantizer(self.quantize, config.scales,
                                                                  random_scale_drop=config.random_scale_drop
                                                                  and len(config.scales) > 2)
        # Names the LLaVA integrations read from the official module.
        self.semantic_code_dim, self.vqgan_code_dim = config.semantic_code_dim, config.pixel_code_dim
        self.code_dim = self.embed_dim = config.code_dim
        self.n_embed, self.compression = config.codebook_size, config.compression
        self.scale_rq_layers = list(config.scales)

    def train(self, mode: bool = True):
        super().train(mode)
        self.residual_quantizer.train(mode)
        return self

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    def _check_images(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"TokenFlowTokenizer: images must be (B, 3, {size}, {size}), "
                             f"got {tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if not images.is_floating_point():
            note = (" (uint8 images are not accepted: convert with images.float() / 127.5 - 1)"
                    if images.dtype == torch.uint8 else "")
            raise TypeError(f"TokenFlowTokenizer: images must be floating point in [-1, 1], got {images.dtype}{note}")
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"TokenFlowTokenizer({self.config.name!r}): images must be {size}x{size}, "
                             f"got {tuple(images.shape[-2:])}")
        weight = self.quant_conv.weight
        if images.device != weight.device:
            raise ValueError(f"TokenFlowTokenizer: images are on {images.device}, the model on {weight.device}")
        check_image_range(images, "TokenFlowTokenizer", -1.0, 1.0)

    def semantic_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> semantic codes before quantization ``(B, semantic_code_dim, S, S)``."""
        x = images if self.scaling_layer is None else self.scaling_layer(images)
        if isinstance(self.encoder_vqkd, SiglipVisionTower):
            tokens = self.encoder_vqkd.forward_features(x, layer=-2)
        elif hasattr(self.encoder_vqkd, "forward_features"):
            tokens = self.encoder_vqkd.forward_features(x)
        else:
            tokens = self.encoder_vqkd(x)
        grid = self.config.semantic_grid
        if tokens.dim() != 3 or tokens.shape[1] != grid * grid:
            raise ValueError(f"TokenFlowTokenizer: the semantic encoder gave {tuple(tokens.shape)}, "
                             f"expected (B, {grid * grid}, C)")
        codes = self.encode_task_layer(tokens.to(self.encode_task_layer[-1].weight.dtype))
        return codes.transpose(1, 2).reshape(codes.shape[0], codes.shape[-1], grid, grid)

    def pixel_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> pixel codes before quantization ``(B, pixel_code_dim, S, S)``."""
        size = self.config.pixel_size
        x = images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="bicubic")
        return self.quant_conv(self.encoder(x))

    @inference_when_eval
    def encode(self, images: torch.Tensor, *, autocast_dtype: torch.dtype | None = None) -> EncodeResult:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> :class:`EncodeResult` ``(features, losses, indices)``.

        ``autocast_dtype`` (opt-in, default ``None`` = exact in the model's dtype): run the two encoders under
        ``torch.autocast`` to ``torch.bfloat16`` (or ``float16``); the multi-scale quantizer still runs in the
        model's dtype. Faster on CPUs with bf16 instructions (about 2x on one CPU core), but the indices are
        no longer those of the fp32 path: a code near a tie flips, and a flip changes the residual of every
        later scale, so the coarse scales agree and the fine ones diverge (random full-size weights: 73% of
        clipb_256's and 13% of siglip_384's indices matched). Use it where approximate tokens are acceptable."""
        self._check_images(images)
        with autocast_context(images, autocast_dtype):
            h = torch.cat([self.semantic_features(images), self.pixel_features(images)], dim=1)
        return EncodeResult(*self.residual_quantizer(h.to(self.quant_conv.weight.dtype)))

    def tokenize(self, images: torch.Tensor, *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Images -> shared indices ``(B, sum s^2)`` int64, scale by scale, row-major within a scale.

        Always runs as inference, whatever the module's mode: under ``torch.inference_mode()``, with every
        scale (no training-mode scale dropout) and without touching the quantizer's training state (usage
        window, EMA, k-means); the mode is restored afterwards. The indices come back as a normal tensor
        (not an inference tensor), so they can be edited in place and decoded by a model in training mode.
        ``autocast_dtype``: as in :meth:`encode` (opt-in bf16 encoders; approximate indices)."""
        with torch.inference_mode(), evaluating(self, self.residual_quantizer):
            indices = self.encode(images, autocast_dtype=autocast_dtype).indices
        return indices.clone()

    @inference_when_eval
    def understanding_features(self, images: torch.Tensor) -> torch.Tensor:
        """The features TokenFlow's i2t path feeds to the LLM projector: ``final_quantize`` as tokens
        ``(B, S*S, 40)`` (siglip_384: ``(B, 729, 40)``)."""
        features = self.encode(images).features
        return features.flatten(2).transpose(1, 2)

    def _check_features(self, features: torch.Tensor) -> None:
        grid, dim = self.config.semantic_grid, self.config.code_dim
        if not isinstance(features, torch.Tensor) or features.dim() != 4 or features.shape[1] != dim:
            raise ValueError(f"TokenFlowTokenizer: features must be (B, {dim}, {grid}, {grid}), got "
                             f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
        if not features.is_floating_point():
            raise TypeError(f"TokenFlowTokenizer: features must be floating point, got {features.dtype}")

    @inference_when_eval
    def decode_pixels(self, features: torch.Tensor) -> torch.Tensor:
        """The pixel half of ``decode``: features ``(B, 40, S, S)`` -> image ``(B, 3, image_size, image_size)``."""
        self._check_features(features)
        return self._pixels(features)

    def _pixels(self, features: torch.Tensor) -> torch.Tensor:
        image = self.decoder(self.post_quant_conv(features[:, self.config.semantic_code_dim:]))
        size = self.config.image_size
        if image.shape[-1] != size:  # siglip: 432 -> 384
            image = F.interpolate(image, size=(size, size), mode="bicubic")
        return image

    @inference_when_eval
    def decode(self, features: torch.Tensor) -> DecodeResult:
        """Features ``(B, 40, S, S)`` -> :class:`DecodeResult` ``(semantic, image)`` (official ``decode``)."""
        self._check_features(features)
        semantic = self.decode_task_layer(self.decoder_vqkd(features[:, :self.config.semantic_code_dim]))
        return DecodeResult(semantic, self._pixels(features))

    @inference_when_eval
    def features_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``(B, L)`` (all scales, or a prefix of them) -> features ``(B, 40, S, S)``."""
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.dtype == torch.bool:
            raise TypeError("TokenFlowTokenizer: indices must be an integer tensor")
        return self.residual_quantizer.decode_indices(indices)

    @inference_when_eval
    def decode_indices(self, indices: torch.Tensor, *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Indices ``(B, L)`` -> image ``(B, 3, image_size, image_size)`` (official ``decode_code``, pixel half).

        ``autocast_dtype`` (opt-in, default ``None`` = exact): run the pixel decoder under ``torch.autocast``
        to that dtype (``torch.bfloat16``); the image comes back in the model's dtype, within a few 1e-2 of
        the exact one on random weights."""
        features = self.features_from_indices(indices)
        with autocast_context(features, autocast_dtype):
            image = self.decode_pixels(features)
        return image.to(features.dtype)

    def forward(self, images: torch.Tensor) -> tuple[DecodeResult, tuple]:
        """Official ``forward``: ``((semantic, image), losses)``."""
        features, losses, _ = self.encode(images)
        return self.decode(features), losses

    # ----------------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: str | TokenFlowConfig | None = None, *,
                        strict: bool = True, map_location: Any = "cpu", dtype: torch.dtype | None = None,
                        semantic_encoder: nn.Module | None = None, filename: str | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool | None = None, **overrides) -> "TokenFlowTokenizer":
        """Load an official checkpoint (``tokenflow_clipb_32k_enhanced.pt`` with ``config="clipb_256",
        enhanced_decoder=True``; ``tokenflow_siglip_32k.pt`` with ``config="siglip_384"``) or what
        :meth:`save_pretrained` wrote (its config is stored; ``config`` may then be omitted).

        ``path`` may be a Hub id: ``"ByteFlow-AI/TokenFlow"`` with ``filename=``, or
        ``"ByteFlow-AI/TokenFlow/tokenflow_siglip_32k.pt"``, fetched into the Hub cache (``revision``,
        ``cache_dir``, ``local_files_only``, ``HF_HUB_OFFLINE``; :mod:`tokenflow_ext.hub`). The official files
        need no ``config=``: :data:`tokenflow_ext.hub.OFFICIAL_FILES` has their settings. A local path wins.

        Weights are read from the ``ema``, ``model`` or ``state_dict`` entry. ``strict`` (default) raises
        :class:`StateDictMismatchError` listing missing, unexpected and wrongly shaped keys; wrong shapes
        raise even when not strict. With ``strict`` the model is built on the meta device and takes the
        checkpoint's tensors (no random init of ~400 M parameters). Returned in eval mode.
        """
        from ... import hub  # noqa: PLC0415
        from .. import _folder  # noqa: PLC0415

        named = hub.split_id(os.fspath(path), filename)
        official = hub.official_settings(*named) if named else None
        if official is not None and config is None:
            settings = dict(official[1])
            config = settings.pop("config")
            overrides = {**settings, **overrides}
        path = hub.resolve_file(path, filename, revision=revision, cache_dir=cache_dir,
                                local_files_only=local_files_only)
        if _folder.is_model_folder(path):
            state, folder_config = _folder.load_folder(path, device=str(map_location))
            metadata = {"config": json.dumps(folder_config["tokenflow_ext"])} if "tokenflow_ext" in folder_config else {}
        else:
            state, metadata = read_checkpoint(path, map_location=map_location)
        if config is None:
            if "config" not in metadata:
                raise ValueError(f"{os.fspath(path)} stores no tokenflow_ext config: pass config= one of "
                                 "'clipb_224', 'clipb_256', 'siglip_384', 'vitamin_256'")
            config = _stored_config(path, metadata["config"])
        if strict:
            with torch.device("meta"):
                model = cls(config, semantic_encoder=semantic_encoder, **overrides)
            load_checked(model, state, strict=True, assign=True)
            leftover = [name for name, tensor in list(model.named_parameters()) + list(model.named_buffers())
                        if tensor.is_meta]
            if leftover:
                raise RuntimeError(f"TokenFlowTokenizer.from_pretrained: tensors not set by the checkpoint: {leftover}")
        else:
            model = cls(config, semantic_encoder=semantic_encoder, **overrides)
            load_checked(model, state, strict=False)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> str:
        """Write the state dict (official keys) and the config: safetensors for a ``.safetensors`` path, a
        torch file ``{"model": state_dict, "tokenflow_ext": {...}}`` that official loaders also read for a
        ``.pt`` / ``.pth`` / ``.bin`` path, and otherwise a folder in the Hugging Face layout
        (``config.json`` plus ``model.safetensors``, or shards with the standard index above
        ``max_shard_bytes``, default 5 GiB; :mod:`tokenflow_ext.models._folder`)."""
        from .. import _folder  # noqa: PLC0415

        config = dataclasses.asdict(self.config)
        if os.fspath(path).endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt")):
            return write_checkpoint(path, self.state_dict(), {"config": config})
        return _folder.save_folder(path, self.state_dict(), {"tokenflow_ext": config, "model_type": "tokenflow"},
                                   max_shard_bytes=max_shard_bytes or _folder.DEFAULT_SHARD_BYTES)
