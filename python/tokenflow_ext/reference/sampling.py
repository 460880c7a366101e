"""Plain-PyTorch reference of ``sample_logits``: the official filter (``sample_with_top_k_top_p_``) applied to
the guided image logits, as a kept-set mask and the probabilities a draw follows."""

from __future__ import annotations

import torch

from ..models.tokenflow.generation import guided_logits, image_vocabulary_logits, top_k_top_p_filter


def sample_logits_filter_reference(logits: torch.Tensor, *, guidance: float, top_k: int = 0, top_p: float = 0.0,
                                   image_token_start: int = 0, image_vocab_size: int | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept (B, ..., K) bool, probabilities (B, ..., K) float32)`` of the official filter on
    ``(1 + t) cond - t uncond`` restricted to the image ids (mixed in float32, float64 for float64 logits, then
    rounded to float32; NaN -> -inf as the op; a row with +inf
    ids keeps exactly those, equally likely, where the official softmax would be NaN)."""
    batch = logits.shape[0] // 2
    wide = torch.float64 if logits.dtype == torch.float64 else torch.float32
    guided = guided_logits(logits[:batch].to(wide), logits[batch:].to(wide), guidance).float()
    guided = image_vocabulary_logits(guided, image_token_start, image_vocab_size)
    guided = torch.where(guided.isnan(), float("-inf"), guided)
    filtered = top_k_top_p_filter(guided, top_k if 0 < top_k < guided.shape[-1] else 0,
                                  top_p if 0 < top_p < 1 else 0.0)
    kept, probabilities = filtered > float("-inf"), filtered.softmax(dim=-1)
    # The op's convention where the official softmax is NaN: +inf ids take all the mass, shared equally.
    infinite = guided.isposinf()
    has_infinite = infinite.any(dim=-1, keepdim=True)
    kept = torch.where(has_infinite, infinite, kept)
    uniform = infinite / infinite.sum(dim=-1, keepdim=True).clamp(min=1)
    return kept, torch.where(has_infinite, uniform, probabilities)
