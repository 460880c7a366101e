"""Modules built on the fused ops: TokenFlow's shared-index dual-codebook quantizer and its multi-scale loop."""

from .dual_codebook import DualCodebookQuantizer
from .multiscale import SCALE_PRESETS, MultiScaleQuantizer

__all__ = ["DualCodebookQuantizer", "MultiScaleQuantizer", "SCALE_PRESETS"]
