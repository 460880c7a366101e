"""Full models built on the fused ops: TokenFlow's tokenizer and FlowTok."""

from ._checkpoint import CheckpointError, StateDictMismatchError
from .flowtok import FlowTiTok, FlowTok, FlowTransformer
from .tokenflow import CONFIGS as TOKENFLOW_CONFIGS
from .tokenflow import TokenFlowConfig, TokenFlowTokenizer
from .tokenflow.t2i import T2IConfig, TokenFlowT2I  # noqa: F401  (issue 13: text-to-image model)

__all__ = ["CheckpointError", "FlowTiTok", "FlowTok", "FlowTransformer", "StateDictMismatchError", "TOKENFLOW_CONFIGS",
           "TokenFlowConfig", "TokenFlowTokenizer"]
