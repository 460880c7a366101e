"""TokenFlow (arXiv 2412.03069): the full tokenizer and the scale-wise generation utilities."""

from .config import CONFIGS, TokenFlowConfig
from .tokenizer import DecodeResult, EncodeResult, TokenFlowTokenizer

__all__ = ["CONFIGS", "DecodeResult", "EncodeResult", "TokenFlowConfig", "TokenFlowTokenizer"]
