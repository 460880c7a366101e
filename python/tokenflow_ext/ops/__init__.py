"""Python wrappers of the compiled ops: argument handling, fake (meta) kernels and autograd."""

from .codebook_gather import codebook_gather
from .codebook_search import codebook_search
from .sample_logits import sample_logits

__all__ = ["codebook_gather", "codebook_search", "sample_logits"]
