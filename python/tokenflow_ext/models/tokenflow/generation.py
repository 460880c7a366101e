"""Utilities for TokenFlow's scale-wise autoregressive text-to-image sampler (as in the official code), written against
any callable that returns logits, so they serve a LLaVA/Llama model as well as a toy one.

Layout: an image is ``L = sum s^2`` codes, scale by scale (817 for clipb_256). The model reads
``L - s_0^2`` progressive input rows (816: the first scale is predicted from the last text token) and
predicts the ``s_i^2`` codes of scale ``i`` from the rows of scale ``i - 1``'s block.

The official sampler masks logits below ``image_token_start`` but leaves ids after the image vocabulary
(the ``[PAD]`` token added at inference) unmasked, so a ``[PAD]`` can be drawn and become code ``K``, out of
range. :func:`image_vocabulary_logits` keeps exactly the image vocabulary instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# multi_step_infer_strategy: loops -> (top-k per pass, top-p per pass); p = 0 disables top-p, k = 1 is greedy.
REFINEMENT_PRESETS: dict[int, tuple[tuple[int, ...], tuple[float, ...]]] = {
    1: ((600,), (0.6,)),
    2: ((1200, 1), (0.8, 0.0)),
    3: ((1200, 100, 1), (0.8, 0.8, 0.0)),
}


def scale_slices(scales: Sequence[int]) -> list[slice]:
    """Positions of each scale's codes in the ``sum s^2`` layout."""
    slices, start = [], 0
    for scale in scales:
        slices.append(slice(start, start + scale * scale))
        start += scale * scale
    return slices


def scale_of_position(scales: Sequence[int], device=None) -> torch.Tensor:
    """``(sum s^2,)`` int64: the scale index of every code position."""
    return torch.cat([torch.full((s * s,), i, dtype=torch.long, device=device) for i, s in enumerate(scales)])


def input_level_ids(scales: Sequence[int], device=None) -> torch.Tensor:
    """``(sum s^2 - s_0^2,)``: the ``lvl_embed`` index of each progressive input row (``i + 1`` for rows
    feeding scale ``i``; index 0 is reserved for text)."""
    return (scale_of_position(scales, device) + 1)[scales[0] ** 2:]


def scale_attention_mask(scales: Sequence[int], text_length: int, total_length: int | None = None, *,
                         dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Additive attention mask ``(T, T)`` for ``[text (text_length), image inputs, placeholder, text after]``
    with ``T = total_length`` (default ``text_length + sum s^2``): causal, except that the ``sum s^2``
    positions from the last text token on are block-causal by scale: query ``q`` sees key ``k`` iff
    ``scale(q) >= scale(k)``. Blocked entries hold ``finfo(dtype).min`` as in the official code."""
    length = sum(s * s for s in scales)
    total = text_length + length if total_length is None else total_length
    if text_length < 1 or total < text_length + length:
        raise ValueError(f"scale_attention_mask: need text_length >= 1 and total_length >= text_length + {length}, "
                         f"got {text_length}, {total}")
    blocked = torch.finfo(dtype).min
    positions = torch.arange(total, device=device)
    mask = torch.where(positions[None, :] <= positions[:, None], 0.0, blocked).to(dtype)
    level = scale_of_position(scales, device)
    block = torch.where(level[:, None] >= level[None, :], 0.0, blocked).to(dtype)
    start = text_length - 1
    mask[start:start + length, start:start + length] = block
    return mask


def progressive_inputs(codes: torch.Tensor, scales: Sequence[int], refine_scale: int | None = None) -> torch.Tensor:
    """Teacher-forced inputs from the code vectors of one image layout (official ``VQTower.forward``).

    ``codes`` ``(B, sum s^2, C)`` (gathered codebook rows). With ``f`` the running sum: for each scale
    ``i`` but the last, ``f += codes_i`` at resolution ``s_i``, then ``f = bicubic(f -> s_{i+1})`` is the
    input block for scale ``i + 1``. Returns ``(B, sum s^2 - s_0^2, C)``. ``refine_scale = i`` (>= 1)
    replaces scale ``i``'s block with the accumulated ``f`` *including* scale ``i``'s own codes at
    resolution ``s_i`` (the multi-step refinement input).
    """
    if codes.dim() != 3 or codes.shape[1] != sum(s * s for s in scales):
        raise ValueError(f"progressive_inputs: codes must be (B, {sum(s * s for s in scales)}, C), got "
                         f"{tuple(codes.shape)}")
    if refine_scale is not None and not 1 <= refine_scale < len(scales):
        raise ValueError(f"progressive_inputs: refine_scale must be in [1, {len(scales) - 1}], got {refine_scale}")
    batch, channels = codes.shape[0], codes.shape[2]
    grids = [codes[:, part].transpose(1, 2).reshape(batch, channels, s, s)
             for part, s in zip(scale_slices(scales), scales)]
    blocks, running = [], grids[0]
    for i in range(1, len(scales)):
        upsampled = F.interpolate(running, size=(scales[i], scales[i]), mode="bicubic")
        running = upsampled + grids[i]
        blocks.append(running if refine_scale == i else upsampled)
    if not blocks:
        return codes.new_zeros(batch, 0, channels)
    return torch.cat([block.flatten(2).transpose(1, 2) for block in blocks], dim=1)


def guidance_ramp(guidance_scale: float, scale_index: int, num_scales: int) -> float:
    """The official linear CFG ramp ``t = cfg * si / (S - 1)``: 0 at the first scale, ``cfg`` at the last."""
    return guidance_scale * scale_index / max(num_scales - 1, 1)


def guided_logits(conditional: torch.Tensor, unconditional: torch.Tensor, t: float) -> torch.Tensor:
    """``(1 + t) * cond - t * uncond``."""
    return (1.0 + t) * conditional - t * unconditional


def image_vocabulary_logits(logits: torch.Tensor, image_token_start: int = 0,
                            image_vocab_size: int | None = None) -> torch.Tensor:
    """The logits of the image vocabulary only, ``logits[..., start:start + K]``: a draw is then a code."""
    stop = logits.shape[-1] if image_vocab_size is None else image_token_start + image_vocab_size
    if not 0 <= image_token_start < stop <= logits.shape[-1]:
        raise ValueError(f"image_vocabulary_logits: [{image_token_start}, {stop}) is not inside the "
                         f"{logits.shape[-1]} logits")
    return logits[..., image_token_start:stop]


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Official ``sample_with_top_k_top_p_`` filtering, out of place. Top-k (``k > 0``): drop logits
    strictly below the k-th largest (ties kept). Top-p (``p > 0``): sort ascending and drop the entries
    whose cumulative softmax is ``<= 1 - p``; the largest always stays. Dropped entries become ``-inf``."""
    filtered = logits.clone()
    if top_k > 0:
        kth = filtered.topk(min(top_k, filtered.shape[-1]), dim=-1).values.amin(dim=-1, keepdim=True)
        filtered.masked_fill_(filtered < kth, float("-inf"))
    if top_p > 0:
        ascending, order = filtered.sort(dim=-1)
        drop_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1.0 - top_p)
        drop_sorted[..., -1] = False
        filtered.masked_fill_(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return filtered


def sample_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Filter then draw one index per row from the softmax (temperature 1): ``(..., V)`` -> ``(...)`` int64."""
    probabilities = top_k_top_p_filter(logits.float(), top_k, top_p).softmax(dim=-1)
    flat = probabilities.reshape(-1, probabilities.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probabilities.shape[:-1])


@dataclass(frozen=True)
class ScaleStep:
    """What the logits callable is asked for: the codes of scale ``scale_index`` (side ``scale``) at
    ``positions`` of the code layout, in refinement pass ``pass_index`` (0 = first draw)."""
    scale_index: int
    scale: int
    pass_index: int
    positions: slice


LogitsFn = Callable[[torch.Tensor, ScaleStep], torch.Tensor]


@torch.no_grad()
def sample_scalewise(logits_fn: LogitsFn, code_rows: Callable[[torch.Tensor], torch.Tensor], scales: Sequence[int],
                     batch_size: int, *, guidance_scale: float = 7.5, refinement: int | None = 1,
                     top_k: Sequence[int] | None = None, top_p: Sequence[float] | None = None,
                     image_token_start: int = 0, image_vocab_size: int | None = None,
                     generator: torch.Generator | None = None, placeholder_code: int = 1,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """TokenFlow's scale-wise sampler with CFG and multi-step refinement (``autoregressive_infer_cfg``).

    - ``logits_fn(inputs, step)``: ``inputs`` ``(B, sum s^2 - s_0^2, C)`` progressive rows (not-yet-drawn
      codes hold ``placeholder_code``), returns ``(2B, s^2, V)`` logits for ``step.positions``: the
      conditional rows first, then the unconditional ones (the official model re-runs the full prefix,
      with a negative prompt for the unconditional half).
    - ``code_rows(indices (B, L)) -> (B, L, C)``: e.g. ``tokenizer.quantize.get_codebook_entry``.
    - Per scale ``si``: ``t = guidance_ramp(cfg, si, S)``, ``(1 + t) cond - t uncond``, image vocabulary
      only, top-k then top-p, one multinomial draw shared by the cond and uncond rows.
    - Refinement: ``refinement`` picks ``REFINEMENT_PRESETS`` (1, 2 or 3 passes) unless ``top_k`` /
      ``top_p`` lists are given. From scale 1 on, pass ``j >= 1`` re-feeds the scale's own accumulated
      features (``progressive_inputs(..., refine_scale=si)``) and re-draws its codes.

    Returns codes ``(B, sum s^2)`` int64 for ``tokenizer.decode_indices``.
    """
    if top_k is None and top_p is None:
        if refinement not in REFINEMENT_PRESETS:
            raise ValueError(f"sample_scalewise: refinement must be one of {sorted(REFINEMENT_PRESETS)}")
        top_k, top_p = REFINEMENT_PRESETS[refinement]
    if top_k is None or top_p is None or len(top_k) != len(top_p) or not len(top_k):
        raise ValueError("sample_scalewise: give top_k and top_p as lists of the same (non-zero) length")
    scales = tuple(int(s) for s in scales)
    codes = torch.full((batch_size, sum(s * s for s in scales)), placeholder_code, dtype=torch.long, device=device)
    for scale_index, (scale, positions) in enumerate(zip(scales, scale_slices(scales))):
        passes = 1 if scale_index == 0 else len(top_k)
        t = guidance_ramp(guidance_scale, scale_index, len(scales))
        for pass_index in range(passes):
            inputs = progressive_inputs(code_rows(codes), scales, refine_scale=scale_index if pass_index else None)
            logits = logits_fn(inputs, ScaleStep(scale_index, scale, pass_index, positions))
            if logits.dim() != 3 or logits.shape[:2] != (2 * batch_size, scale * scale):
                raise ValueError(f"sample_scalewise: logits_fn must return (2B, s^2, V) = ({2 * batch_size}, "
                                 f"{scale * scale}, V), got {tuple(logits.shape)}")
            guided = guided_logits(logits[:batch_size], logits[batch_size:], t)
            guided = image_vocabulary_logits(guided, image_token_start, image_vocab_size)
            codes[:, positions] = sample_logits(guided, top_k[pass_index], top_p[pass_index], generator)
    return codes
