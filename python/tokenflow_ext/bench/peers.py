"""Benchmark family ``peers``: the quantizers a user would otherwise pick, on our codebook, beside our ops.

Both peers search the concatenated single-codebook problem ``[x_s, sqrt(w) x_p]`` against
``[c_s, sqrt(w) c_p]`` (l2-normalised parts), whose plain L2 nearest neighbour is TokenFlow's shared index.
Peers are optional extras (``pip install ".[peers]"``); a missing one gives a skip row, never a failure.

- ``vector-quantize-pytorch``: ``VectorQuantize`` with our codebook copied into ``_codebook.embed`` (1, K, D),
  forward + backward (loss = the quantized output's sum, gradient to the input) against
  ``tokenflow_ext.quantize`` forward + backward. It runs in training mode, the only mode with a gradient to the
  input (its straight-through estimator); ``freeze_codebook=True`` keeps its EMA update from changing the
  codebook, ``rotation_trick=False`` gives the plain straight-through gradient ``quantize`` has,
  ``commitment_weight=0`` leaves out a loss we do not compute, and no k-means init.
- ``faiss-cpu``: ``faiss.knn`` (exact L2, k=1) against ``tokenflow_ext.codebook_search`` (forward only).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from dataclasses import dataclass

import torch

import tokenflow_ext
from tokenflow_ext._parts import normalize_parts
from tokenflow_ext.reference import index_agreement

from .codebook import Baseline, CodebookProblem, _available_bytes, _concatenated, _faiss, run_search_case
from .rows import Row, compare_implementations

VQ_PACKAGE, VQ_MODULE = "vector-quantize-pytorch", "vector_quantize_pytorch"
FAISS_PACKAGE, FAISS_MODULE = "faiss-cpu", "faiss"
# N x K float32 matrices VectorQuantize's training forward + backward keeps alive at its peak (cdist's terms,
# the one-hot codes and their gradients): to skip sizes that cannot fit
VQ_MEMORY_FACTOR = 6.0


@dataclass
class PeersProblem(CodebookProblem):
    """A codebook problem (N queries, K codes, Ds + Dp dims, pixel weight w) run against the installed peers."""


def peer_version(package: str, module: str) -> str | None:
    """The installed version of an optional peer, or None when it cannot be imported."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def agreement_text(exact: float, gap: float, ok: bool) -> str:
    """``"100.00%"``; ``"99.98% (ties, gap 3.0e-07)"`` when every differing index is a near-tie; ``FAIL`` else."""
    if exact == 1.0:
        return "100.00%"
    return f"{100 * exact:.2f}%" + (f" (ties, gap {gap:.1e})" if ok else f" (gap {gap:.1e}) FAIL")


def vector_quantize_module(semantic: torch.Tensor, pixel: torch.Tensor | None, pixel_weight: float):
    """A ``VectorQuantize`` whose codebook is our concatenated, normalised one (see the module docstring)."""
    from vector_quantize_pytorch import VectorQuantize  # noqa: PLC0415  (optional peer)

    _, codes = _concatenated(semantic[:1], semantic, pixel, pixel_weight)
    vq = VectorQuantize(dim=codes.shape[1], codebook_size=codes.shape[0], kmeans_init=False, freeze_codebook=True,
                        rotation_trick=False, commitment_weight=0.0).to(semantic.device)
    embed = vq._codebook.embed
    if embed.shape != (1, *codes.shape):
        raise RuntimeError(f"vector-quantize-pytorch: codebook buffer of shape {tuple(embed.shape)}, expected "
                           f"{(1, *codes.shape)}")
    with torch.no_grad():
        embed.copy_(codes[None])
    return vq.train()


def _concat_input(x: torch.Tensor, semantic_dim: int, pixel_weight: float) -> torch.Tensor:
    """``[x_s, sqrt(w) x_p]`` of normalised parts, differentiable in ``x`` (the peer's input)."""
    x_hat = normalize_parts(x, semantic_dim)
    if x.shape[1] == semantic_dim:
        return x_hat
    return torch.cat([x_hat[:, :semantic_dim], x_hat[:, semantic_dim:] * math.sqrt(pixel_weight)], 1)


def _quantize_rows(problem: CodebookProblem, device: str, x, semantic, pixel, repeats: int) -> list[Row]:
    w = problem.pixel_weight
    version = peer_version(VQ_PACKAGE, VQ_MODULE)
    needed = int(VQ_MEMORY_FACTOR * problem.nk_bytes())

    def ours():
        leaf = x.detach().requires_grad_()
        result = tokenflow_ext.quantize(leaf, semantic, pixel, pixel_weight=w)
        return result.indices, torch.autograd.grad(result.quantized.sum(), leaf)[0]

    callables: dict = {"fused": ours}
    if version is None:
        callables[VQ_PACKAGE] = f"{VQ_PACKAGE} not installed"
    elif needed > 0.8 * _available_bytes(device):
        callables[VQ_PACKAGE] = f"skipped: needs about {needed / 2**30:.0f} GiB for its N x K matrices"
    else:
        vq = vector_quantize_module(semantic, pixel, w)

        def theirs():
            leaf = x.detach().requires_grad_()
            quantized, indices, _ = vq(_concat_input(leaf, problem.semantic_dim, w)[None])
            return indices[0], torch.autograd.grad(quantized.sum(), leaf)[0]

        callables[f"{VQ_PACKAGE} {version}"] = theirs

    def check(ours_result, name, their_result):
        exact, gap, ok = index_agreement(x, semantic, pixel, ours_result[0], their_result[0], pixel_weight=w)
        if exact < 1.0:
            return ok, agreement_text(exact, gap, ok)
        # both straight-through: the peer's input gradient is ours with the pixel part scaled by sqrt(w)
        expected = ours_result[1].clone()
        expected[:, problem.semantic_dim:] *= math.sqrt(w)
        grads_match = torch.allclose(their_result[1], expected, atol=1e-5, rtol=1e-4)
        return grads_match, agreement_text(exact, gap, ok) + (", grads match" if grads_match else ", grads FAIL")

    rows = compare_implementations("peers: quantize fwd+bwd", problem.shape, problem.dtype, device, callables, check,
                                   repeats=repeats)
    for row in rows:
        row.extra.update(peer=VQ_PACKAGE, peer_version=version)
    return rows


def _search_rows(problem: CodebookProblem, device: str, repeats: int) -> list[Row]:
    version = peer_version(FAISS_PACKAGE, FAISS_MODULE)
    name = FAISS_PACKAGE if version is None else f"{FAISS_PACKAGE} {version}"
    baseline = Baseline(name, _faiss, None if version else f"{FAISS_PACKAGE} not installed", memory_factor=0.0)
    if version is None:
        rows = run_search_case(problem, device, repeats=repeats, baselines=[baseline])
    else:
        import faiss  # noqa: PLC0415  (optional peer)

        # faiss's OpenMP threads as many as torch's intra-op threads (--threads), for a like-for-like time
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(torch.get_num_threads())
        try:
            rows = run_search_case(problem, device, repeats=repeats, baselines=[baseline])
        finally:
            faiss.omp_set_num_threads(threads)
    for row in rows:
        row.family = "peers: codebook_search"
        row.extra.update(peer=FAISS_PACKAGE, peer_version=version)
    return rows


def run_peers_case(problem: CodebookProblem, device: str, *, repeats: int = 3) -> list[Row]:
    """One row per peer: vector-quantize-pytorch (quantize forward + backward) and faiss-cpu (search), each with
    the index agreement (% equal indices; differing ones must be fp32 near-ties) and the time ratio; a skip row
    for a peer that is not installed."""
    x, semantic, pixel = problem.tensors(device)
    return _quantize_rows(problem, device, x, semantic, pixel, repeats) + _search_rows(problem, device, repeats)
