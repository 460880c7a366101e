"""Plain-PyTorch references of every op: slow, obvious, used by the tests and the benchmarks."""

from .codebook import (
    codebook_distances,
    codebook_gather_reference,
    codebook_search_reference,
    index_agreement,
    quantize_reference,
)
from .quantizer import official_multiscale_encode, official_quantizer_forward
from .sampling import sample_logits_filter_reference
from .flow import euler_step_reference, interpolate_reference, matching_loss_reference, sample_reference

__all__ = [
    "euler_step_reference",
    "interpolate_reference",
    "matching_loss_reference",
    "official_multiscale_encode",
    "official_quantizer_forward",
    "sample_reference",
    "sample_logits_filter_reference",
    "codebook_distances",
    "codebook_gather_reference",
    "codebook_search_reference",
    "index_agreement",
    "quantize_reference",
]
