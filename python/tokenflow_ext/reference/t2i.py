"""Official-style, no-cache reference of TokenFlow's text-to-image model, for tests.

It follows ``TF:t2i/llava_t2i`` step by step, independently of :class:`~tokenflow_ext.models.TokenFlowT2I`'s
own code paths (only the weights are read from the model):

- ``VQTower.forward`` features (:func:`official_features`), rebuilt per call from all ``L`` codes, with the
  not-yet-drawn codes holding 1;
- ``prepare_inputs_labels_for_multimodal_generation`` embeddings and its additive 4-D mask: causal with
  ``finfo.min``, ``[PAD]`` keys blocked, the ``L x L`` block-causal override at positions ``img_inds - 1``;
- the decoder with eager attention (``q k^T / sqrt(d)`` + mask, softmax, ``@ v``), QKNorm before RoPE, the
  post-norm residuals, ``logits.float()``;
- ``autoregressive_infer_cfg``: the whole sequence is recomputed for every scale and refinement pass, and
  ``sample_with_top_k_top_p_`` draws with ``torch.multinomial`` over the full vocabulary.

Checked once against the official code itself (``TF`` commit 9812da0, transformers 4.43.4, CPU, float32, a
3-scale test-size model loaded with :class:`TokenFlowT2I`'s state dict: no missing or unexpected keys): the
teacher-forced logits agree to 1.8e-7 with the same loss, and ``autoregressive_infer_cfg`` draws the same codes
as ``TokenFlowT2I.generate`` in 45 of 45 runs (3 refinement presets x 15 seeds; top-k clipped to the small
vocabulary, image ids last so the official masking equals ours). That check needs the official repository and
is not part of the test suite; this module stands in for it there.

Deviations, all shared with the model: norms and softmax run in float64 for float64 weights (float32 for
every other dtype, as officially); top-k is clipped to the vocabulary size (the official ``topk`` would raise);
``mask_past_image_vocab=True`` also blocks the ids after the image vocabulary (pass False for the official quirk).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def official_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm``: normalise in the wide dtype, cast back, then scale."""
    h = x.to(_wide(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def official_features(vectors: torch.Tensor, scales: Sequence[int], pred_for_curr_shape: int | None = None
                      ) -> torch.Tensor:
    """``VQTower.forward`` on code vectors ``(N, L, C)``: ``(N, L - 1, C)`` progressive inputs."""
    n, _, c = vectors.shape
    without_first, current, f_hat, cursor = [], [], 0.0, 0
    for i in range(len(scales) - 1):
        side = scales[i]
        feature = vectors[:, cursor:cursor + side * side].reshape(n, side, side, c).permute(0, 3, 1, 2)
        f_hat = f_hat + feature
        current.append(f_hat.permute(0, 2, 3, 1).flatten(1, 2))
        f_hat = F.interpolate(f_hat, size=(scales[i + 1], scales[i + 1]), mode="bicubic")
        without_first.append(f_hat.permute(0, 2, 3, 1).flatten(1, 2))
        cursor += side * side
    last = scales[-1]
    f_hat = f_hat + vectors[:, cursor:].reshape(n, last, last, c).permute(0, 3, 1, 2)
    current.append(f_hat.permute(0, 2, 3, 1).flatten(1, 2))
    if pred_for_curr_shape is not None:
        without_first[pred_for_curr_shape] = current[pred_for_curr_shape + 1]
    return torch.cat(without_first, dim=1)


def official_embeddings(model, ids: torch.Tensor, image_start: int, code_rows: Callable | None = None,
                        pred_for_curr_shape: int | None = None) -> torch.Tensor:
    """Embeddings ``(N, T, H)`` of rows whose ``L`` image ids start at ``image_start``."""
    config, backbone = model.config, model.model
    length = config.tokens_per_image
    code_rows = model.code_vectors if code_rows is None else code_rows
    image_inds = torch.arange(image_start, image_start + length, device=ids.device)
    codes = (ids[:, image_inds] - config.image_token_start).clamp(min=0)
    dtype = backbone.embed_tokens.weight.dtype
    image = backbone.mm_projector(official_features(code_rows(codes), config.scales, pred_for_curr_shape).to(dtype))
    text = F.embedding(ids, backbone.embed_tokens.weight)
    first = config.scales[0] ** 2
    embeds = torch.cat([text[:, :image_start], image, torch.zeros_like(image[:, :first]),
                        text[:, image_start + length:]], dim=1)
    level = torch.zeros(ids.shape[1], dtype=torch.long, device=ids.device)
    level[image_inds[:-first]] = torch.cat([torch.full((s * s,), i + 1, device=ids.device)
                                            for i, s in enumerate(config.scales)])[first:].long()
    embeds = embeds + backbone.lvl_embed.weight[level]
    absolute = torch.zeros(ids.shape[1], embeds.shape[-1], dtype=embeds.dtype, device=ids.device)
    absolute[image_inds - 1] = backbone.pos_1LC.to(embeds.dtype)
    return embeds + absolute


def official_attention_bias(ids: torch.Tensor, image_start: int, scales: Sequence[int], pad_token_id: int | None,
                            dtype: torch.dtype) -> torch.Tensor:
    """Additive ``(N, 1, T, T)``: 0 = attend, ``finfo(dtype).min`` = blocked."""
    n, total = ids.shape
    blocked = torch.finfo(dtype).min
    bias = torch.full((total, total), blocked, dtype=dtype, device=ids.device).triu(1)
    bias = bias.expand(n, 1, total, total).clone()
    if pad_token_id is not None:
        bias.masked_fill_((ids == pad_token_id)[:, None, None, :], blocked)
    level = torch.cat([torch.full((s * s,), i, device=ids.device) for i, s in enumerate(scales)])
    block = torch.zeros(level.numel(), level.numel(), dtype=dtype, device=ids.device)
    block.masked_fill_(level[:, None] < level[None, :], blocked)
    region = torch.arange(image_start - 1, image_start - 1 + level.numel(), device=ids.device)
    bias[:, :, region[:, None], region] = block
    return bias


def _rope(total: int, head_dim: int, theta: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.arange(total, device=device).float()[:, None] * inv_freq[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def official_decoder_logits(model, embeds: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The Llama stack with eager attention on ``(N, T, H)`` embeddings: float32 logits ``(N, T, V)``."""
    config = model.config
    n, total, _ = embeds.shape
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    cos, sin = _rope(total, head_dim, config.rope_theta, embeds.dtype, embeds.device)
    h = embeds
    for layer in model.model.layers:
        attn = layer.self_attn
        q = F.linear(h, attn.q_proj.weight).view(n, total, heads, head_dim).transpose(1, 2)
        k = F.linear(h, attn.k_proj.weight).view(n, total, kv_heads, head_dim).transpose(1, 2)
        v = F.linear(h, attn.v_proj.weight).view(n, total, kv_heads, head_dim).transpose(1, 2)
        q = official_rms_norm(q, attn.qknorm.query_norm.weight, 1e-6).to(v.dtype)
        k = official_rms_norm(k, attn.qknorm.key_norm.weight, 1e-6).to(v.dtype)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k = k[:, :, None].expand(n, kv_heads, heads // kv_heads, total, head_dim).reshape(n, heads, total, head_dim)
        v = v[:, :, None].expand(n, kv_heads, heads // kv_heads, total, head_dim).reshape(n, heads, total, head_dim)
        weights = q @ k.transpose(2, 3) / math.sqrt(head_dim) + bias
        weights = weights.softmax(dim=-1, dtype=_wide(q.dtype)).to(q.dtype)
        attended = F.linear((weights @ v).transpose(1, 2).reshape(n, total, -1), attn.o_proj.weight)
        h = h + official_rms_norm(attended, layer.input_layernorm.weight, config.rms_norm_eps)
        mlp = layer.mlp
        out = F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight),
                       mlp.down_proj.weight)
        h = h + official_rms_norm(out, layer.post_attention_layernorm.weight, config.rms_norm_eps)
    h = official_rms_norm(h, model.model.norm.weight, config.rms_norm_eps)
    return F.linear(h, model.lm_head.weight).float()


def official_t2i_logits(model, ids: torch.Tensor, image_start: int, *, code_rows: Callable | None = None,
                        pred_for_curr_shape: int | None = None, max_len: int | None = None) -> torch.Tensor:
    """Full no-cache forward of rows ``(N, T)`` (image ids at ``image_start``), truncated to ``max_len``
    positions before the decoder as the official sampler does: float32 logits ``(N, max_len, V)``."""
    embeds = official_embeddings(model, ids, image_start, code_rows, pred_for_curr_shape)
    bias = official_attention_bias(ids, image_start, model.config.scales, model.config.pad_token_id, embeds.dtype)
    if max_len is not None:
        embeds, bias = embeds[:, :max_len], bias[:, :, :max_len, :max_len]
    return official_decoder_logits(model, embeds, bias)


def official_sample_with_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``sample_with_top_k_top_p_`` on ``(B, l, V)``: top-k, top-p, then one ``torch.multinomial`` draw (with
    replacement) per position from the softmax over all ``V`` ids. Returns ids ``(B, l)``."""
    b, l, vocab = logits.shape
    logits = logits.clone()
    if top_k > 0:
        kth = logits.topk(min(top_k, vocab), dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        ascending, order = logits.sort(dim=-1, descending=False)
        remove = ascending.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(order.ndim - 1, order, remove), float("-inf"))
    probabilities = logits.softmax(dim=-1).view(-1, vocab)
    return torch.multinomial(probabilities, num_samples=1, replacement=True, generator=generator).view(b, l)


@torch.no_grad()
def official_t2i_generate(model, prefix: torch.Tensor, *, cfg: float = 7.5, top_k: Sequence[int] = (600,),
                          top_p: Sequence[float] = (0.6,), generator: torch.Generator | None = None,
                          code_rows: Callable | None = None, mask_past_image_vocab: bool = True) -> torch.Tensor:
    """``autoregressive_infer_cfg`` without a KV cache on prefix ids ``(2B, P)`` (conditional rows, then the
    negative-prompt rows). Returns codes ``(B, L)``."""
    config = model.config
    scales = config.scales
    start, stop = config.image_token_start, config.image_token_start + config.image_vocab_size
    rows, width = prefix.shape
    batch = rows // 2
    length = config.tokens_per_image
    drawn = prefix.new_empty(rows, 0)
    cur_len = width - 1
    for si, side in enumerate(scales):
        count = side * side
        ratio = si / (len(scales) - 1)
        for loop in range(len(top_k)):
            placeholder = prefix.new_full((rows, length - drawn.shape[1]), start + 1)
            ids = torch.cat([prefix, drawn, placeholder], dim=1)
            max_len = cur_len + count if loop == 0 else cur_len
            logits = official_t2i_logits(model, ids, width, code_rows=code_rows,
                                         pred_for_curr_shape=None if loop == 0 else si - 1, max_len=max_len)
            logits = logits[:, cur_len:cur_len + count] if loop == 0 else logits[:, cur_len - count:cur_len]
            t = cfg * ratio
            guided = (1 + t) * logits[:batch] - t * logits[batch:]
            guided[..., :start] = float("-inf")
            if mask_past_image_vocab:
                guided[..., stop:] = float("-inf")
            new = official_sample_with_top_k_top_p(guided, top_k[loop], top_p[loop], generator)
            if loop == 0:
                drawn = torch.cat([drawn, torch.cat([new, new])], dim=1)
                cur_len += count
            else:
                drawn[:, -count:] = torch.cat([new, new])
            if si < 1:
                break
    return drawn[:batch] - start
