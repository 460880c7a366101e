"""Benchmark cases of the codebook families: codebook_search, codebook_gather (+ backward), quantize.

Every case checks the fused result against each baseline before timing it; a failed check is reported
and makes the run fail. Baselines:
- ``official-eager``: TokenFlow's formulation (two expanded N x K distance matrices, then argmin).
- ``lean-eager``: one ``addmm`` + ``argmin`` on the concatenated problem ``[x_s, sqrt(w) x_p]`` (one N x K).
- ``torch.compile``: the lean form compiled by Inductor.
- ``faiss-cpu``: ``faiss.knn`` (exact L2, k=1) on the same concatenated, pre-normalised arrays (optional).
"""

from __future__ import annotations

import functools

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

import torch

import tokenflow_ext
from tokenflow_ext._parts import normalize_parts
from tokenflow_ext.reference import (
    codebook_gather_reference,
    codebook_search_reference,
    index_agreement,
    quantize_reference,
)

from .rows import Row, compare_implementations, compile_once, timing_fields
from .timing import peak_extra_memory, time_interleaved


@dataclass
class CodebookProblem:
    n: int
    k: int
    semantic_dim: int = 32
    pixel_dim: int = 8
    pixel_weight: float = 0.5
    dtype: torch.dtype = torch.float32
    seed: int = 0
    index_skew: str = "uniform"  # gather only: "uniform" codes, or "one code" (a collapsed codebook)

    @property
    def shape(self) -> str:
        weight = f" w={self.pixel_weight:g}" if self.pixel_dim else ""
        skew = "" if self.index_skew == "uniform" else f" indices on {self.index_skew}"
        return f"N={self.n} K={self.k} D={self.semantic_dim}+{self.pixel_dim}{weight}{skew}"

    def nk_bytes(self) -> int:
        return self.n * self.k * 4

    def tensors(self, device: str):
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.n, self.semantic_dim + self.pixel_dim, generator=g)
        semantic = torch.randn(self.k, self.semantic_dim, generator=g)
        pixel = torch.randn(self.k, self.pixel_dim, generator=g) if self.pixel_dim else None
        move = lambda t: None if t is None else t.to(device=device, dtype=self.dtype)  # noqa: E731
        return move(x), move(semantic), move(pixel)


@dataclass
class Baseline:
    name: str
    make: Callable  # (x, semantic, pixel, pixel_weight) -> zero-argument callable returning indices
    missing: str | None = None  # why it cannot run here (an uninstalled peer), or None
    memory_factor: float = 1.0  # N x K matrices it keeps alive at its peak (to skip what cannot fit)


def _concatenated(x, semantic, pixel, pixel_weight):
    """The single-codebook problem with the same argmin: [x_s, sqrt(w) x_p] against [c_s, sqrt(w) c_p]."""
    semantic_dim = semantic.shape[1]
    root_w = math.sqrt(pixel_weight)
    x_hat = normalize_parts(x.float(), semantic_dim)
    codes = normalize_parts(torch.cat([semantic, pixel], 1).float() if pixel is not None else semantic.float(),
                            semantic_dim)
    if pixel is not None:
        x_hat[:, semantic_dim:] *= root_w
        codes[:, semantic_dim:] *= root_w
    return x_hat, codes


def lean_concat_search(x, semantic, pixel, pixel_weight):
    x_hat, codes = _concatenated(x, semantic, pixel, pixel_weight)
    return torch.addmm((codes * codes).sum(1), x_hat, codes.t(), alpha=-2).argmin(1)


def _official(x, semantic, pixel, w):
    return lambda: codebook_search_reference(x, semantic, pixel, pixel_weight=w)[0]


def _lean(x, semantic, pixel, w):
    return lambda: lean_concat_search(x, semantic, pixel, w)


def _compiled(x, semantic, pixel, w):
    compiled = compile_once(lean_concat_search)
    return lambda: compiled(x, semantic, pixel, w)


def _faiss(x, semantic, pixel, w):
    import faiss  # noqa: PLC0415  (optional peer)

    x_hat, codes = _concatenated(x, semantic, pixel, w)
    queries, base = x_hat.cpu().numpy(), codes.cpu().numpy()
    return lambda: torch.from_numpy(faiss.knn(queries, base, 1)[1][:, 0]).to(x.device)


def search_baselines(device: str) -> list[Baseline]:
    has_faiss = importlib.util.find_spec("faiss") is not None
    baselines = [
        Baseline("official-eager", _official, memory_factor=6.0),
        Baseline("lean-eager", _lean, memory_factor=1.0),
        Baseline("torch.compile", _compiled, memory_factor=1.0),
    ]
    if device == "cpu":
        baselines.append(Baseline("faiss-cpu", _faiss, None if has_faiss else "faiss-cpu not installed",
                                  memory_factor=0.0))
    return baselines


def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def run_search_case(problem: CodebookProblem, device: str, *, repeats: int = 5,
                    baselines: list[Baseline] | None = None, search=None) -> list[Row]:
    """Time the fused search and every baseline on one problem; check index agreement first. A baseline
    that is not installed, or whose N x K matrices would not fit in memory, is listed as skipped."""
    search = search or tokenflow_ext.codebook_search
    x, semantic, pixel = problem.tensors(device)
    w = problem.pixel_weight
    callables = {"fused": lambda: search(x, semantic, pixel, pixel_weight=w)[0]}
    for baseline in baselines if baselines is not None else search_baselines(device):
        needed = int(baseline.memory_factor * problem.nk_bytes())
        if baseline.missing or needed > 0.8 * _available_bytes(device):
            callables[baseline.name] = (baseline.missing
                                        or f"skipped: needs about {needed / 2**30:.0f} GiB for its N x K matrices")
        else:
            callables[baseline.name] = baseline.make(x, semantic, pixel, w)

    def check(ours_indices, name, their_indices):
        exact, gap, ok = index_agreement(x, semantic, pixel, ours_indices, their_indices, pixel_weight=w,
                                         tie_tolerance=1e-4 if problem.dtype != torch.float64 else 1e-9)
        return ok, f"{100 * exact:.2f}%" + ("" if exact == 1.0 else f" (ties, gap {gap:.1e})" if ok else " FAIL")

    return compare_implementations("codebook_search", problem.shape, problem.dtype, device, callables, check,
                                   repeats=repeats)


def run_gather_case(problem: CodebookProblem, device: str, *, repeats: int = 5) -> list[Row]:
    """codebook_gather forward + backward (both codebooks, l2-normalised) against torch indexing + autograd,
    eager and compiled. Uniform or collapsed ("one code") index histograms; on CUDA both backward modes
    (atomics, and the deterministic sorted piece sums)."""
    _, semantic, pixel = problem.tensors(device)
    g = torch.Generator().manual_seed(problem.seed + 1)
    if problem.index_skew == "one code":
        indices = torch.zeros(problem.n, dtype=torch.long).to(device)
    else:
        indices = torch.randint(0, problem.k, (problem.n,), generator=g).to(device)
    upstream = torch.randn(problem.n, problem.semantic_dim + problem.pixel_dim, generator=g).to(device, problem.dtype)

    def step(gather):
        leaves = [semantic.detach().requires_grad_(), pixel.detach().requires_grad_()]
        rows = gather(indices, *leaves)
        return rows, torch.autograd.grad(rows, leaves, upstream)

    def check(ours, name, theirs):
        ok = torch.allclose(ours[0], theirs[0], atol=1e-5) and all(
            torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(ours[1], theirs[1]))
        return ok, "values match" if ok else "FAIL"

    rows = []
    modes = [None] if device == "cpu" else [False, True]  # the CPU backward is always deterministic
    for deterministic in modes:
        fused = functools.partial(tokenflow_ext.codebook_gather, deterministic=deterministic)
        callables = {name: (lambda fn=fn: step(fn)) for name, fn in {
            "fused": fused, "eager-index": codebook_gather_reference,
            "torch.compile": compile_once(codebook_gather_reference)}.items()}
        mode = "" if deterministic is None else (" deterministic" if deterministic else " atomic")
        shape = f"N={problem.n} K={problem.k} D={problem.semantic_dim}+{problem.pixel_dim}"
        if problem.index_skew != "uniform":
            shape += f" indices on {problem.index_skew}"
        rows += compare_implementations(f"codebook_gather fwd+bwd{mode}", shape, problem.dtype, device, callables,
                                        check, repeats=repeats)
    return rows


def run_quantize_case(problem: CodebookProblem, device: str, *, repeats: int = 3) -> list[Row]:
    """quantize() forward + backward (vq + commitment losses) against the official quantizer, eager and compiled."""
    x, semantic, pixel = problem.tensors(device)
    w = problem.pixel_weight

    def step(quantize_fn):
        leaves = [t.detach().requires_grad_() for t in (x, semantic, pixel)]
        indices, codes, quantized = quantize_fn(*leaves, pixel_weight=w)[:3]
        x_hat = normalize_parts(leaves[0], problem.semantic_dim)
        loss = ((codes - x_hat.detach()) ** 2).mean() + 0.25 * ((codes.detach() - x_hat) ** 2).mean()
        loss = loss + quantized.square().mean()
        return indices, torch.autograd.grad(loss, leaves)

    callables = {name: (lambda fn=fn: step(fn)) for name, fn in {
        "fused": tokenflow_ext.quantize, "official-eager": quantize_reference,
        "torch.compile": compile_once(quantize_reference)}.items()}

    def check(ours, name, theirs):
        exact, gap, ok = index_agreement(x, semantic, pixel, ours[0], theirs[0], pixel_weight=w)
        if exact == 1.0:
            ok = ok and all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(ours[1], theirs[1]))
        return ok, f"{100 * exact:.2f}%" + ("" if ok else " FAIL")

    return compare_implementations("quantize fwd+bwd", problem.shape, problem.dtype, device, callables, check,
                                   repeats=repeats)


@dataclass
class MultiScaleProblem:
    """One TokenFlow training batch through the multi-scale quantizer (issue: B=8, siglip scales, K=32768)."""

    batch: int = 8
    preset: str = "siglip_384"
    k: int = 32768

    @property
    def shape(self) -> str:
        return f"B={self.batch} {self.preset} K={self.k}"


def multiscale_step_callables(problem: MultiScaleProblem, device: str) -> dict[str, Callable]:
    """"fused" and "official-eager" train steps (vq + commit + entropy losses and a feature loss, backward);
    each returns the indices. The official formulation is TokenFlow's, with its N x K side computations."""
    from tokenflow_ext.nn import DualCodebookQuantizer, MultiScaleQuantizer  # noqa: PLC0415
    from tokenflow_ext.reference import official_multiscale_encode  # noqa: PLC0415

    torch.manual_seed(0)
    quantizer = DualCodebookQuantizer(problem.k).to(device)
    ms = MultiScaleQuantizer(quantizer, problem.preset, random_scale_drop=False).train()
    size = ms.scales[-1]
    h = torch.randn(problem.batch, 40, size, size, device=device)

    def step(encode):
        leaf = h.detach().requires_grad_()
        features, losses, indices = encode(leaf)
        (losses[0] + losses[1] + losses[2] + features.square().mean()).backward()
        quantizer.zero_grad(set_to_none=True)
        return indices

    official = lambda leaf: official_multiscale_encode(  # noqa: E731
        leaf, quantizer.embedding_vqkd.weight, quantizer.embedding_vqgan.weight, ms.scales, training=True)
    return {"fused": lambda: step(ms), "official-eager": lambda: step(official)}


def run_multiscale_case(problem: MultiScaleProblem, device: str, *, repeats: int = 3) -> list[Row]:
    callables = multiscale_step_callables(problem, device)
    ours_indices, their_indices = callables["fused"](), callables["official-eager"]()
    ok = torch.equal(ours_indices, their_indices)
    ours_peak = peak_extra_memory(callables["fused"], device)
    their_peak = peak_extra_memory(callables["official-eager"], device)
    ours, theirs = time_interleaved([callables["fused"], callables["official-eager"]], device, warmup=0,
                                    repeats=min(repeats, 3))
    return [Row(family="multi-scale quantizer fwd+bwd", shape=problem.shape, dtype="float32", device=device,
                baseline="official-eager", baseline_peak=their_peak, ours_peak=ours_peak,
                agreement="indices match" if ok else "FAIL", ok=ok, **timing_fields(ours, theirs))]
