"""Named configurations of the official TokenFlow tokenizers (the official TokenFlow code)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ...nn.multiscale import SCALE_PRESETS

# Input normalisation of the semantic branch (official ScalingLayerForClip / ScalingLayerForSigLip).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass
class TokenFlowConfig:
    """Every size of a TokenFlow tokenizer. The named configs in ``CONFIGS`` are the official variants;
    tests shrink them by overriding fields.

    ``teacher`` picks the semantic encoder family: ``"clip"`` (OpenAI CLIP visual tower, OpenAI naming),
    ``"siglip"`` (SigLIP vision tower, Hugging Face naming) or ``"external"`` (a module the caller passes,
    e.g. timm's ViTamin for ``vitamin_256``). ``semantic_grid`` is the feature grid the multi-scale
    quantizer works on (the last scale); the pixel encoder input is resized to ``16 * semantic_grid``
    when ``image_size`` differs (siglip: 384 -> 432) and its output back to ``image_size``.
    """

    teacher: str = "clip"
    image_size: int = 256
    scales: tuple[int, ...] = SCALE_PRESETS["clipb_256"]
    # semantic encoder (teacher-initialised ViT)
    semantic_width: int = 768
    semantic_layers: int = 12
    semantic_heads: int = 12
    semantic_patch: int = 16
    semantic_mlp_width: int = 3072
    semantic_pretrain_size: int = 224  # resolution of the stored positional embedding
    semantic_scaling: str | None = None  # None, "clip" or "siglip"
    # semantic decoder (BEiT-style ViT) and task layers
    decoder_width: int = 768
    decoder_layers: int = 3
    decoder_heads: int = 12
    decoder_grid: int = 14  # grid of the stored positional embedding (image_size // 16 at train time)
    decoder_out_dim: int = 512
    # quantizer
    codebook_size: int = 32768
    semantic_code_dim: int = 32
    pixel_code_dim: int = 8
    commit_loss_beta: float = 0.25  # vq_train.py's default, used by every released run
    entropy_loss_ratio: float = 0.0
    pixel_weight: float = 1.0
    random_scale_drop: bool = True
    # pixel CNN (LlamaGen VQGAN layout)
    pixel_channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
    encoder_res_blocks: int = 2
    decoder_channels: int = 128
    decoder_res_blocks: int = 2
    z_channels: int = 256
    dropout: float = 0.0
    enhanced_decoder: bool = False
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        self.scales = tuple(int(s) for s in self.scales)
        self.channel_multipliers = tuple(int(m) for m in self.channel_multipliers)
        if self.enhanced_decoder:  # the official "2x capacity" decoder of the t2i tokenizer
            self.decoder_channels, self.decoder_res_blocks = 256, 4
        if self.teacher not in ("clip", "siglip", "external"):
            raise ValueError(f"TokenFlowConfig: teacher must be 'clip', 'siglip' or 'external', got {self.teacher!r}")
        if self.semantic_scaling not in (None, "clip", "siglip"):
            raise ValueError(f"TokenFlowConfig: semantic_scaling must be None, 'clip' or 'siglip', "
                             f"got {self.semantic_scaling!r}")
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"TokenFlowConfig: scales must be positive, got {self.scales}")
        if self.teacher != "external" and self.image_size // self.semantic_patch != self.scales[-1]:
            raise ValueError(f"TokenFlowConfig: the semantic grid {self.image_size // self.semantic_patch} "
                             f"(image_size // semantic_patch) must equal the last scale {self.scales[-1]}")

    @property
    def semantic_grid(self) -> int:
        return self.scales[-1]

    @property
    def compression(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def pixel_size(self) -> int:
        """Resolution the pixel CNN runs at (siglip: 432 for 384 inputs)."""
        return self.compression * self.semantic_grid

    @property
    def code_dim(self) -> int:
        return self.semantic_code_dim + self.pixel_code_dim

    @property
    def tokens_per_image(self) -> int:
        return sum(s * s for s in self.scales)

    def replace(self, **overrides) -> "TokenFlowConfig":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"TokenFlowConfig: unknown field(s) {sorted(unknown)}")
        values = dataclasses.asdict(self)
        if "enhanced_decoder" in overrides and not overrides["enhanced_decoder"] and self.enhanced_decoder:
            values.update(decoder_channels=128, decoder_res_blocks=2)
        values.update(overrides)
        return TokenFlowConfig(**values)


_CLIP_B16 = dict(teacher="clip", semantic_width=768, semantic_layers=12, semantic_heads=12, semantic_patch=16,
                 semantic_mlp_width=3072, semantic_pretrain_size=224, semantic_scaling=None,
                 decoder_width=768, decoder_heads=12, decoder_grid=14, decoder_out_dim=512)

# SigLIP-so400m-patch14-384: 27 layers of width 1152, MLP 4304, 16 heads; the tokenizer reads layer 26's
# input (hidden_states[-2]). Its semantic decoder stores a 27 x 27 grid (432 // 16).
_SIGLIP_SO400M = dict(teacher="siglip", semantic_width=1152, semantic_layers=27, semantic_heads=16,
                      semantic_patch=14, semantic_mlp_width=4304, semantic_pretrain_size=384,
                      semantic_scaling="siglip", decoder_width=1152, decoder_heads=12, decoder_grid=27,
                      decoder_out_dim=1152)

CONFIGS: dict[str, TokenFlowConfig] = {
    # TokenFlow-B at 224: the CLIP teacher's own resolution, 8 scales, 561 tokens.
    "clipb_224": TokenFlowConfig(image_size=224, scales=SCALE_PRESETS["clipb_224"], name="clipb_224", **_CLIP_B16),
    # The t2i tokenizer (tokenflow_clipb_32k_enhanced.pt): clipb_224 run at 256 px with interpolated
    # positional embeddings (official infer_interpolate=True), 9 scales, 817 tokens.
    "clipb_256": TokenFlowConfig(image_size=256, scales=SCALE_PRESETS["clipb_256"], name="clipb_256", **_CLIP_B16),
    # TokenFlow-XL, the i2t tokenizer (tokenflow_siglip_32k.pt): 15 scales, 2227 tokens.
    "siglip_384": TokenFlowConfig(image_size=384, scales=SCALE_PRESETS["siglip_384"], name="siglip_384",
                                  **_SIGLIP_SO400M),
    # TokenFlow-L: timm's vitamin_xlarge_256 encoder, which the caller passes as ``semantic_encoder``.
    "vitamin_256": TokenFlowConfig(teacher="external", image_size=256, scales=SCALE_PRESETS["vitamin_256"],
                                   semantic_width=1152, semantic_scaling="clip", decoder_width=1152,
                                   decoder_heads=12, decoder_grid=16, decoder_out_dim=1152, name="vitamin_256"),
}


def resolve_config(config: str | TokenFlowConfig, **overrides) -> TokenFlowConfig:
    """A named config (or a config object) with ``overrides`` applied."""
    if isinstance(config, TokenFlowConfig):
        base = config
    elif config in CONFIGS:
        base = CONFIGS[config]
    else:
        raise ValueError(f"TokenFlow: unknown config {config!r}; choose from {sorted(CONFIGS)}")
    return base.replace(**overrides) if overrides else base.replace()
