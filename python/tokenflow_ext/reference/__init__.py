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
from .flow import (
    euler_step_reference,
    interpolate_reference,
    matching_loss_reference,
    sample_reference,
    velocity_loss_reference,
)

# The official-style whole models subclass the model modules: imported on first use, so that the op
# references stay importable without building any model code.
_OFFICIAL_MODELS = ("OfficialStyleFlowTransformer", "OfficialStyleTokenFlow", "official_flowtok_sample")


def __getattr__(name):
    if name in _OFFICIAL_MODELS:
        from . import official_models  # noqa: PLC0415

        return getattr(official_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "OfficialStyleFlowTransformer",
    "OfficialStyleTokenFlow",
    "official_flowtok_sample",
    "euler_step_reference",
    "interpolate_reference",
    "matching_loss_reference",
    "official_multiscale_encode",
    "official_quantizer_forward",
    "sample_reference",
    "velocity_loss_reference",
    "sample_logits_filter_reference",
    "codebook_distances",
    "codebook_gather_reference",
    "codebook_search_reference",
    "index_agreement",
    "quantize_reference",
]
