"""sample_logits: fused classifier-free-guided top-k / top-p sampling of image tokens (the t2i draw).

From the stacked ``(2B, ..., V)`` logits of one model call on ``cat([cond, uncond])`` (conditional rows first),
one kernel per row:

1. ``g = (1 + guidance) * cond - guidance * uncond`` over the image ids
   ``[image_token_start, image_token_start + image_vocab_size)`` only (every other id is masked), in float32
   (float64 products rounded to float32 for float64 logits); NaN counts as ``-inf``;
2. top-k (``top_k > 0``): keep ``g >= `` the k-th largest value (ties with it stay), found by a radix select,
   not a sort;
3. top-p (``0 < top_p < 1``): of those, keep the largest values whose softmax mass first reaches ``top_p`` of
   the top-k mass; the official ``sample_with_top_k_top_p_`` keeps exactly these (it drops the ascending
   tail whose cumulative mass is ``<= 1 - top_p``). Values tied with the crossing value stay as one group;
4. one draw: ``argmax over kept ids of (g - max g) + Gumbel``, which is a sample from the softmax of the kept
   logits (the Gumbel-max trick). The noise is Philox-4x32-10 of ``(seed, row, id)``: a pure function, the
   same on the CPU and CUDA kernels, so a seed gives the same codes on both (up to the rare float rounding
   difference at a top-p boundary or in ``expf``/``logf`` on real GPUs).

Temporaries: one row of floats and keys per CPU worker; none on CUDA (each pass re-reads the row).
A ``+inf`` logit takes all the mass (a uniform draw among the ``+inf`` ids); a row with no finite guided logit
gets ``-1`` (the official ``torch.multinomial`` raises there; :func:`sample_scale_fused` raises too).
"""

from __future__ import annotations

import torch

_ops = torch.ops.tokenflow_ext

_OP = "tokenflow_ext.sample_logits"
SEED_BOUND = 2 ** 63 - 1


def random_seed(generator: torch.Generator | None = None) -> int:
    """A 63-bit seed drawn from ``generator`` (default: torch's global generator), so a seeded generator makes
    a sequence of fused draws reproducible, as it does for ``torch.multinomial``."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, SEED_BOUND, (), generator=generator, device=device).item())


def sample_logits(logits: torch.Tensor, *, guidance: float = 0.0, top_k: int = 0, top_p: float = 0.0,
                  image_token_start: int = 0, image_vocab_size: int | None = None, seed: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One guided, filtered draw per row: ``(2B, ..., V)`` logits -> ``(B, ...)`` int64 codes.

    Args:
        logits: ``(2B, ..., V)`` float32/float16/bfloat16/float64, conditional rows then unconditional ones
            (the layout of one model call on the CFG batch; no chunk copies are made).
        guidance: the CFG weight ``t`` of this scale (e.g. ``guidance_ramp(cfg, si, S)``); 0 draws from
            the conditional logits alone.
        top_k: keep the ``top_k`` largest (ties kept); ``<= 0`` or ``>= image_vocab_size`` keeps all.
        top_p: nucleus mass in (0, 1); ``<= 0`` or ``>= 1`` keeps all.
        image_token_start, image_vocab_size: the image id range (default: the whole last dim).
        seed: the Philox key; ``None`` draws one from ``generator`` (or torch's global generator).

    Returns:
        codes ``(B, ...)`` int64 in ``[0, image_vocab_size)`` (image id minus ``image_token_start``), ``-1`` for
        rows without a finite guided logit. The same seed gives the same codes, on CPU and CUDA.
    """
    if image_vocab_size is None:
        image_vocab_size = logits.shape[-1] - image_token_start
    if seed is None:
        seed = random_seed(generator)
    if not -2 ** 63 <= int(seed) < 2 ** 64:
        raise ValueError(f"{_OP}: seed must fit in 64 bits, got {seed}")
    seed = int(seed) - 2 ** 64 if int(seed) >= 2 ** 63 else int(seed)  # the schema's int is signed 64-bit
    return _ops.sample_logits(logits, float(guidance), int(top_k), float(top_p), int(image_token_start),
                              int(image_vocab_size), seed)


def sample_scale_fused(logits: torch.Tensor, *, guidance: float, top_k: int, top_p: float, image_token_start: int,
                       image_vocab_size: int, generator: torch.Generator | None = None,
                       exact: bool = True) -> torch.Tensor:
    """The fused drop-in for ``models.tokenflow.t2i.sample_scale`` (``TokenFlowT2I.generate(sampler="fused")``):
    the same distribution, drawn by :func:`sample_logits` with a seed taken from ``generator``. ``exact`` is
    accepted for the signature and ignored: the fused draw never reproduces ``torch.multinomial``'s stream.
    Raises ``ValueError`` for a row without a finite guided logit (as ``torch.multinomial`` does)."""
    codes = sample_logits(logits, guidance=guidance, top_k=top_k, top_p=top_p, image_token_start=image_token_start,
                          image_vocab_size=image_vocab_size, generator=generator)
    if bool((codes < 0).any()):
        raise ValueError("sample_scale_fused: a row of guided image logits has no finite value (all -inf or NaN)")
    return codes


# TokenFlowT2I.sample_codes hands this sampler the image-id logits alone (image_token_start = 0).
sample_scale_fused.image_logits_only = True


# ---- fake kernel ----------------------------------------------------------------------------------------

@torch.library.register_fake("tokenflow_ext::sample_logits")
def _sample_logits_fake(logits, guidance, top_k, top_p, image_token_start, image_vocab_size, seed):
    torch._check(logits.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
                 lambda: f"{_OP}: logits must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    torch._check(logits.dim() >= 2, lambda: f"{_OP}: logits must be (2B, ..., V) with the conditional rows first, "
                                            f"got shape {tuple(logits.shape)}")
    torch._check(logits.shape[0] % 2 == 0, lambda: f"{_OP}: logits' first dim stacks the conditional and "
                                                   f"unconditional rows, so it must be even, got {logits.shape[0]}")
    torch._check(image_vocab_size >= 1 and image_token_start >= 0
                 and image_token_start + image_vocab_size <= logits.shape[-1],
                 lambda: f"{_OP}: the image ids [{image_token_start}, {image_token_start + image_vocab_size}) must be "
                         f"a non-empty range inside the {logits.shape[-1]} logits")
    return logits.new_empty((logits.shape[0] // 2, *logits.shape[1:-1]), dtype=torch.long)
