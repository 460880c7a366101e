"""Full models built on the fused ops: TokenFlow's tokenizer and FlowTok."""

from ._checkpoint import StateDictMismatchError
from .tokenflow import CONFIGS as TOKENFLOW_CONFIGS
from .tokenflow import TokenFlowConfig, TokenFlowTokenizer

__all__ = ["StateDictMismatchError", "TOKENFLOW_CONFIGS", "TokenFlowConfig", "TokenFlowTokenizer"]
