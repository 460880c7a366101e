"""Whole-model cases: TokenFlow tokenizer encode throughput with our quantizer vs the same model with the
official eager quantizer (N x K distances, one-hot, d_norm logging)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .rows import Row, timing_fields
from .timing import peak_extra_memory, summarize, synchronize


@dataclass
class TokenizerProblem:
    """``config`` at full official size with random weights, ``batch`` random images, eval mode."""

    config: str = "clipb_256"
    batch: int = 8
    enhanced_decoder: bool = False

    @property
    def shape(self) -> str:
        return f"{self.config} B={self.batch}"


def tokenizer_encode_callables(problem: TokenizerProblem, device: str) -> dict[str, Callable]:
    """``"fused"``: ``tokenizer.encode``; ``"official-eager"``: the same encoders, then TokenFlow's own
    multi-scale loop and quantizer formulas. Both return the indices."""
    from tokenflow_ext.models import TokenFlowTokenizer  # noqa: PLC0415
    from tokenflow_ext.reference import official_multiscale_encode  # noqa: PLC0415

    torch.manual_seed(0)
    tokenizer = TokenFlowTokenizer(problem.config, enhanced_decoder=problem.enhanced_decoder).to(device).eval()
    size = tokenizer.config.image_size
    images = torch.rand(problem.batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1

    @torch.no_grad()
    def fused():
        return tokenizer.encode(images).indices

    @torch.no_grad()
    def official():
        h = torch.cat([tokenizer.semantic_features(images), tokenizer.pixel_features(images)], dim=1)
        return official_multiscale_encode(h, tokenizer.quantize.embedding_vqkd.weight,
                                          tokenizer.quantize.embedding_vqgan.weight, tokenizer.config.scales)[2]

    return {"fused": fused, "official-eager": official}


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


def compare_models(family: str, shape: str, batch: int, callables: dict[str, Callable], device: str,
                   compare: Callable, *, repeats: int = 1, warmup: bool = True) -> list[Row]:
    """Whole-model row: ``callables["fused"]`` vs ``callables["official-eager"]``, each timed ``repeats``
    times in alternation (median and spread) with its peak memory. Without ``warmup`` the first timed call's
    result is the one compared (for calls of minutes). ``compare(ours, theirs) -> (ok, text)``. Reports
    images/s."""
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
    ok, text = compare(results["fused"][0], results["official-eager"][0])
    spread = {name: summarize([ms for ms, _ in runs]) for name, runs in timings.items()}
    rate = {name: batch / timing.median_ms * 1e3 for name, timing in spread.items()}
    return [Row(family=family, shape=shape, dtype="float32", device=device, baseline="official-eager",
                baseline_peak=timings["official-eager"][0][1], ours_peak=timings["fused"][0][1],
                agreement=f"{text}; {rate['fused']:.2f} vs {rate['official-eager']:.2f} images/s", ok=ok,
                extra={"images_per_s": rate["fused"], "baseline_images_per_s": rate["official-eager"]},
                **timing_fields(spread["fused"], spread["official-eager"]))]


def run_tokenizer_case(problem: TokenizerProblem, device: str, *, repeats: int = 1) -> list[Row]:
    def same_indices(ours, theirs):
        ok = torch.equal(ours, theirs)
        return ok, "indices match" if ok else "FAIL"

    return compare_models("tokenizer encode", problem.shape, problem.batch, tokenizer_encode_callables(problem, device),
                          device, same_indices, repeats=repeats)


@dataclass
class FlowTokSampleProblem:
    """FlowTok text -> image-latent sampling: ``preset`` flow transformer (random weights, eval), ``batch``
    prompts as CLIP features, ``steps`` Euler steps with CFG ``guidance_scale``. Decoding is not timed."""

    preset: str = "B"
    batch: int = 64
    steps: int = 20
    guidance_scale: float = 2.0

    @property
    def shape(self) -> str:
        return f"FlowTok-{self.preset} B={self.batch} {self.steps} steps s={self.guidance_scale:g}"


def flowtok_sample_callables(problem: FlowTokSampleProblem, device: str) -> dict[str, Callable]:
    """``"fused"``: ``FlowTok.generate(decode=False)`` (one stacked cond/uncond forward per step, the fused
    in-place CFG + Euler step); ``"official-eager"``: the official solver's loop (two forward passes per
    step, eager ``x + dt * (v_u + s (v_c - v_u))``), same time grid and text latents. Both return latents."""
    from tokenflow_ext.models import FlowTok  # noqa: PLC0415

    torch.manual_seed(0)
    model = FlowTok(problem.preset, text_encoder=False, tokenizer=False).to(device).eval()
    for parameter in model.nnet.final_layer.parameters():  # adaLN-Zero init predicts 0: make the flow non-trivial
        torch.nn.init.normal_(parameter, std=0.02)
    features = torch.randn(problem.batch, 77, model.nnet.clip_dim, generator=torch.Generator().manual_seed(0)).to(device)

    @torch.no_grad()
    def fused():
        return model.generate(features, num_steps=problem.steps, guidance_scale=problem.guidance_scale,
                              decode=False, generator=torch.Generator(device).manual_seed(1))

    @torch.no_grad()
    def official():
        x, _, _ = model.nnet.encode_text(features, generator=torch.Generator(device).manual_seed(1))
        times = torch.linspace(0, 1 - 1e-5, problem.steps, device=device)
        dt = (1 - 1e-5) / problem.steps
        cond = torch.zeros(problem.batch, dtype=torch.bool, device=device)
        for t_value in times:
            t = t_value.repeat(problem.batch)
            v_cond, v_uncond = model.nnet(x, t, cond), model.nnet(x, t, ~cond)
            x = x + dt * (v_uncond + problem.guidance_scale * (v_cond - v_uncond))
        return x

    return {"fused": fused, "official-eager": official}


def run_flowtok_sample_case(problem: FlowTokSampleProblem, device: str, *, repeats: int = 1) -> list[Row]:
    """No warm-up: a CPU run of FlowTok-B at batch 64 takes minutes, so the first, timed call of each
    sampler is also the one whose latents are compared."""
    def close_latents(ours, theirs):
        error = (ours - theirs).abs().max().item()
        ok = error <= 1e-3 * max(1.0, theirs.abs().max().item())
        return ok, f"{'max |diff|' if ok else 'FAIL'} {error:.1e}"

    return compare_models("flowtok sampling", problem.shape, problem.batch, flowtok_sample_callables(problem, device),
                          device, close_latents, repeats=repeats, warmup=False)
