"""Plain-PyTorch references of every op: slow, obvious, used by the tests and the benchmarks."""

from .codebook import (
    codebook_distances,
    codebook_gather_reference,
    codebook_search_reference,
    index_agreement,
    quantize_reference,
)

__all__ = [
    "codebook_distances",
    "codebook_gather_reference",
    "codebook_search_reference",
    "index_agreement",
    "quantize_reference",
]
