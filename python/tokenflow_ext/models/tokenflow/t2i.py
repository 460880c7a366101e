"""TokenFlow's text-to-image model: a Llama-2 decoder with QKNorm that predicts the 817 codes of
the clipb_256 tokenizer scale by scale, with a KV-cached version of the official sampler.

Sequence layout of one row (``P`` prefix ids: ``[PAD]`` left padding, BOS, text, the ids of ``"<img>"``)::

    position   0 .. P-2        P-1              P .. P+L-2                       P+L-1        after
    content    text            last text id     L-1 progressive image inputs     placeholder  text
    lvl_embed  0               0                i+1 for the inputs of scale i    0            0
    pos_1LC    -               row 0            rows 1 .. L-1                    -            -

with ``L = sum s_i^2`` (817). The hidden state at position ``P-1+j`` predicts code ``j`` (row-major, scale by
scale): scale ``i``'s block of inputs (``progressive_inputs``: the running sum of the coarser scales' code
vectors, bicubically resized to ``s_i``, projected by ``mm_projector``) sits exactly where its codes are
predicted. Attention is causal, except that the ``L`` positions from ``P-1`` on are block-causal by scale
(query sees key iff ``scale(q) >= scale(k)``), and ``[PAD]`` keys are never attended.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import _folder
from .._checkpoint import StateDictMismatchError, load_checked
from .generation import (REFINEMENT_PRESETS, guidance_ramp, guided_logits, image_vocabulary_logits, input_level_ids,
                         progressive_inputs, sample_logits, scale_of_position)
from .llama import LlamaDecoderLayer, LlamaShape, RMSNorm, rope_cos_sin, rope_inverse_frequencies, run_layers

IGNORE_INDEX = -100
IMAGE_START_TEXT = "<img>"
# The negative prompt of TF:t2i/llava_t2i/eval/run_llava_samples.py (the unconditional half of the CFG batch).
OFFICIAL_NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, "
                            "fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, "
                            "signature, watermark, username, blurry.")
CLIPB_256_SCALES = (1, 2, 4, 6, 8, 10, 12, 14, 16)
# The vision tower path of the official t2i recipe (TF:t2i/scripts/train_t2i.sh --vision_tower). The official
# loader (TF:t2i/llava_t2i/eval/run_llava_samples.py) replaces it with its --tokenizer-path.
OFFICIAL_VISION_TOWER = "../pretrained_ckpts/tokenflow_clipb_32k_enhanced.pt"
# The ``model.config.*`` fields official t2i training sets before ``trainer.save_model`` that do not depend on the
# model's sizes, with the recipe's values (TF:t2i/llava_t2i/train/train.py ``train``, TF:t2i/llava_t2i/model/
# llava_arch.py ``initialize_vision_modules``, TF:t2i/scripts/train_t2i.sh). ``mm_vision_tower`` must be in
# config.json: the official loader passes ``mm_vision_tower=`` to ``from_pretrained``, which transformers applies
# to the config only for a key the config already has (else the model's ``__init__`` gets it: TypeError).
OFFICIAL_TRAINING_FIELDS: dict[str, Any] = {
    "mm_vision_vq_type": "TOKEN_FLOW",          # --mm_vision_vq_type TOKEN_FLOW (stored as VQType.name)
    "use_mm_proj": True,
    "mm_projector_type": "mlp2x_gelu",          # --mm_projector_type mlp2x_gelu
    "mm_vision_select_layer": -1,               # ModelArguments defaults
    "mm_vision_select_feature": "patch",
    "mm_patch_merge_type": "flat",
    "mm_use_im_start_end": False,               # --mm_use_im_start_end False
    "mm_use_im_patch_token": False,             # --mm_use_im_patch_token False
    "mm_use_vq_token": True,                    # --mm_use_vq_token True
    "tune_mm_mlp_adapter": False,               # ModelArguments / TrainingArguments defaults
    "tune_mm_mlp_adapter_and_logits": False,
    "freeze_mm_mlp_adapter": False,
    "image_aspect_ratio": "pad",                # --image_aspect_ratio pad
    "tokenizer_padding_side": "right",          # the text tokenizer is loaded with padding_side="right"
    "use_cache": False,
    "output_hidden_states": True,               # ModelArguments.output_hidden_states
}


@dataclass(frozen=True)
class T2IConfig:
    """Sizes and vocabulary of :class:`TokenFlowT2I` (Hugging Face ``LlamaConfig`` field names where they exist).

    The image vocabulary is ``[image_token_start, image_token_start + image_vocab_size)`` (``<vq_token_k>``).
    Released 7B defaults follow the official training code: Llama-2's 32000 ids, ``[PAD]`` = 32000 added
    first, then the 32768 image ids (``image_token_start`` 32001), ``vocab_size`` 64769. A ``config.json`` read
    by :meth:`TokenFlowT2I.from_pretrained` overrides the sizes it holds.
    """
    vocab_size: int = 64769
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    scales: tuple[int, ...] = CLIPB_256_SCALES
    code_dim: int = 40                      # mm_hidden_size: 32 semantic + 8 pixel channels
    image_token_start: int = 32001
    image_vocab_size: int = 32768           # vq_codebook_size
    pad_token_id: int | None = 32000        # [PAD]: never attended as a key
    bos_token_id: int = 1
    max_text_tokens: int = 128              # prompts are left-padded / truncated to this (official max_text_token_num)
    tokenizer_model_max_length: int = 2048
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if not self.scales or self.scales[0] != 1 or min(self.scales) < 1:
            raise ValueError(f"T2IConfig: scales must start with 1 (the official layout predicts the 1x1 scale from "
                             f"the last text token), got {self.scales}")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("T2IConfig: hidden_size must divide into num_attention_heads heads, and those into "
                             "num_key_value_heads groups")
        if not 0 <= self.image_token_start < self.image_token_start + self.image_vocab_size <= self.vocab_size:
            raise ValueError(f"T2IConfig: image ids [{self.image_token_start}, "
                             f"{self.image_token_start + self.image_vocab_size}) exceed vocab_size {self.vocab_size}")

    @property
    def image_token_end(self) -> int:
        """The last image id (inclusive, as the official attribute)."""
        return self.image_token_start + self.image_vocab_size - 1

    @property
    def tokens_per_image(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def shape(self) -> LlamaShape:
        return LlamaShape(self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.num_attention_heads,
                          self.num_key_value_heads, self.rms_norm_eps, self.rope_theta)

    def to_hf_config(self, vision_tower: str | None = None) -> dict[str, Any]:
        """A ``config.json`` dict in the official ``llava_llama`` form, with this config under ``"tokenflow_ext"``:
        the Llama sizes plus every field official t2i training writes (:data:`OFFICIAL_TRAINING_FIELDS`,
        ``mm_hidden_size``, ``vq_codebook_size``, ``tokenizer_model_max_length`` and ``mm_vision_tower``:
        ``vision_tower``, default :data:`OFFICIAL_VISION_TOWER`), so the official loader reads the folder."""
        return {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_act": "silu",
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
                "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": None,
                "attention_bias": False, "mlp_bias": False, "max_position_embeddings": self.max_position_embeddings,
                "mm_vision_tower": OFFICIAL_VISION_TOWER if vision_tower is None else str(vision_tower),
                "mm_hidden_size": self.code_dim, "vq_codebook_size": self.image_vocab_size, **OFFICIAL_TRAINING_FIELDS,
                "tokenizer_model_max_length": self.tokenizer_model_max_length, "pad_token_id": self.pad_token_id,
                "bos_token_id": self.bos_token_id, "tokenflow_ext": dataclasses.asdict(self)}

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides) -> "T2IConfig":
        """Read a ``config.json`` dict. Our own files carry the full config under ``"tokenflow_ext"``; official
        ones give the Llama sizes, ``mm_hidden_size``, ``vq_codebook_size`` and ``tokenizer_model_max_length``
        (the image id range and the scales come from the tokenizer, so the 7B defaults are kept). The other
        official training fields (``mm_vision_tower``, ``use_cache``, ...) are not needed and are ignored."""
        vq_type = str(hf.get("mm_vision_vq_type", "TOKEN_FLOW")).removeprefix("VQType.")
        if vq_type != "TOKEN_FLOW":  # run_llava_samples.py rewrites it as str(VQType.TOKEN_FLOW)
            raise ValueError(f"TokenFlowT2I: mm_vision_vq_type must be TOKEN_FLOW (a TokenFlow text-to-image model), "
                             f"got {hf['mm_vision_vq_type']!r}")
        if "tokenflow_ext" in hf:
            fields = dict(hf["tokenflow_ext"])
        else:
            if hf.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
                raise ValueError(f"TokenFlowT2I: only mm_projector_type 'mlp2x_gelu' is supported, "
                                 f"got {hf['mm_projector_type']!r}")
            if hf.get("rope_scaling") or hf.get("attention_bias") or hf.get("mlp_bias") or \
                    hf.get("hidden_act", "silu") != "silu":
                raise ValueError("TokenFlowT2I: rope_scaling, attention/MLP biases and activations other than silu "
                                 "are not supported")
            renamed = {"mm_hidden_size": "code_dim", "vq_codebook_size": "image_vocab_size"}
            known = {field.name for field in dataclasses.fields(cls)} - {"pad_token_id", "bos_token_id", "name"}
            fields = {renamed.get(key, key): value for key, value in hf.items() if renamed.get(key, key) in known}
            # The <vq_token_k> ids are the last ones the training script adds (after [PAD] = 32000); [PAD] and BOS
            # come from the text tokenizer, not from config.json (override them if yours differ).
            if "vocab_size" in fields:
                vocab = int(fields["vocab_size"])
                fields["image_token_start"] = vocab - int(fields.get("image_vocab_size", cls.image_vocab_size))
            fields["name"] = "hf"
        fields.update(overrides)
        return cls(**fields)


CONFIGS: dict[str, T2IConfig] = {
    # The released model (ByteFlow-AI/TokenFlow-t2i): Llama-2-7B sizes.
    "7b": T2IConfig(name="7b"),
    # Test size: 3 scales (14 codes), text ids 0..9, image ids 10..25, </img> = 26, [PAD] = 27 (after the image
    # vocabulary, as when the tokenizer gains [PAD] at inference: the id the official sampler forgets to mask).
    "tiny": T2IConfig(vocab_size=28, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, scales=(1, 2, 3), image_token_start=10, image_vocab_size=16,
                      pad_token_id=27, bos_token_id=1, max_text_tokens=6, tokenizer_model_max_length=64,
                      max_position_embeddings=64, name="tiny"),
}


def resolve_config(config: str | T2IConfig, **overrides) -> T2IConfig:
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"TokenFlowT2I: unknown config {config!r}; choose one of {sorted(CONFIGS)}")
        config = CONFIGS[config]
    if not isinstance(config, T2IConfig):
        raise TypeError(f"TokenFlowT2I: config must be a name or a T2IConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **overrides) if overrides else config


class T2IBackbone(nn.Module):
    """The ``model.*`` part of the checkpoint: Llama (``embed_tokens``, ``layers``, ``norm``) plus TokenFlow's
    ``mm_projector`` (Linear 40->H, GELU, Linear H->H), ``lvl_embed`` ``(S+1, H)`` and ``pos_1LC`` ``(L, H)``."""

    def __init__(self, config: T2IConfig):
        super().__init__()
        width = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, width)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config.shape) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(width, eps=config.rms_norm_eps)
        self.mm_projector = nn.Sequential(nn.Linear(config.code_dim, width), nn.GELU(), nn.Linear(width, width))
        self.lvl_embed = nn.Embedding(len(config.scales) + 1, width)
        self.pos_1LC = nn.Parameter(torch.empty(config.tokens_per_image, width))


class T2IOutput(NamedTuple):
    """``loss``: mean cross-entropy over the labelled positions (None without labels); ``logits``:
    ``(B, T, V)`` float32 (None when only the loss was asked for)."""
    loss: torch.Tensor | None
    logits: torch.Tensor | None


class T2IGeneration(NamedTuple):
    """``codes`` ``(B, L)`` int64 in ``[0, K)`` (scale by scale, row-major); ``images`` ``(B, 3, H, W)`` in
    [-1, 1] from ``TokenFlowTokenizer.decode_indices`` when an image tokenizer was given, else None."""
    codes: torch.Tensor
    images: torch.Tensor | None


def sample_scale(logits: torch.Tensor, *, guidance: float, top_k: int, top_p: float, image_token_start: int,
                 image_vocab_size: int, generator: torch.Generator | None = None, exact: bool = True) -> torch.Tensor:
    """One scale's draw, the official semantics (``autoregressive_infer_cfg`` + ``sample_with_top_k_top_p_``).

    ``logits`` ``(2B, n, V)`` float32: the conditional rows, then the unconditional ones. With
    ``t = guidance``: ``g = (1 + t) * cond - t * uncond``; every id outside the image vocabulary gets ``-inf``
    (the official code masks only the ids below it); top-k (keep ``>=`` the k-th largest), top-p (drop the
    ascending-cumsum ``<= 1 - p`` tail, keep the top one); one ``torch.multinomial`` draw per position from the
    softmax. Returns codes ``(B, n)`` int64 in ``[0, image_vocab_size)``.

    ``exact=True`` filters and draws over the full vocabulary (``-inf`` outside the image ids), the tensor
    shape the official call uses, so a generator yields the same draws as the official loop. ``exact=False``
    draws over the image slice only: the same distribution, a different random stream.

    This is the per-scale hook of :meth:`TokenFlowT2I.generate` (``sampler=``): a fused kernel with this
    signature can replace it.
    """
    batch = logits.shape[0] // 2
    guided = guided_logits(logits[:batch], logits[batch:], guidance)
    if not exact:
        image = image_vocabulary_logits(guided, image_token_start, image_vocab_size)
        return sample_logits(image, top_k, top_p, generator)
    stop = image_token_start + image_vocab_size
    guided[..., :image_token_start] = float("-inf")
    guided[..., stop:] = float("-inf")
    return sample_logits(guided, top_k, top_p, generator) - image_token_start


Sampler = Callable[..., torch.Tensor]
SAMPLERS = ("python", "fused")


def resolve_sampler(sampler: Sampler | str | None) -> Sampler:
    """``None`` / ``"python"``: :func:`sample_scale`; ``"fused"``: the one-kernel
    ``tokenflow_ext.ops.sample_logits.sample_scale_fused`` (same distribution, its own Philox stream seeded from
    the generator); a callable is used as it is."""
    if sampler is None or sampler == "python":
        return sample_scale
    if sampler == "fused":
        from ...ops.sample_logits import sample_scale_fused
        return sample_scale_fused
    if isinstance(sampler, str) or not callable(sampler):
        raise ValueError(f"TokenFlowT2I: sampler must be one of {SAMPLERS} or a callable, got {sampler!r}")
    return sampler


def refinement_lists(refinement: str | int | None, top_k, top_p) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``(top_k per pass, top_p per pass)`` from a preset (``"loop1"``/``"loop2"``/``"loop3"`` or 1/2/3) and
    optional overrides: an int/float overrides every pass, a list gives the passes."""
    if isinstance(refinement, str):
        refinement = int(refinement.removeprefix("loop")) if refinement.removeprefix("loop").isdigit() else refinement
    if refinement not in REFINEMENT_PRESETS:
        raise ValueError(f"TokenFlowT2I: refinement must be 'loop1', 'loop2' or 'loop3', got {refinement!r}")
    ks, ps = REFINEMENT_PRESETS[refinement]
    if top_k is not None:
        ks = tuple(int(k) for k in top_k) if isinstance(top_k, (list, tuple)) else (int(top_k),) * len(ks)
    if top_p is not None:
        ps = tuple(float(p) for p in top_p) if isinstance(top_p, (list, tuple)) else (float(top_p),) * len(ps)
    if len(ks) != len(ps) or not ks:
        raise ValueError(f"TokenFlowT2I: top_k and top_p need one entry per pass, got {ks} and {ps}")
    return ks, ps


class TokenFlowT2I(nn.Module):
    """TokenFlow's text-to-image LLM (``LlavaLlamaForCausalLM`` of ``TF:t2i``), rebuilt without transformers.

    ::

        model = TokenFlowT2I.from_pretrained("TokenFlow-t2i/", image_tokenizer=tok)   # tok: TokenFlowTokenizer
        out = model.generate(["a red bus"], tokenizer=hf_tokenizer, cfg=7.5, refinement="loop1", seed=0)
        out.codes, out.images                       # (1, 817) codes, (1, 3, 256, 256) in [-1, 1]
        loss = model(*model.training_inputs(prefix_ids, codes)).loss                  # fine-tuning

    - ``state_dict()`` has the released checkpoint's keys: ``model.embed_tokens``, ``model.layers.{i}.
      {self_attn.{q,k,v,o}_proj, self_attn.qknorm.{query,key}_norm, mlp.{gate,up,down}_proj, input_layernorm,
      post_attention_layernorm}``, ``model.norm``, ``model.mm_projector.{0,2}``, ``model.lvl_embed``,
      ``model.pos_1LC``, ``lm_head``.
    - The image tokenizer is not part of the checkpoint (the official tower sits outside the module tree too).
      Give ``image_tokenizer`` (a :class:`TokenFlowTokenizer`: its codebook gives the input vectors and its
      ``decode_indices`` the images) or ``codebook`` (``(K, 40)`` code vectors, e.g. for tests). Neither is
      moved by ``.to()``; their rows are moved to the model's device when read. The official script runs the
      tokenizer in the model's dtype (bf16): cast it too to reproduce its input features exactly.
    - Decoder layers follow the official post-norm variant with QKNorm (see :mod:`.llama`); attention is SDPA.
    """

    def __init__(self, config: str | T2IConfig = "7b", *, image_tokenizer: nn.Module | None = None,
                 codebook: torch.Tensor | None = None, **overrides):
        super().__init__()
        self.config = config = resolve_config(config, **overrides)
        self.model = T2IBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.mm_vision_tower: str | None = None  # the config.json tower path to keep on save (see save_pretrained)
        self.__dict__["image_tokenizer"] = image_tokenizer
        self.__dict__["codebook"] = codebook
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Llama's init (normal, std 0.02; norms 1) and TokenFlow's trunc-normal ``lvl_embed`` / ``pos_1LC``
        with std ``sqrt(1 / (3 H))``."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        std = math.sqrt(1.0 / (3 * self.config.hidden_size))
        nn.init.trunc_normal_(self.model.lvl_embed.weight, std=std)
        nn.init.trunc_normal_(self.model.pos_1LC, std=std)

    # ------------------------------------------------------------------------------------------ inputs

    @torch.no_grad()
    def code_vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, n)`` -> code vectors ``(B, n, C)`` (the tokenizer's normalised dual-codebook rows). The
        tokenizer is frozen (as the official tower): no gradient flows into its codebooks."""
        if self.codebook is not None:
            rows = self.codebook.to(codes.device)[codes]
        elif self.image_tokenizer is not None:
            quantize = self.image_tokenizer.quantize
            rows = quantize.get_codebook_entry(codes.to(quantize.embedding_vqkd.weight.device))
        else:
            raise RuntimeError("TokenFlowT2I: give image_tokenizer= (a TokenFlowTokenizer) or codebook= (K, C) to turn "
                               "codes into input vectors")
        if rows.shape[-1] != self.config.code_dim:
            raise ValueError(f"TokenFlowT2I: code vectors have {rows.shape[-1]} channels, config.code_dim is "
                             f"{self.config.code_dim}")
        return rows.to(codes.device)

    def _dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def project_codes(self, inputs: torch.Tensor, levels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Image input rows ``(B, n, C)`` -> embeddings ``(B, n, H)``:
        ``mm_projector(inputs) + lvl_embed[levels] + pos_1LC[positions]`` (official order of the sums)."""
        backbone = self.model
        projected = backbone.mm_projector(inputs.to(self._dtype()))
        return projected + backbone.lvl_embed(levels) + backbone.pos_1LC[positions]

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = rope_inverse_frequencies(self.config.shape.head_dim, self.config.rope_theta, positions.device)
        return rope_cos_sin(positions, inv_freq, self._dtype())

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and head; float32 logits (official ``logits.float()``)."""
        return self.lm_head(self.model.norm(hidden)).float()

    def image_start(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B,)``: the first position of each row's ``L`` contiguous image ids (official: the ids in
        ``[image_token_start, image_token_end]``); raises unless every row has exactly one such run."""
        is_image = (input_ids >= self.config.image_token_start) & (input_ids <= self.config.image_token_end)
        counts = is_image.sum(dim=1)
        length = self.config.tokens_per_image
        if (counts != length).any():
            raise ValueError(f"TokenFlowT2I: every row needs {length} image ids, got {counts.tolist()}")
        start = is_image.to(torch.int8).argmax(dim=1)
        if (start < 1).any():
            raise ValueError("TokenFlowT2I: the image ids must follow at least one text id")
        offsets = start[:, None] + torch.arange(length, device=input_ids.device)
        if not torch.gather(is_image, 1, offsets).all():
            raise ValueError("TokenFlowT2I: the image ids of a row must be contiguous")
        return start

    def training_inputs(self, prefix_ids: torch.Tensor, codes: torch.Tensor, suffix_ids: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing ``(input_ids, labels)`` as the official ``preprocess_plain_img``.

        ``prefix_ids`` ``(B, P)`` or ``(P,)``: padded prompt + ``"<img>"`` ids (:meth:`encode_prompts`);
        ``codes`` ``(B, L)`` tokenizer indices (``TokenFlowTokenizer.tokenize``); ``suffix_ids`` ``(S,)`` or
        ``(B, S)`` (officially ``"</img>"`` + EOS). ``input_ids = [prefix, codes + image_token_start, suffix]``;
        ``labels`` = ``input_ids`` with the prefix and every ``[PAD]`` set to ``IGNORE_INDEX`` (-100), so the loss
        covers the image codes and the suffix; text loss is ignored."""
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or codes.shape[1] != self.config.tokens_per_image:
            raise ValueError(f"TokenFlowT2I.training_inputs: codes must be (B, {self.config.tokens_per_image}), "
                             f"got {tuple(codes.shape)}")
        if codes.min() < 0 or codes.max() >= self.config.image_vocab_size:
            raise ValueError(f"TokenFlowT2I.training_inputs: codes must be in [0, {self.config.image_vocab_size})")
        parts = [torch.as_tensor(prefix_ids, device=codes.device), codes + self.config.image_token_start]
        if suffix_ids is not None:
            parts.append(torch.as_tensor(suffix_ids, device=codes.device))
        parts = [part.expand(codes.shape[0], -1) if part.dim() == 1 else part for part in parts]
        input_ids = torch.cat([part.long() for part in parts], dim=1)
        labels = input_ids.clone()
        labels[:, :parts[0].shape[1]] = IGNORE_INDEX
        if self.config.pad_token_id is not None:
            labels[input_ids == self.config.pad_token_id] = IGNORE_INDEX
        return input_ids, labels

    def sequence_embeddings(self, input_ids: torch.Tensor, refine_scale: int | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The official ``prepare_inputs_labels_for_multimodal_generation`` embeddings: ``(B, T, H)`` and the
        image start per row ``(B,)``. Text ids are embedded; the ``L`` image ids become ``L - 1`` progressive
        input rows (``refine_scale`` as in ``progressive_inputs``) and one zero placeholder; ``lvl_embed`` and
        ``pos_1LC`` are added as in the module docstring's table."""
        config = self.config
        batch, total = input_ids.shape
        length = config.tokens_per_image
        start = self.image_start(input_ids)
        image_positions = start[:, None] + torch.arange(length, device=input_ids.device)      # (B, L)
        codes = torch.gather(input_ids, 1, image_positions) - config.image_token_start
        inputs = progressive_inputs(self.code_vectors(codes), config.scales, refine_scale)     # (B, L - 1, C)
        projected = self.model.mm_projector(inputs.to(self._dtype()))
        embeds = self.model.embed_tokens(input_ids)
        rows = torch.cat([projected, projected.new_zeros(batch, 1, projected.shape[-1])], dim=1)
        embeds = embeds.scatter(1, image_positions[..., None].expand(-1, -1, embeds.shape[-1]), rows)
        levels = torch.zeros_like(input_ids)
        levels.scatter_(1, image_positions[:, :-1], input_level_ids(config.scales, input_ids.device).expand(batch, -1))
        embeds = embeds + self.model.lvl_embed(levels)
        absolute = embeds.new_zeros(batch, total, embeds.shape[-1])
        absolute.scatter_(1, (image_positions - 1)[..., None].expand(-1, -1, embeds.shape[-1]),
                          self.model.pos_1LC.expand(batch, -1, -1).to(embeds.dtype))
        return embeds + absolute, start

    def attention_mask(self, input_ids: torch.Tensor, image_start: torch.Tensor,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean ``(B, 1, T, T)``, True = attend. With the block id ``b(p) = p`` outside the image region
        ``[s - 1, s - 1 + L)`` and ``b(p) = s - 1 + (first offset of scale(p))`` inside it, query ``q`` sees key
        ``k`` iff ``b(k) <= b(q)``: causal, block-causal by scale inside the region. Keys that are ``[PAD]`` or
        ``attention_mask == 0`` are never seen; a query always sees itself (no empty rows)."""
        config = self.config
        batch, total = input_ids.shape
        device = input_ids.device
        positions = torch.arange(total, device=device).expand(batch, -1)
        level = scale_of_position(config.scales, device)
        first = torch.tensor([0] + [s * s for s in config.scales], device=device).cumsum(0)[:-1]   # block offsets
        offset = positions - (image_start[:, None] - 1)
        inside = (offset >= 0) & (offset < config.tokens_per_image)
        block = torch.where(inside, image_start[:, None] - 1 + first[level[offset.clamp(0, level.numel() - 1)]],
                            positions)
        allowed = block[:, None, :] <= block[:, :, None]
        valid = self._key_valid(input_ids, attention_mask)
        if valid is not None:
            allowed = allowed & valid[:, None, :]
        allowed = allowed | torch.eye(total, dtype=torch.bool, device=device)
        return allowed[:, None]

    def _key_valid(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        valid = None
        if self.config.pad_token_id is not None:
            valid = input_ids != self.config.pad_token_id
        if attention_mask is not None:
            valid = attention_mask.bool() if valid is None else valid & attention_mask.bool()
        return valid

    # ------------------------------------------------------------------------------------------ training

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, return_logits: bool | None = None) -> T2IOutput:
        """Teacher-forced forward (official ``forward`` with ``prepare_inputs_labels_for_multimodal_generation``).

        ``input_ids`` ``(B, T)`` hold the prompt and the ``L`` image ids (``image_token_start + code``) of each row,
        e.g. from :meth:`training_inputs`; ``attention_mask`` ``(B, T)`` marks batch padding, which must be at the
        end (positions are ``0 .. T-1``, as the official right-padded batches). ``labels`` ``(B, T)``: next-token
        targets (``IGNORE_INDEX`` skipped); the loss is the mean cross-entropy of ``logits[:, :-1]`` against
        ``labels[:, 1:]`` over the full vocabulary, in float32. Only the labelled positions go through ``lm_head``
        unless ``return_logits`` (default: when there are no labels).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"TokenFlowT2I: input_ids must be (B, T), got {tuple(input_ids.shape)}")
        if attention_mask is not None:
            kept = attention_mask.bool()
            if (kept[:, 1:] & ~kept[:, :-1]).any():
                raise ValueError("TokenFlowT2I: attention_mask must mark padding at the end of the rows only")
        embeds, start = self.sequence_embeddings(input_ids)
        mask = self.attention_mask(input_ids, start, attention_mask)
        cos, sin = self._rope(torch.arange(input_ids.shape[1], device=input_ids.device))
        hidden, _ = run_layers(self.model.layers, embeds, cos, sin, mask,
                               gradient_checkpointing=self.gradient_checkpointing and self.training)
        if return_logits is None:
            return_logits = labels is None
        logits = self._logits(hidden) if return_logits else None
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            chosen = targets != IGNORE_INDEX
            if logits is not None:
                picked = logits[:, :-1][chosen]
            else:
                picked = self._logits(hidden[:, :-1][chosen])
            loss = F.cross_entropy(picked, targets[chosen])
        return T2IOutput(loss, logits)

    # ------------------------------------------------------------------------------------------ prompts

    def encode_prompts(self, prompts: Sequence[str], tokenizer, max_text_tokens: int | None = None) -> torch.Tensor:
        """Prompt strings -> prefix ids ``(N, P)`` as the official ``crop_and_encode_text_and_img``: the text ids
        with BOS first, truncated to ``max_text_tokens`` (default ``config.max_text_tokens``, 128) or left-padded
        with ``[PAD]`` to it, then the ids of ``"<img>"``.

        ``tokenizer``: a Hugging Face tokenizer (``encode(text)`` adds BOS; ``"<img>"`` is encoded without
        special tokens), or any callable ``text -> list[int]`` that returns ids without special tokens."""
        config = self.config
        limit = config.max_text_tokens if max_text_tokens is None else max_text_tokens
        if config.pad_token_id is None:
            raise ValueError("TokenFlowT2I: encoding prompts needs config.pad_token_id")
        if hasattr(tokenizer, "encode"):
            for attribute in ("pad_token_id", "bos_token_id"):
                theirs = getattr(tokenizer, attribute, None)
                if theirs is not None and theirs != getattr(config, attribute):
                    raise ValueError(f"TokenFlowT2I: the tokenizer's {attribute} is {theirs}, the model config's is "
                                     f"{getattr(config, attribute)}")
            encode, image_ids = tokenizer.encode, list(tokenizer.encode(IMAGE_START_TEXT, add_special_tokens=False))
        elif callable(tokenizer):
            encode, image_ids = tokenizer, list(tokenizer(IMAGE_START_TEXT))
        else:
            raise TypeError("TokenFlowT2I: prompts as strings need tokenizer= (a Hugging Face tokenizer or a callable "
                            "text -> ids); or pass token ids")
        rows = []
        for text in prompts:
            ids = [int(i) for i in encode(text)]
            if not ids or ids[0] != config.bos_token_id:
                ids = [config.bos_token_id] + ids
            ids = ids[:limit] if len(ids) > limit else [config.pad_token_id] * (limit - len(ids)) + ids
            rows.append(ids + [int(i) for i in image_ids])
        return torch.tensor(rows, dtype=torch.long)

    def _prefix_rows(self, prompts, tokenizer, max_text_tokens, count: int | None = None) -> torch.Tensor:
        """Prompts (strings, a ``(N, P)`` id tensor, or a list of id sequences) -> ``(N, P)`` ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, torch.Tensor):
            rows = prompts.long()
            rows = rows[None] if rows.dim() == 1 else rows
        elif len(prompts) and all(isinstance(p, str) for p in prompts):
            rows = self.encode_prompts(prompts, tokenizer, max_text_tokens)
        else:
            sequences = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
            rows = self._left_pad(sequences)
        if rows.dim() != 2 or rows.shape[1] < 1 or rows.shape[0] < 1:
            raise ValueError(f"TokenFlowT2I.generate: expected at least one non-empty prompt, got {tuple(rows.shape)}")
        if count is not None and rows.shape[0] == 1:
            rows = rows.expand(count, -1)
        return rows

    def _left_pad(self, sequences: list[torch.Tensor]) -> torch.Tensor:
        width = max(int(s.numel()) for s in sequences)
        if any(s.numel() != width for s in sequences) and self.config.pad_token_id is None:
            raise ValueError("TokenFlowT2I: prompts of different lengths need config.pad_token_id")
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        return torch.stack([F.pad(s, (width - s.numel(), 0), value=pad) for s in sequences])

    # ------------------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(self, prompts, *, negative_prompt=OFFICIAL_NEGATIVE_PROMPT, tokenizer=None, cfg: float = 7.5,
                 refinement: str | int = "loop1", top_k=None, top_p=None, seed: int | None = None,
                 generator: torch.Generator | None = None, exact: bool = True, sampler: Sampler | str | None = None,
                 decode: bool = True, max_text_tokens: int | None = None) -> T2IGeneration:
        """Text -> image codes (and images): the official ``autoregressive_infer_cfg`` with a KV cache.

        - ``prompts``: strings (need ``tokenizer``, see :meth:`encode_prompts`), a ``(B, P)`` id tensor of full
          prefixes (padded prompt + ``"<img>"`` ids), or a list of id sequences (left-padded with ``[PAD]``).
          ``negative_prompt`` (default: the official one) is a string or ids, one row or ``B``; it forms the
          unconditional half of the ``2B`` CFG batch.
        - Per scale ``si`` of ``S``: ``t = cfg * si / (S - 1)``, then :func:`sample_scale` (or ``sampler``, same
          signature) with the pass's top-k / top-p. ``refinement`` ``"loop1"`` ([600]/[0.6]), ``"loop2"``
          ([1200, 1]/[0.8, 0]) or ``"loop3"`` ([1200, 100, 1]/[0.8, 0.8, 0]); ``top_k`` / ``top_p`` override
          (one value for every pass, or a list). From scale 1 on, pass ``j >= 1`` re-feeds the scale's own
          accumulated features and re-draws its codes.
        - KV cache: the prefix is encoded once; each scale's block (its ``s^2`` input rows, which see the cache
          and each other) is appended after its first pass; refinement passes recompute only that block
          against the cache without storing it (later scales see the block's first-pass input, as officially).
        - ``seed`` (a fresh generator on the model's device) or ``generator``. With ``exact`` (default) the draws
          use the official tensor shapes, so the codes equal those of the no-cache official loop
          (``tokenflow_ext.reference.t2i``) given the same generator, up to floating-point ties in the logits.
        - ``sampler``: ``None``/``"python"`` (:func:`sample_scale`, the official tensor ops), ``"fused"`` (the
          ``sample_logits`` kernel: CFG mix, image-vocab mask, top-k select, top-p and a Gumbel-max draw in one
          pass per row; the same distribution but not the same random stream, so ``exact`` does not apply), or a
          callable with :func:`sample_scale`'s signature.

        Returns :class:`T2IGeneration`; ``images`` come from ``image_tokenizer.decode_indices`` when the model
        has an image tokenizer and ``decode``.
        """
        config = self.config
        device = self.lm_head.weight.device
        if isinstance(negative_prompt, str) and tokenizer is None:
            raise TypeError("TokenFlowT2I.generate: negative_prompt is a string, which needs tokenizer=; pass its ids "
                            "(e.g. model.encode_prompts([OFFICIAL_NEGATIVE_PROMPT], tokenizer)) instead")
        cond = self._prefix_rows(prompts, tokenizer, max_text_tokens)
        uncond = self._prefix_rows(negative_prompt, tokenizer, max_text_tokens, count=cond.shape[0])
        if uncond.shape[0] != cond.shape[0]:
            raise ValueError(f"TokenFlowT2I.generate: {uncond.shape[0]} negative prompts for {cond.shape[0]} prompts")
        prefix = self._left_pad(list(cond) + list(uncond)).to(device)
        passes_k, passes_p = refinement_lists(refinement, top_k, top_p)
        if generator is None and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        if prefix.shape[1] + config.tokens_per_image > config.max_position_embeddings:
            raise ValueError(f"TokenFlowT2I.generate: {prefix.shape[1]} prefix ids + {config.tokens_per_image} image "
                             f"positions exceed max_position_embeddings {config.max_position_embeddings}")
        codes = self.sample_codes(prefix, cfg=cfg, top_k=passes_k, top_p=passes_p, generator=generator, exact=exact,
                                  sampler=sampler)
        images = None
        if decode and self.image_tokenizer is not None:
            tokenizer_device = next(self.image_tokenizer.parameters()).device
            images = self.image_tokenizer.decode_indices(codes.to(tokenizer_device))
        return T2IGeneration(codes, images)

    @torch.no_grad()
    def sample_codes(self, prefix: torch.Tensor, *, cfg: float, top_k: Sequence[int], top_p: Sequence[float],
                     generator: torch.Generator | None = None, exact: bool = True,
                     sampler: Sampler | str | None = None) -> torch.Tensor:
        """The cached sampling loop on prefix ids ``(2B, P)`` (conditional rows, then unconditional ones, equal
        lengths). Returns codes ``(B, L)``. See :meth:`generate`."""
        config = self.config
        sampler = resolve_sampler(sampler)
        device, scales = prefix.device, config.scales
        rows, width = prefix.shape
        batch = rows // 2
        if rows != 2 * batch or rows == 0:
            raise ValueError(f"TokenFlowT2I: the prefix batch must hold 2B rows (cond + uncond), got {rows}")
        # A sampler that reads only the image ids (``image_logits_only``, e.g. the fused one) gets the head's
        # image rows alone: the text-id logits it would mask are never computed (half the head's FLOPs at 7B).
        image_only = bool(getattr(sampler, "image_logits_only", False))
        image_rows = slice(config.image_token_start, config.image_token_start + config.image_vocab_size)
        draw = dict(image_token_start=0 if image_only else config.image_token_start,
                    image_vocab_size=config.image_vocab_size, generator=generator, exact=exact)

        def head(hidden_rows: torch.Tensor) -> torch.Tensor:
            if not image_only:
                return self._logits(hidden_rows)
            normed = self.model.norm(hidden_rows)
            return F.linear(normed, self.lm_head.weight[image_rows]).float()

        # The prefix, once: text embeddings + lvl_embed[0]; the last prefix id also gets pos_1LC[0].
        embeds = self.model.embed_tokens(prefix) + self.model.lvl_embed.weight[0]
        embeds[:, -1] = embeds[:, -1] + self.model.pos_1LC[0]
        valid = self._key_valid(prefix, None)
        allowed = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        if valid is not None:
            allowed = allowed & valid[:, None, :]
        allowed = (allowed | torch.eye(width, dtype=torch.bool, device=device)).reshape(-1, 1, width, width)
        cos, sin = self._rope(torch.arange(width, device=device))
        hidden, cache = run_layers(self.model.layers, embeds, cos, sin, allowed)
        logits = head(hidden[:, -1:])
        codes = torch.empty(batch, config.tokens_per_image, dtype=torch.long, device=device)
        codes[:, :1] = sampler(logits, guidance=guidance_ramp(cfg, 0, len(scales)), top_k=top_k[0], top_p=top_p[0],
                               **draw)
        running = self.code_vectors(codes[:, :1]).transpose(1, 2).reshape(batch, -1, 1, 1)   # f_hat (B, C, 1, 1)

        offset = 1
        for si in range(1, len(scales)):
            side = scales[si]
            count = side * side
            block = slice(offset, offset + count)
            upsampled = F.interpolate(running, size=(side, side), mode="bicubic")
            positions = torch.arange(width - 1 + offset, width - 1 + offset + count, device=device)
            cos, sin = self._rope(positions)
            mask = None
            if valid is not None:
                valid = torch.cat([valid, valid.new_ones(rows, count)], dim=1)
                mask = valid[:, None, None, :]
            levels = torch.full((count,), si + 1, dtype=torch.long, device=device)
            pos_rows = torch.arange(offset, offset + count, device=device)
            t = guidance_ramp(cfg, si, len(scales))
            past = cache
            for pass_index in range(len(top_k)):
                grid = upsampled
                if pass_index:  # refinement: the scale's own accumulated features f_hat + codes of this scale
                    grid = upsampled + self._code_grid(codes[:, block], side)
                inputs = grid.flatten(2).transpose(1, 2)
                block_embeds = self.project_codes(torch.cat([inputs, inputs]), levels, pos_rows)
                hidden, key_values = run_layers(self.model.layers, block_embeds, cos, sin, mask, past)
                if pass_index == 0:
                    cache = key_values
                codes[:, block] = sampler(head(hidden), guidance=t, top_k=top_k[pass_index],
                                          top_p=top_p[pass_index], **draw)
            running = upsampled + self._code_grid(codes[:, block], side)
            offset += count
        return codes

    def _code_grid(self, codes: torch.Tensor, side: int) -> torch.Tensor:
        """Codes ``(B, s*s)`` -> code vectors as a grid ``(B, C, s, s)``."""
        vectors = self.code_vectors(codes)
        return vectors.transpose(1, 2).reshape(codes.shape[0], -1, side, side)

    # ------------------------------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: str | T2IConfig | None = None, *, strict: bool = True,
                        dtype: torch.dtype | None = None, map_location: Any = "cpu",
                        image_tokenizer: nn.Module | None = None, codebook: torch.Tensor | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool | None = None, **overrides) -> "TokenFlowT2I":
        """Load a Hugging Face-style folder (``config.json`` + ``*.safetensors`` shards, with or without
        ``model.safetensors.index.json``, or ``*.bin`` shards / ``pytorch_model.bin``) or a single weights file.
        A Hub id (``"ByteFlow-AI/TokenFlow-t2i"``) is fetched into the Hub cache first (``revision``,
        ``cache_dir``, ``local_files_only`` / ``HF_HUB_OFFLINE``; see :mod:`tokenflow_ext.hub`); a local path wins.

        The config comes from ``config`` (a name or :class:`T2IConfig`), else from the folder's ``config.json``;
        ``overrides`` replace fields. Strict by default: a :class:`StateDictMismatchError` lists missing,
        unexpected and wrongly shaped keys (wrong shapes raise even when not strict). The model is built on the
        meta device and takes the file's tensors. The official ``image_token_start`` / ``image_token_end``
        buffers, when present, must agree with the config and are dropped. Returned in eval mode."""
        from ... import hub  # noqa: PLC0415

        path = hub.resolve_folder(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                  allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"])
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        vision_tower = None
        if config is None:
            config_file = os.path.join(folder, "config.json")
            if not os.path.isfile(config_file):
                raise FileNotFoundError(f"TokenFlowT2I.from_pretrained: no config.json in {folder!r}; pass config=")
            with open(config_file) as handle:
                hf = json.load(handle)
            config = T2IConfig.from_hf_config(hf, **overrides)
            if isinstance(hf.get("mm_vision_tower"), str):
                vision_tower = hf["mm_vision_tower"]
        else:
            config = resolve_config(config, **overrides)
        state = _read_weights(path, map_location)
        for key, value in (("image_token_start", config.image_token_start),
                           ("image_token_end", config.image_token_end)):
            if key in state:
                stored = int(state.pop(key))
                if stored != value:
                    raise ValueError(f"TokenFlowT2I.from_pretrained: the checkpoint's {key} is {stored}, the config "
                                     f"says {value}")
        if strict:  # built on the meta device: every tensor comes from the file, nothing is initialised twice
            with torch.device("meta"):
                model = cls(config)
            load_checked(model, state, strict=True, assign=True)
        else:  # missing tensors keep their initialisation
            model = cls(config)
            load_checked(model, state, strict=False)
        model.__dict__["image_tokenizer"] = image_tokenizer
        model.__dict__["codebook"] = codebook
        model.mm_vision_tower = vision_tower
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike, *, safe_serialization: bool = True,
                        vision_tower: str | os.PathLike | None = None,
                        max_shard_bytes: int = _folder.DEFAULT_SHARD_BYTES) -> str:
        """Write ``config.json`` and the weights to ``folder``: ``model.safetensors``, or above
        ``max_shard_bytes`` (5 GiB) safetensors shards with the standard ``model.safetensors.index.json``
        (:mod:`tokenflow_ext.models._folder`); ``pytorch_model.bin`` without ``safe_serialization``.

        ``config.json`` holds every field official training writes (:meth:`T2IConfig.to_hf_config`) and
        ``torch_dtype`` (the weights' dtype), so the official ``LlavaLlamaForCausalLM.from_pretrained(folder,
        mm_vision_tower=...)`` reads the folder too. ``mm_vision_tower``: ``vision_tower``, else the one of the
        ``config.json`` this model was loaded from, else the official recipe's :data:`OFFICIAL_VISION_TOWER`."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        tower = os.fspath(vision_tower) if vision_tower is not None else self.mm_vision_tower
        hf = self.config.to_hf_config(vision_tower=tower)
        hf["torch_dtype"] = str(self.lm_head.weight.dtype).removeprefix("torch.")
        if safe_serialization:
            return _folder.save_folder(folder, self.state_dict(), hf, max_shard_bytes=max_shard_bytes)
        _folder.write_json(os.path.join(folder, _folder.CONFIG), hf)
        tensors = {key: value.detach().contiguous().cpu() for key, value in self.state_dict().items()}
        torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
        return folder


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [-1, 1] -> ``(B, H, W, 3)`` uint8 on the CPU, as the official script:
    ``clamp(127.5 * x + 128, 0, 255)`` then truncation."""
    return torch.clamp(images.permute(0, 2, 3, 1) * 127.5 + 128.0, 0, 255).to("cpu", dtype=torch.uint8)


def _read_weights(path: str, map_location: Any) -> dict[str, torch.Tensor]:
    """All tensors of a HF folder (every ``*.safetensors`` file, else every ``*.bin`` file) or of one file."""
    if _folder.is_model_folder(path) and os.path.exists(os.path.join(path, _folder.INDEX)):
        return _folder.load_folder(path, device=str(map_location))[0]  # exactly the indexed shards
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        files = [n for n in names if n.endswith(".safetensors")] or [n for n in names if n.endswith(".bin")]
        if not files:
            raise FileNotFoundError(f"TokenFlowT2I.from_pretrained: no *.safetensors or *.bin weights in {path!r}")
        files = [os.path.join(path, n) for n in files]
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"TokenFlowT2I.from_pretrained: {path!r} does not exist")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError as error:
                raise ImportError("reading .safetensors needs the safetensors package") from error
            part = load_file(file, device=str(map_location))
        else:
            part = torch.load(file, map_location=map_location, weights_only=True)
            part = part.get("state_dict", part) if isinstance(part, dict) else part
        duplicated = set(part) & set(state)
        if duplicated:
            raise ValueError(f"TokenFlowT2I.from_pretrained: keys stored twice, e.g. {sorted(duplicated)[:3]}")
        state.update(part)
    return state


__all__ = ["CONFIGS", "IGNORE_INDEX", "OFFICIAL_NEGATIVE_PROMPT", "OFFICIAL_TRAINING_FIELDS", "OFFICIAL_VISION_TOWER",
           "StateDictMismatchError", "T2IConfig", "T2IGeneration", "T2IOutput", "TokenFlowT2I", "images_to_uint8",
           "refinement_lists", "resolve_sampler", "sample_scale"]
