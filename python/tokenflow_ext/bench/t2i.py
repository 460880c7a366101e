"""t2i cases (issue 13, part 6): TokenFlowT2I's KV-cached sampler vs the official-style no-cache recompute loop
on a small random-weight model with the real 817-code schedule, and the fused ``sample_logits`` op vs the
official ``sample_with_top_k_top_p_`` on one scale's CFG logits over the full vocabulary."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .rows import Row, dtype_name
from .timing import synchronize, time_interleaved

TEXT_TOKENS = 128 + 3  # the official max_text_token_num, then the ids of "<img>"


@dataclass
class T2IProblem:
    """``layers`` x ``width`` Llama with the 7B vocabulary (64769 ids: 32001 text, 32768 image), clipb_256
    scales (817 codes), ``batch`` prompts (+ as many negative prompts), ``refinement`` preset, CFG 7.5."""

    layers: int = 8
    width: int = 512
    batch: int = 4
    refinement: str = "loop3"
    prefix: int = TEXT_TOKENS

    @property
    def shape(self) -> str:
        return f"{self.layers}L x {self.width} B={self.batch} {self.refinement} 817 codes"


@dataclass
class SampleOpProblem:
    """One scale's stacked CFG logits ``(2B, n, V)`` float32, V = 32001 text + 32768 image ids."""

    batch: int = 4
    positions: int = 64
    vocab: int = 64769
    image_token_start: int = 32001
    top_k: int = 600
    top_p: float = 0.6
    guidance: float = 7.5

    @property
    def shape(self) -> str:
        return f"({2 * self.batch}, {self.positions}, {self.vocab}) k={self.top_k} p={self.top_p:g}"


def bench_model(problem: T2IProblem, device: str):
    """A random-weight :class:`TokenFlowT2I` (eval, float32) with a random unit codebook, and ``(2B, P)``
    prefix ids (random text ids, as the official left-padded prompt + ``"<img>"`` would be)."""
    from tokenflow_ext.models import T2IConfig, TokenFlowT2I  # noqa: PLC0415

    config = dataclasses.replace(T2IConfig(), hidden_size=problem.width, intermediate_size=problem.width * 11 // 4,
                                 num_hidden_layers=problem.layers, num_attention_heads=max(1, problem.width // 64),
                                 num_key_value_heads=None, name="bench")
    torch.manual_seed(0)
    codebook = torch.nn.functional.normalize(torch.randn(config.image_vocab_size, config.code_dim), dim=-1)
    model = TokenFlowT2I(config, codebook=codebook).to(device).eval()
    with torch.no_grad():  # a sharper output layer than the init, so top-k / top-p do real work
        model.lm_head.weight.mul_(8.0)
    prefix = torch.randint(2, 32000, (2 * problem.batch, problem.prefix), generator=torch.Generator().manual_seed(0))
    return model, prefix.to(device)


def t2i_callables(problem: T2IProblem, device: str) -> dict[str, Callable]:
    """``"cached"``: ``sample_codes`` with the official sampling ops (same codes as the official loop for one
    generator); ``"cached-fused"``: the same loop with ``sampler="fused"``; ``"official-eager"``: the no-cache
    loop of ``reference.t2i.official_t2i_generate``. All return codes ``(B, 817)``."""
    from tokenflow_ext.models.tokenflow.t2i import refinement_lists  # noqa: PLC0415
    from tokenflow_ext.reference.t2i import official_t2i_generate  # noqa: PLC0415

    model, prefix = bench_model(problem, device)
    top_k, top_p = refinement_lists(problem.refinement, None, None)

    def generator():
        return torch.Generator(device).manual_seed(1)

    @torch.no_grad()
    def cached():
        return model.sample_codes(prefix, cfg=7.5, top_k=top_k, top_p=top_p, generator=generator())

    @torch.no_grad()
    def cached_fused():
        return model.sample_codes(prefix, cfg=7.5, top_k=top_k, top_p=top_p, generator=generator(), sampler="fused")

    @torch.no_grad()
    def official():
        return official_t2i_generate(model, prefix, cfg=7.5, top_k=top_k, top_p=top_p, generator=generator())

    return {"cached": cached, "cached-fused": cached_fused, "official-eager": official}


def _once_ms(fn: Callable, device: str):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, (time.perf_counter() - start) * 1e3


def run_t2i_model_case(problem: T2IProblem, device: str, *, repeats: int = 1) -> list[Row]:
    """Rows: cached (official sampling) vs official-eager, checked for identical codes; cached-fused vs
    official-eager (its own random stream: codes checked for range only). Each loop's first call is timed
    (median of ``repeats`` for the cached loops): the official loop takes minutes on a CPU."""
    callables = t2i_callables(problem, device)
    tokens = problem.batch * 817
    official_codes, official_ms = _once_ms(callables["official-eager"], device)
    rows = []
    for name in ("cached", "cached-fused"):
        runs = [_once_ms(callables[name], device) for _ in range(max(1, repeats))]
        codes = runs[0][0]
        ours_ms = sorted(ms for _, ms in runs)[len(runs) // 2]
        if name == "cached":
            # float32: the cached and the recomputed logits differ by rounding, which can flip a draw at a
            # top-k / top-p / CDF boundary and then the later scales (tests/test_t2i.py checks exact equality
            # in float64)
            equal = float((codes == official_codes).double().mean())
            ok, text = equal >= 0.99, f"{equal:.2%} codes equal"
        else:
            ok = bool(codes.min() >= 0 and codes.max() < 32768)
            text = "own Philox stream, codes in range" if ok else "FAIL: codes out of range"
        rate = problem.batch / ours_ms * 1e3
        base_rate = problem.batch / official_ms * 1e3
        rows.append(Row(family="t2i sampling", shape=f"{problem.shape}, {name}", dtype="float32", device=device,
                        baseline="official-eager", baseline_ms=official_ms, ours_ms=ours_ms, baseline_peak=None,
                        ours_peak=None, ok=ok,
                        agreement=f"{text}; {rate:.3f} vs {base_rate:.3f} images/s, {tokens / ours_ms * 1e3:.0f} vs "
                                  f"{tokens / official_ms * 1e3:.0f} tokens/s",
                        extra={"sampler": name, "images_per_s": rate, "baseline_images_per_s": base_rate,
                               "tokens_per_s": tokens / ours_ms * 1e3,
                               "baseline_tokens_per_s": tokens / official_ms * 1e3}))
    return rows


def sample_op_inputs(problem: SampleOpProblem, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    logits = 0.3 * torch.randn(2 * problem.batch, problem.positions, problem.vocab, generator=g)
    return logits.to(device)


def sample_op_callables(problem: SampleOpProblem, device: str) -> dict[str, Callable]:
    """``"fused"``: ``sample_logits`` (CFG, mask, top-k, top-p, draw in one op); ``"official"``: the official
    per-scale draw: ``(1 + t) cond - t uncond``, text ids to ``-inf``, then ``sample_with_top_k_top_p_``
    (``reference.t2i.official_sample_with_top_k_top_p``: topk, a full sort, softmax, cumsum, multinomial)."""
    import tokenflow_ext  # noqa: PLC0415
    from tokenflow_ext.reference.t2i import official_sample_with_top_k_top_p  # noqa: PLC0415

    logits = sample_op_inputs(problem, device)
    K = problem.vocab - problem.image_token_start
    batch, t = problem.batch, problem.guidance

    def fused():
        return tokenflow_ext.sample_logits(logits, guidance=t, top_k=problem.top_k, top_p=problem.top_p,
                                           image_token_start=problem.image_token_start, image_vocab_size=K, seed=0)

    def official():
        guided = (1 + t) * logits[:batch] - t * logits[batch:]
        guided[..., :problem.image_token_start] = float("-inf")
        return official_sample_with_top_k_top_p(guided, problem.top_k, problem.top_p,
                                                generator=torch.Generator(device).manual_seed(0)) \
            - problem.image_token_start

    return {"fused": fused, "official": official}


def run_sample_op_case(problem: SampleOpProblem, device: str, *, repeats: int = 5) -> list[Row]:
    """Checked first: every fused code lies in the official filter's kept set of its row."""
    from tokenflow_ext.reference import sample_logits_filter_reference  # noqa: PLC0415

    callables = sample_op_callables(problem, device)
    logits = sample_op_inputs(problem, device)
    K = problem.vocab - problem.image_token_start
    kept, _ = sample_logits_filter_reference(logits, guidance=problem.guidance, top_k=problem.top_k,
                                             top_p=problem.top_p, image_token_start=problem.image_token_start,
                                             image_vocab_size=K)
    del logits
    rows = []
    ours = callables["fused"]()
    inside = kept.gather(-1, ours.clamp(min=0).unsqueeze(-1)).squeeze(-1) & (ours >= 0)
    theirs = callables["official"]()
    theirs_inside = kept.gather(-1, theirs.clamp(0, K - 1).unsqueeze(-1)).squeeze(-1)
    ok = bool(inside.all())
    # sampled in turns, so that load on the machine hits both alike
    ours_t, theirs_t = time_interleaved([callables["fused"], callables["official"]], device, repeats=repeats,
                                        warmup=1)
    rows.append(Row(family="t2i sample_logits", shape=problem.shape, dtype=dtype_name(torch.float32), device=device,
                    baseline="official", baseline_ms=theirs_t.median_ms, ours_ms=ours_t.median_ms,
                    ours_min_ms=ours_t.min_ms, ours_p10_ms=ours_t.p10_ms, ours_p90_ms=ours_t.p90_ms,
                    baseline_min_ms=theirs_t.min_ms, baseline_p10_ms=theirs_t.p10_ms,
                    baseline_p90_ms=theirs_t.p90_ms, baseline_peak=None, ours_peak=None, ok=ok,
                    agreement=f"{float(inside.double().mean()):.2%} of codes in the official kept set "
                              f"(official draws: {float(theirs_inside.double().mean()):.2%}); mean kept "
                              f"{float(kept.sum(-1).double().mean()):.1f} ids"))
    return rows


def run_t2i_case(problem, device: str, *, repeats: int = 1) -> list[Row]:
    """The ``t2i`` bench family: a model case (:class:`T2IProblem`) or a sampling-op case."""
    if isinstance(problem, T2IProblem):
        return run_t2i_model_case(problem, device, repeats=repeats)
    return run_sample_op_case(problem, device, repeats=max(3, repeats))
