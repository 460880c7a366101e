"""Whole-model inference cases, ours against the official-style eager path
(:mod:`tokenflow_ext.reference.official_models`: the same weights, computed as the official code does):
TokenFlow tokenizer ``tokenize`` (encode to indices) and ``decode_indices``, FlowTok text -> latent sampling.
Each case has an fp32 row (exact: equal indices, latents / images within 1e-3 relative) and, with
``autocast="bf16"`` (the default), a row of the opt-in ``autocast_dtype=torch.bfloat16`` path that reports its
agreement with the fp32 official path instead of requiring it. Both rows come from one run: ours fp32, ours
bf16 and the official path are timed in turns, and both rows divide by the same official timings."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .rows import Row, timing_fields
from .timing import peak_extra_memory, summarize, synchronize

AUTOCAST = {None: None, "bf16": torch.bfloat16}


@dataclass
class TokenizerProblem:
    """``config`` at full official size with random weights (``overrides`` shrink it, for the tests),
    ``batch`` random images, eval mode. ``op``: ``"encode"`` (``tokenize``) or ``"decode"``
    (``decode_indices`` of the official path's indices). ``autocast``: ``"bf16"`` adds the row of ours under
    bf16 autocast; ``None``: the fp32 row only."""

    config: str = "clipb_256"
    batch: int = 8
    enhanced_decoder: bool = False
    op: str = "encode"
    autocast: str | None = "bf16"
    overrides: dict = field(default_factory=dict)

    @property
    def shape(self) -> str:
        decoder = " enhanced" if self.enhanced_decoder and self.op == "decode" else ""
        return f"{self.config}{decoder} {self.op} B={self.batch}"


def _tokenizer_pair(problem: TokenizerProblem, device: str):
    from tokenflow_ext.models import TokenFlowTokenizer  # noqa: PLC0415
    from tokenflow_ext.reference.official_models import OfficialStyleTokenFlow  # noqa: PLC0415

    torch.manual_seed(0)
    tokenizer = TokenFlowTokenizer(problem.config, enhanced_decoder=problem.enhanced_decoder,
                                   **problem.overrides).to(device).eval()
    official = OfficialStyleTokenFlow.like(tokenizer)
    size = tokenizer.config.image_size
    images = torch.rand(problem.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    return tokenizer, official, images


def _with_autocast_variant(problem, fused: Callable[[torch.dtype | None], Callable]) -> dict[str, Callable]:
    """``{"fused": fused(None)}``, plus ``"fused <autocast>"`` = ``fused(dtype)`` when the problem asks for it."""
    callables = {"fused": fused(None)}
    if problem.autocast is not None:
        callables[f"fused {problem.autocast}"] = fused(AUTOCAST[problem.autocast])
    return callables


def tokenizer_encode_callables(problem: TokenizerProblem, device: str) -> dict[str, Callable]:
    """``"fused"``: ``tokenizer.tokenize``; ``"fused bf16"`` (with ``autocast``): the same under bf16
    autocast; ``"official-eager"``: the official-style ``encode`` (official encoders' op order and attention,
    N x K quantizer). All return the indices."""
    tokenizer, official, images = _tokenizer_pair(problem, device)
    callables = _with_autocast_variant(problem, lambda dtype: lambda: tokenizer.tokenize(images, autocast_dtype=dtype))
    return {**callables, "official-eager": lambda: official.official_encode(images)[2]}


def tokenizer_decode_callables(problem: TokenizerProblem, device: str) -> dict[str, Callable]:
    """``"fused"``: ``tokenizer.decode_indices``; ``"official-eager"``: the official ``decode_code`` (which
    also runs the semantic decoder, as the official module always does). Both return the image, decoded from
    the official path's indices of the problem's images."""
    tokenizer, official, images = _tokenizer_pair(problem, device)
    indices = official.official_encode(images)[2]

    def fused(dtype):
        return torch.no_grad()(lambda: tokenizer.decode_indices(indices, autocast_dtype=dtype))

    return {**_with_autocast_variant(problem, fused), "official-eager": lambda: official.official_decode_code(indices)[1]}


def _timed_peak(fn: Callable, device: str) -> tuple[float, int | None]:
    """One call: (milliseconds, peak extra bytes). Model calls last seconds, so one sample each suffices
    after a warm-up call; timing the measured call avoids a third multi-second run."""
    elapsed = []

    def run():
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        elapsed.append((time.perf_counter() - start) * 1e3)

    peak = peak_extra_memory(run, device)
    return elapsed[0], peak


# variant -> the row's dtype column; variants that must match the official path exactly (not an autocast)
VARIANT_DTYPES = {"cuda-graph": "float32 CUDA graph"}
EXACT_VARIANTS = (None, "cuda-graph")


def compare_models(family: str, shape: str, batch: int, callables: dict[str, Callable], device: str,
                   compare: Callable, *, repeats: int = 1, warmup: bool = True, dtype: str = "float32") -> list[Row]:
    """Whole-model rows: ``callables["fused"]`` (and every other ``"fused <variant>"`` entry, e.g.
    ``"fused bf16"``) vs ``callables["official-eager"]``, all timed ``repeats`` times in turns (median and
    spread) with peak memory; one row per ours, each against the same baseline timings. Without ``warmup``
    the first timed call's result is the one compared (for calls of minutes). ``compare(ours, theirs, variant)
    -> (ok, text)``, variant ``None`` for ``"fused"``. Reports images/s. A variant's row has the dtype
    ``"<variant>-autocast"`` (or its ``VARIANT_DTYPES`` entry)."""
    results: dict[str, list] = {name: [] for name in callables}
    timings: dict[str, list] = {name: [] for name in callables}
    if warmup:
        for name, fn in callables.items():
            results[name].append(fn())
    for round_index in range(max(1, repeats)):  # interleaved: load from other processes hits both alike
        names = list(callables) if round_index % 2 == 0 else list(reversed(callables))
        for name in names:
            fn = callables[name]
            timings[name].append(_timed_peak(lambda fn=fn, name=name: results[name].append(fn()), device))
    return _model_rows(family, shape, batch, results, timings, device, compare, dtype)


def compare_models_one_at_a_time(family: str, shape: str, batch: int, factories: dict[str, Callable[[], Callable]],
                                 device: str, compare: Callable, *, repeats: int = 1, warmup: bool = True,
                                 dtype: str = "float32") -> list[Row]:
    """:func:`compare_models` for cases where the implementations do not fit in memory together (two
    trainers with their optimizer states): each ``factories[name]()`` builds one callable, which is warmed
    up, timed ``repeats`` times and freed before the next is built. Same rows."""
    results: dict[str, list] = {name: [] for name in factories}
    timings: dict[str, list] = {name: [] for name in factories}
    for name, factory in factories.items():
        fn = factory()
        if warmup:
            results[name].append(fn())
        for _ in range(max(1, repeats)):
            timings[name].append(_timed_peak(lambda fn=fn, name=name: results[name].append(fn()), device))
        del fn
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return _model_rows(family, shape, batch, results, timings, device, compare, dtype, interleaved=False)


def _model_rows(family, shape, batch, results, timings, device, compare, dtype, *, interleaved=True) -> list[Row]:
    spread = {name: summarize([ms for ms, _ in runs]) for name, runs in timings.items()}
    rate = {name: batch / timing.median_ms * 1e3 for name, timing in spread.items()}
    rows = []
    for name in (n for n in results if n.startswith("fused")):
        variant = name[len("fused "):] or None
        ok, text = compare(results[name][0], results["official-eager"][0], variant)
        row_dtype = dtype if variant is None else VARIANT_DTYPES.get(variant, f"{variant}-autocast")
        rows.append(Row(family=family, shape=shape, dtype=row_dtype, device=device, baseline="official-eager",
                        baseline_peak=timings["official-eager"][0][1],
                        ours_peak=timings[name][0][1],
                        agreement=f"{text}; {rate[name]:.2f} vs {rate['official-eager']:.2f} images/s", ok=ok,
                        extra={"images_per_s": rate[name], "baseline_images_per_s": rate["official-eager"]},
                        interleaved=interleaved,
                        **timing_fields(spread[name], spread["official-eager"])))
    return rows


def _close(ours, theirs, exact: bool) -> tuple[bool, str]:
    error = (ours.float() - theirs.float()).abs().max().item()
    if not exact:
        return True, f"opt-in bf16: max |diff| {error:.1e} vs fp32 official (|max| {theirs.abs().max().item():.2g})"
    ok = error <= 1e-3 * max(1.0, theirs.abs().max().item())
    return ok, f"{'max |diff|' if ok else 'FAIL'} {error:.1e}"


def run_tokenizer_case(problem: TokenizerProblem, device: str, *, repeats: int = 1) -> list[Row]:
    """siglip_384 (a minute per call on 2 CPU cores) runs without warm-up: its first timed calls are compared."""
    warmup = problem.config != "siglip_384"
    if problem.op == "decode":
        return compare_models("tokenizer decode_indices", problem.shape, problem.batch,
                              tokenizer_decode_callables(problem, device), device,
                              lambda ours, theirs, variant: _close(ours, theirs, variant is None), repeats=repeats,
                              warmup=warmup)

    def same_indices(ours, theirs, variant):
        if variant is None:
            ok = torch.equal(ours, theirs)
            return ok, "indices match" if ok else f"FAIL: {(ours == theirs).float().mean().item():.2%} agree"
        agree = (ours == theirs).float().mean().item()
        return True, f"opt-in bf16: {agree:.1%} of indices equal the fp32 official ones"

    return compare_models("tokenizer encode", problem.shape, problem.batch, tokenizer_encode_callables(problem, device),
                          device, same_indices, repeats=repeats, warmup=warmup)


@dataclass
class FlowTokSampleProblem:
    """FlowTok text -> image-latent sampling: ``preset`` flow transformer (random weights, eval), ``batch``
    prompts as CLIP features, ``steps`` Euler steps with CFG ``guidance_scale``. Decoding is not timed."""

    preset: str | tuple = "B"
    batch: int = 64
    steps: int = 20
    guidance_scale: float = 2.0
    autocast: str | None = "bf16"  # also time ours under bf16 autocast (its own row); None: fp32 only
    flow_kwargs: dict = field(default_factory=dict)  # FlowTransformer sizes (the tests shrink it)

    @property
    def shape(self) -> str:
        return f"FlowTok-{self.preset} B={self.batch} {self.steps} steps s={self.guidance_scale:g}"


def flowtok_sample_callables(problem: FlowTokSampleProblem, device: str) -> dict[str, Callable]:
    """``"fused"``: ``FlowTok.generate(decode=False)`` (one stacked cond/uncond forward per step, the fused
    in-place CFG + Euler step, ``autocast_dtype`` per the problem; on CUDA also ``"fused cuda-graph"``, the
    fp32 loop replayed as one CUDA graph); ``"official-eager"``: the official-style
    nnet (:class:`OfficialStyleFlowTransformer`, same weights) in the official solver loop (two forward
    passes per step, eager ``x + dt * (v_u + s (v_c - v_u))``), same time grid and text latents. Both
    return latents."""
    from tokenflow_ext.models import FlowTok  # noqa: PLC0415
    from tokenflow_ext.reference.official_models import (  # noqa: PLC0415
        OfficialStyleFlowTransformer,
        official_flowtok_sample,
    )

    torch.manual_seed(0)
    model = FlowTok(problem.preset, text_encoder=False, tokenizer=False, **problem.flow_kwargs).to(device).eval()
    for parameter in model.nnet.final_layer.parameters():  # adaLN-Zero init predicts 0: make the flow non-trivial
        torch.nn.init.normal_(parameter, std=0.02)
    official = OfficialStyleFlowTransformer.like(model.nnet).eval()
    features = torch.randn(problem.batch, 77, model.nnet.clip_dim, generator=torch.Generator().manual_seed(0)).to(device)

    def fused(dtype, cuda_graph=False):
        return torch.no_grad()(lambda: model.generate(
            features, num_steps=problem.steps, guidance_scale=problem.guidance_scale, decode=False,
            generator=torch.Generator(device).manual_seed(1), autocast_dtype=dtype, cuda_graph=cuda_graph))

    @torch.no_grad()
    def official_loop():
        x0, _, _ = official.encode_text(features, generator=torch.Generator(device).manual_seed(1))
        return official_flowtok_sample(official, x0, problem.steps, problem.guidance_scale)

    callables = _with_autocast_variant(problem, fused)
    if device == "cuda":  # the fp32 loop as one CUDA graph, captured by the warm-up call
        callables["fused cuda-graph"] = fused(None, cuda_graph=True)
    return {**callables, "official-eager": official_loop}


def run_flowtok_sample_case(problem: FlowTokSampleProblem, device: str, *, repeats: int = 1) -> list[Row]:
    """No warm-up on the CPU: a run of FlowTok-B at batch 64 takes minutes, so the first, timed call of each
    sampler is also the one whose latents are compared. On CUDA a warm-up call captures the graph."""
    return compare_models("flowtok sampling", problem.shape, problem.batch, flowtok_sample_callables(problem, device),
                          device, lambda ours, theirs, variant: _close(ours, theirs, variant in EXACT_VARIANTS),
                          repeats=repeats, warmup=device != "cpu")
