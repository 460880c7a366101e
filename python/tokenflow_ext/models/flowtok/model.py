"""FlowTok: text -> image (and image -> text) by flowing directly between 77x16 token spaces (arXiv 2503.10772)."""

from __future__ import annotations

import inspect
import json
import numbers
import os
import re
import warnings
from typing import Any

import torch
from torch import nn

from ...flow import FlowMatchingLoss, GraphedSampler, logit_normal_timesteps, sample
from .. import _folder
from .._checkpoint import CheckpointError, StateDictMismatchError, load_checked, read_checkpoint, write_checkpoint
from .._inference import inference_when_eval
from .._layers import autocast_context
from .clip_text import CLIPTextEncoder
from .dit import FLOW_PRESETS, FlowTransformer
from .flowtitok import FlowTiTok
from .text_decoder import TextDecoder
from .text_projector import contrastive_alignment_loss, kl_divergence


def _part(value, default_factory):
    if value is True:
        return default_factory()
    if value is False or value is None:
        return None
    if isinstance(value, nn.Module):
        return value
    raise TypeError(f"FlowTok: expected True, False/None or a module, got {type(value).__name__}")


def parse_preset(preset: Any, where: str = "FlowTok") -> str | tuple[int, int, int]:
    """A flow-transformer preset in any of the forms the training CLI and its checkpoints use -> a name of
    ``FLOW_PRESETS`` or ``(depth, width, heads)``: ``"XL"`` (any case), ``(2, 64, 2)``, ``[2, 64, 2]``,
    ``"2,64,2"`` (also ``"(2, 64, 2)"`` / ``"[2, 64, 2]"``). Anything else raises a ``ValueError`` that names
    ``where`` and the accepted forms."""
    forms = f"a name of {list(FLOW_PRESETS)} or depth,width,heads (three integers, e.g. \"2,64,2\" or (2, 64, 2))"
    values = None
    if isinstance(preset, str):
        text = preset.strip()
        if text.upper() in FLOW_PRESETS:
            return text.upper()
        if "," in text:
            parts = [part.strip() for part in text.strip("()[] ").split(",")]
            if all(re.fullmatch(r"[+-]?\d+", part) for part in parts):
                values = [int(part) for part in parts]
        elif text == "tiny":
            raise ValueError(f"{where}: preset 'tiny' is a trial size of the training CLI (train flowtok --preset "
                             "tiny), not a model preset; its checkpoints store the preset and flow kwargs it stands "
                             "for, so FlowTok.from_pretrained needs no preset for them")
    elif isinstance(preset, (tuple, list)) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                   for v in preset):
        values = [int(v) for v in preset]
    if values is None or len(values) != 3:
        raise ValueError(f"{where}: unknown preset {preset!r}; expected {forms}")
    depth, width, heads = values
    if depth < 1 or width < 2 or heads < 1 or width % heads or width % 2:
        raise ValueError(f"{where}: preset {preset!r} is not (depth, width, heads) with positive values and an even "
                         "width that is a multiple of heads")
    return depth, width, heads


def _stored_value(text: Any) -> Any:
    """A value of the ``tokenflow_ext`` metadata entry: JSON text (lists, dicts) or a bare string (``"XL"``)."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _weights_shape(state: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """``(depth, width)`` of a flow transformer's state dict, or None when it has no DiT blocks."""
    embedder = state.get("x_embedder.weight")
    blocks = {int(match.group(1)) for key in state for match in [re.match(r"blocks\.(\d+)\.", key)] if match}
    if embedder is None or embedder.dim() != 2 or not blocks:
        return None
    return max(blocks) + 1, int(embedder.shape[0])


def _flow_options() -> set[str]:
    parameters = inspect.signature(FlowTransformer.__init__).parameters
    return {name for name, p in parameters.items() if p.kind == p.KEYWORD_ONLY}


def null_indicator_roll(x1: torch.Tensor, probability: float, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowTok's CFG training: each sample is null with ``probability``; the targets of the null samples
    are rolled by one within the null subset (each is paired with another sample's image). With at most
    one null sample nothing is null. Returns ``(targets, null_indicator)``; ``x1`` is not modified."""
    draws = torch.rand(x1.shape[0], generator=generator, device=generator.device if generator is not None else x1.device)
    null = (draws < probability).to(x1.device)
    if int(null.sum()) <= 1:
        return x1, torch.zeros_like(null)
    rolled = x1.clone()
    subset = rolled[null]
    rolled[null] = torch.cat([subset[1:], subset[:1]])
    return rolled, null


class FlowTok(nn.Module):
    """The FlowTok system: CLIP text tower, flow transformer (with the text projector), FlowTiTok tokenizer.

    ::

        model = FlowTok("XL")            # presets "S", "B", "L", "XL", "H", or (2, 64, 2) / "2,64,2": depth, width, heads
        loss, parts = model.training_loss(images_or_latents, text_tokens_or_features)
        images = model.generate(text_tokens_or_features, num_steps=20, guidance_scale=2.0)

    - ``nnet``: :class:`FlowTransformer`; its state dict is the released ``FlowTok-XL.pth`` / ``-H.pth``.
    - ``text_encoder``: :class:`CLIPTextEncoder` (frozen), used when text comes as token ids ``(B, 77)``;
      text given as features ``(B, 77, 768)`` skips it. ``text_encoder=False`` leaves it out.
    - ``tokenizer``: :class:`FlowTiTok` (frozen), used when images come as ``(B, 3, S, S)`` in [0, 1] and to
      decode samples; latents ``(B, 77, 16)`` skip it. ``tokenizer=False`` leaves it out.
    - ``text_decoder``: optional :class:`TextDecoder` for :meth:`image_to_text`.

    Any of them can be passed as a module instead of ``True``. :meth:`generate` and :meth:`image_to_text`
    never build a graph; in eval mode (what :meth:`from_pretrained` returns) they run under
    ``torch.inference_mode()`` and hand back normal tensors.

    Loss weights default to the official
    ones: ``kl_weight`` 0.01 (``kl_form="official"``, or ``"standard"``), ``align_weight`` 1.0,
    ``cfg_probability`` 0.1. ``flow_kwargs`` go to :class:`FlowTransformer`.
    """

    def __init__(self, preset: str | tuple[int, int, int] = "XL", *, text_encoder: Any = True, tokenizer: Any = True,
                 text_decoder: Any = None, image_size: int = 256, kl_weight: float = 0.01, kl_form: str = "official",
                 align_weight: float = 1.0, cfg_probability: float = 0.1, sigma_min: float = 1e-5,
                 **flow_kwargs):
        super().__init__()
        if kl_form not in ("official", "standard"):
            raise ValueError(f"FlowTok: kl_form must be 'official' or 'standard', got {kl_form!r}")
        self.nnet = FlowTransformer(parse_preset(preset), **flow_kwargs)
        self.preset, self.flow_kwargs = parse_preset(preset), dict(flow_kwargs)  # what save_pretrained records
        self.text_encoder = _part(text_encoder, CLIPTextEncoder)
        self.tokenizer = _part(tokenizer, lambda: FlowTiTok(image_size))
        self.text_decoder = _part(text_decoder, TextDecoder)
        for frozen in (self.text_encoder, self.tokenizer):
            if frozen is not None:
                frozen.requires_grad_(False)
        self.kl_weight, self.kl_form, self.align_weight = kl_weight, kl_form, align_weight
        self.cfg_probability = cfg_probability
        self.flow_loss = FlowMatchingLoss(sigma_min)

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.text_encoder, self.tokenizer):  # frozen towers stay in eval mode
            if frozen is not None:
                frozen.eval()
        return self

    # --------------------------------------------------------------------------------------- inputs

    def text_features(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, 77)`` (through the CLIP tower) or features ``(B, 77, clip_dim)`` -> features."""
        if isinstance(text, torch.Tensor) and text.dim() == 2 and not text.is_floating_point():
            if self.text_encoder is None:
                raise ValueError("FlowTok: text given as token ids needs the CLIP text encoder, and this model has "
                                 "none (give FlowTok(text_encoder=...) or from_pretrained(text_encoder_path=...); "
                                 "the training CLI's flag is --clip-text); or pass CLIP features (B, 77, "
                                 f"{self.nnet.clip_dim}) instead")
            with torch.no_grad():
                return self.text_encoder(text)
        if not isinstance(text, torch.Tensor) or text.dim() != 3 or not text.is_floating_point():
            raise ValueError("FlowTok: text must be CLIP token ids (B, 77) int64 or features (B, 77, C) float, got "
                             f"{tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__}")
        return text

    def image_latents(self, images_or_latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``(B, 3, S, S)`` in [0, 1] (through FlowTiTok, a posterior sample times 1.0143) or latents
        ``(B, 77, 16)`` -> latents."""
        x = images_or_latents
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            if self.tokenizer is None:
                raise ValueError("FlowTok: images need the FlowTiTok tokenizer, and this model has none (give "
                                 "FlowTok(tokenizer=...) or from_pretrained(tokenizer_path=...); the training "
                                 "CLI's flag is --flowtitok); or pass FlowTiTok latents (B, 77, 16) instead")
            with torch.no_grad():
                return self.tokenizer.encode(x, generator=generator)
        shape = (self.nnet.tokens, self.nnet.channels)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1:] != shape or not x.is_floating_point():
            raise ValueError(f"FlowTok: expected images (B, 3, S, S) or latents (B, {shape[0]}, {shape[1]}) float, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        return x

    def missing_parts(self, images_or_latents: Any = None, text: Any = None) -> list[str]:
        """The parts that batched inputs of these forms need and this model lacks: ``"tokenizer"`` for images
        ``(B, 3, S, S)``, ``"text_encoder"`` for token ids ``(B, 77)`` or caption strings. Lets a caller (a
        command line) stop with its own flag names before any work, instead of at the first batch; ``None``
        inputs are not checked. Reads only shapes and dtypes (no device sync)."""
        missing = []
        if (self.tokenizer is None and isinstance(images_or_latents, torch.Tensor)
                and images_or_latents.dim() == 4):
            missing.append("tokenizer")
        ids = isinstance(text, torch.Tensor) and not text.is_floating_point()
        captions = isinstance(text, str) or (isinstance(text, (list, tuple)) and bool(text)
                                             and isinstance(text[0], str))
        if self.text_encoder is None and (ids or captions):
            missing.append("text_encoder")
        return missing

    # --------------------------------------------------------------------------------------- training

    def training_loss(self, images_or_latents: torch.Tensor, text: torch.Tensor, *,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``flow + kl_weight * KL + align_weight * contrastive`` on one batch -> ``(loss, parts)``.

        The flow term runs on the fused ops (interpolation and loss with their fused backward), with
        logit-normal ``t``; gradients reach the text projector through ``x_t`` and the target. In training
        mode, null samples (CFG) get rolled targets (:func:`null_indicator_roll`). ``generator`` (on any
        device) makes every draw reproducible. An empty batch gives zero losses and a warning."""
        x1 = self.image_latents(images_or_latents, generator)
        features = self.text_features(text)
        if features.shape[0] != x1.shape[0]:
            raise ValueError(f"FlowTok: {x1.shape[0]} images but {features.shape[0]} texts")
        if x1.shape[0] == 0:  # means over no samples are NaN: zeros, still connected to every trainable tensor
            warnings.warn("FlowTok.training_loss: empty batch (B = 0); the losses are zeros", RuntimeWarning,
                          stacklevel=2)
            zero = sum((p.sum() for p in self.parameters() if p.requires_grad), x1.new_zeros(())) * 0.0
            return zero, {"flow": zero, "kl": zero, "align": zero}
        x0, mu, log_var = self.nnet.encode_text(features, generator=generator)
        parts = {}
        zero = x0.new_zeros(())
        parts["kl"] = self.kl_weight * kl_divergence(mu, log_var, self.kl_form) if self.kl_weight else zero
        parts["align"] = (self.align_weight * contrastive_alignment_loss(x0, self.nnet.align_text(features),
                                                                         self.nnet.t2t_temperature)
                          if self.align_weight else zero)
        targets, null = null_indicator_roll(x1, self.cfg_probability if self.training else 0.0, generator)
        t = logit_normal_timesteps(x0.shape[0], device=generator.device if generator is not None else x0.device,
                                   generator=generator).to(x0.device)
        parts["flow"] = self.flow_loss(self.nnet, x0, targets.to(x0.dtype), t, null_indicator=null)
        return parts["flow"] + parts["kl"] + parts["align"], parts

    # --------------------------------------------------------------------------------------- sampling

    def _velocity(self, guidance_scale: float, autocast_dtype: torch.dtype | None = None):
        def velocity(x: torch.Tensor, t: torch.Tensor):
            with autocast_context(x, autocast_dtype):
                if guidance_scale == 1.0:
                    v = self.nnet(x, t, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
                else:
                    null = torch.cat([torch.zeros(x.shape[0], dtype=torch.bool, device=x.device),
                                      torch.ones(x.shape[0], dtype=torch.bool, device=x.device)])
                    v = self.nnet(torch.cat([x, x]), torch.cat([t, t]), null)  # stacked [cond; uncond]
            return v.to(x.dtype)  # the Euler state stays in the latents' dtype
        return velocity

    @inference_when_eval
    @torch.no_grad()
    def generate(self, text: torch.Tensor, num_steps: int = 20, guidance_scale: float = 2.0, *,
                 time_grid: str = "flowtok", decode: bool = True, generator: torch.Generator | None = None,
                 progress: bool = False, autocast_dtype: torch.dtype | None = None,
                 cuda_graph: bool = False) -> torch.Tensor:
        """Text (token ids ``(B, 77)`` or CLIP features ``(B, 77, 768)``) -> images ``(B, 3, S, S)`` in [0, 1]
        (``decode=False`` or no tokenizer: latents ``(B, 77, 16)``). The text latent is sampled from the
        projector (the only randomness), then ``num_steps`` Euler steps with CFG on the velocity
        ``v_u + s (v_c - v_u)`` run through the fused step (``time_grid="flowtok"``: the official times).

        ``autocast_dtype`` (opt-in, default ``None`` = exact): run the flow transformer's forward passes under
        ``torch.autocast`` to that dtype (``torch.bfloat16``); the text latent, the Euler state and the
        decoder stay in the model's dtype. The latents then differ from the exact ones by bf16 rounding
        carried through the steps (measured in the benchmark's agreement column).

        ``cuda_graph=True`` (CUDA only): the whole Euler loop runs as one CUDA graph (:class:`GraphedSampler`),
        captured on the first call and replayed by the next calls with the same batch shape, dtype, step count,
        guidance scale, time grid and autocast setting (another setting replaces it); same values as the eager
        loop. The graphs read the flow transformer's weights in place (in-place updates are seen; reallocated
        weights, e.g. after ``.to()``, give a new capture); :meth:`clear_cuda_graphs` frees them. No progress
        bar in a graph."""
        features = self.text_features(text)
        x0, _, _ = self.nnet.encode_text(features, generator=generator)
        if cuda_graph:
            latents = self._graphed_sampler(x0, num_steps, guidance_scale, time_grid, autocast_dtype)(x0)
        else:
            latents = sample(self._velocity(guidance_scale, autocast_dtype), x0, num_steps=num_steps,
                             guidance_scale=guidance_scale, time_grid=time_grid, progress=progress)
        if not decode or self.tokenizer is None:
            return latents
        return self.tokenizer.decode(latents, features)

    def _graphed_sampler(self, x0: torch.Tensor, num_steps: int, guidance_scale: float, time_grid: str,
                         autocast_dtype: torch.dtype | None) -> GraphedSampler:
        if x0.device.type != "cuda":
            raise ValueError(f"FlowTok.generate: cuda_graph=True needs the model on a CUDA device, got {x0.device}")
        weights = tuple((p.data_ptr(), p.dtype) for p in self.nnet.parameters())
        outer_autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (tuple(x0.shape), x0.dtype, x0.device, num_steps, float(guidance_scale), time_grid, autocast_dtype,
               outer_autocast, torch.is_inference_mode_enabled(), weights)
        samplers = self.__dict__.setdefault("_graphed_samplers", {})
        if key not in samplers:
            samplers.clear()  # one capture at a time: each keeps its own memory pool
            samplers[key] = GraphedSampler(self._velocity(guidance_scale, autocast_dtype), x0, num_steps=num_steps,
                                           guidance_scale=guidance_scale, time_grid=time_grid)
        return samplers[key]

    def clear_cuda_graphs(self) -> None:
        """Drop the CUDA graphs of ``generate(cuda_graph=True)`` and the memory they hold."""
        self.__dict__.pop("_graphed_samplers", None)

    def __getstate__(self):  # copy.deepcopy (EMA copies) and pickling leave the captured graphs behind
        state = dict(super().__getstate__())
        state.pop("_graphed_samplers", None)
        return state

    @inference_when_eval
    @torch.no_grad()
    def image_to_text(self, images_or_latents: torch.Tensor, num_steps: int = 20, guidance_scale: float = 1.0, *,
                      time_grid: str = "uniform", decode: bool = True, progress: bool = False) -> torch.Tensor:
        """Images (or their latents) -> the reverse flow to 77x16 text latents -> CLIP token ids ``(B, 77)``
        through ``text_decoder`` (``decode=False`` or no decoder: the text latents)."""
        x1 = self.image_latents(images_or_latents)
        text_latents = sample(self._velocity(guidance_scale), x1, num_steps=num_steps, guidance_scale=guidance_scale,
                              time_grid=time_grid, reverse=True, progress=progress)
        if not decode or self.text_decoder is None:
            return text_latents
        return self.text_decoder.generate(text_latents)

    # --------------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, flow_path: str | os.PathLike, preset: str | tuple[int, int, int] | None = None, *,
                        tokenizer_path: str | os.PathLike | None = None,
                        text_encoder_path: str | os.PathLike | None = None, text_decoder: nn.Module | None = None,
                        strict: bool = True, tokenizer_kwargs: dict | None = None,
                        text_encoder_kwargs: dict | None = None, filename: str | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool | None = None, **kwargs) -> "FlowTok":
        """``FlowTok-XL.pth`` / ``FlowTok-H.pth`` (the flow transformer's state dict) or a checkpoint of
        ``python -m tokenflow_ext train flowtok`` (its EMA weights when it has them), optionally
        ``FlowTiTok_512.bin`` (its resolution is read from the file) and a CLIP ViT-L/14-336 file; parts
        without a path are left out. ``tokenizer_kwargs`` / ``text_encoder_kwargs`` size those parts when they
        are not the official ones. Strict by default (:class:`StateDictMismatchError`). Eval mode.

        ``preset``: ``"XL"``, ``(2, 64, 2)``, ``[2, 64, 2]`` or ``"2,64,2"`` (the training CLI's forms). ``None``
        (the default): the preset the checkpoint stores (training-CLI files); for a file that stores none
        (the released ones), the official preset whose depth and width its weights have; otherwise an error
        that says what to pass. The flow kwargs the checkpoint stores (``text_layers``, ...) apply unless
        given here (a keyword given here wins). A given preset wins over the stored one; if the weights then
        do not fit, the mismatch report names the stored preset.

        Every path may be a Hub id: ``"turkeyju/FlowTok/FlowTok-XL.pth"`` (or ``"turkeyju/FlowTok"`` with
        ``filename=``), ``tokenizer_path="turkeyju/FlowTok/FlowTiTok_512.bin"``, fetched into the Hub cache
        (``revision``, ``cache_dir``, ``local_files_only``, ``HF_HUB_OFFLINE``; :mod:`tokenflow_ext.hub`)."""
        from ... import hub  # noqa: PLC0415

        def fetch(name, file=None):
            return hub.resolve_file(name, file, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only)

        path = fetch(flow_path, filename)
        tokenizer_path = fetch(tokenizer_path) if tokenizer_path is not None else None
        text_encoder_path = fetch(text_encoder_path) if text_encoder_path is not None else None
        if _folder.is_model_folder(path):  # save_pretrained's folder: the settings are in config.json
            state, config = _folder.load_folder(path)
            metadata = {key: json.dumps(value) for key, value in config.get("tokenflow_ext", {}).items()}
        else:
            state, metadata = read_checkpoint(path)
        stored_preset, stored_flow = _stored_value(metadata.get("preset")), _stored_value(metadata.get("flow_kwargs"))
        shape = _weights_shape(state)
        if preset is None:
            preset = cls._preset_of_file(path, stored_preset, shape)
        else:
            preset = parse_preset(preset, "FlowTok.from_pretrained")
        flow_kwargs = {}
        if stored_flow is not None:
            if not isinstance(stored_flow, dict) or set(stored_flow) - _flow_options():
                problem = (f"unknown fields {sorted(set(stored_flow) - _flow_options())}"
                           if isinstance(stored_flow, dict) else f"a {type(stored_flow).__name__}, not a dict")
                raise CheckpointError(f"{path}: its stored flow_kwargs {metadata.get('flow_kwargs')!r} are broken "
                                      f"({problem}); the FlowTransformer options are {sorted(_flow_options())}")
            flow_kwargs = {key: value for key, value in stored_flow.items() if key not in kwargs}
        with torch.device("meta"):
            model = cls(preset, text_encoder=None, tokenizer=None, text_decoder=text_decoder, **flow_kwargs, **kwargs)
        try:
            load_checked(model.nnet, state, strict=strict, assign=True)
        except StateDictMismatchError as error:
            notes = [f"FlowTok.from_pretrained({path!r}): built preset {preset!r}"
                     + (f" with flow_kwargs {flow_kwargs}" if flow_kwargs else "")]
            if stored_preset is not None:
                notes.append(f"the file stores preset {stored_preset!r}"
                             + (f" and flow_kwargs {stored_flow!r}" if stored_flow else "")
                             + " (pass preset=None to use them)")
            if shape is not None:
                notes.append(f"its weights have {shape[0]} blocks of width {shape[1]}")
            headline, _, details = error.args[0].partition("\n")  # the note right under the headline
            error.args = ("\n".join([headline, "  note: " + "; ".join(notes)] + ([details] if details else [])),)
            raise
        if tokenizer_path is not None:
            model.tokenizer = FlowTiTok.from_pretrained(tokenizer_path, strict=strict,
                                                       **(tokenizer_kwargs or {})).requires_grad_(False)
        if text_encoder_path is not None:
            model.text_encoder = CLIPTextEncoder.from_pretrained(text_encoder_path,
                                                                 **(text_encoder_kwargs or {})).requires_grad_(False)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> str:
        """Write the flow transformer's state dict (the released files' keys) with its preset and flow kwargs:
        a torch file for a ``.pt`` / ``.pth`` / ``.bin`` path, one ``.safetensors`` file, or otherwise a
        Hugging Face-layout folder (``config.json`` + ``model.safetensors``, or indexed shards above
        ``max_shard_bytes``, default 5 GiB). :meth:`from_pretrained` reads each back without a preset; the
        frozen parts (FlowTiTok, CLIP) keep their own files."""
        settings = {"preset": list(self.preset) if isinstance(self.preset, tuple) else self.preset,
                    "flow_kwargs": self.flow_kwargs}
        if os.fspath(path).endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt")):
            return write_checkpoint(path, self.nnet.state_dict(), settings)
        return _folder.save_folder(path, self.nnet.state_dict(), {"tokenflow_ext": settings, "model_type": "flowtok"},
                                   max_shard_bytes=max_shard_bytes or _folder.DEFAULT_SHARD_BYTES)

    @staticmethod
    def _preset_of_file(path: str, stored: Any, shape: tuple[int, int] | None) -> str | tuple[int, int, int]:
        """The preset a checkpoint stores, else the official preset of its weights' depth and width, else an
        error naming the file and what to pass."""
        if stored is not None:
            try:
                return parse_preset(stored, "stored")
            except ValueError as error:
                raise CheckpointError(f"{path}: its stored FlowTok preset {stored!r} is broken ({error}); pass "
                                      "preset= to use the weights anyway") from None
        if shape is not None:
            for name, (depth, width, _) in FLOW_PRESETS.items():
                if (depth, width) == shape:
                    return name
            raise ValueError(f"{path} stores no FlowTok preset and its weights ({shape[0]} blocks of width "
                             f"{shape[1]}) are no official preset: pass preset=({shape[0]}, {shape[1]}, heads) with "
                             "the number of attention heads it was trained with, and its flow kwargs (as given to "
                             "train flowtok --preset and --flow-kwargs)")
        raise ValueError(f"{path} stores no FlowTok preset and has no flow-transformer blocks to read one from: pass "
                         f"preset= one of {list(FLOW_PRESETS)} or (depth, width, heads)")
