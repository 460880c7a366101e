"""FlowTok (arXiv 2503.10772): text tower, flow transformer, FlowTiTok tokenizer, text decoder."""

from .clip_text import CLIPTextEncoder, tokenize
from .dit import FLOW_PRESETS, FlowTransformer
from .flowtitok import FlowTiTok
from .model import FlowTok, null_indicator_roll
from .text_decoder import TextDecoder
from .text_projector import FlowEncoder, contrastive_alignment_loss, kl_divergence

__all__ = ["CLIPTextEncoder", "FLOW_PRESETS", "FlowEncoder", "FlowTiTok", "FlowTok", "FlowTransformer", "TextDecoder",
           "contrastive_alignment_loss", "kl_divergence", "null_indicator_roll", "tokenize"]
