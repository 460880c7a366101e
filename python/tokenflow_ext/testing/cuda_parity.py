"""Cases that compare the CUDA kernels with the CPU ops and the plain-PyTorch reference.

One list serves two runners:

- ``tests/cuda_emu``: the unchanged ``csrc/cuda/*.cu`` entry points compiled for the CPU by the emulator
  (``torch.ops.tokenflow_ext_emu``, CPU tensors), in every test run and under ASan and TSan in CI;
- ``python -m tokenflow_ext verify-gpu``: the real CUDA ops (``torch.ops.tokenflow_ext``, CUDA tensors).

A case builds its inputs from a fixed seed on ``device``, calls ``ops.<op>`` and returns a dict of CPU tensors
(inputs it needs for the check, and the outputs). :func:`run_case` runs it once with the CPU ops and once with
the ops under test, then the case's check returns the list of problems (empty: passed).

Shapes are chosen for the CUDA launch plans: odd N, K and D at tile edges; K split across blocks (with
``TFX_EMU_SM_COUNT=2`` in the emulator: N <= 256 splits, N >= 512 does not) and the split merge; ties across
tiles and splits; NaN rows and codes; every dtype; empty inputs; non-contiguous and aliased in-place inputs.
``min_distance`` is compared with a tolerance, indices exactly wherever the distance gap between the two
choices is above the tolerance (nvcc contracts ``a*b + c`` into FMAs, g++ and the CPU kernels do not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..reference import (
    codebook_gather_reference,
    codebook_search_reference,
    euler_step_reference,
    index_agreement,
    interpolate_reference,
    matching_loss_reference,
    velocity_loss_reference,
)

Outputs = dict[str, torch.Tensor]
LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ParityCase:
    """``run(device, ops) -> outputs``; ``check(expected, actual) -> problems``. ``emulate=False``: too large for
    the emulator (blocks run one after another on OS threads), run on a real GPU only."""

    name: str
    run: Callable[[str, object], Outputs]
    check: Callable[[Outputs, Outputs], list[str]]
    emulate: bool = True


CASES: list[ParityCase] = []


def run_case(case: ParityCase, device: str, ops) -> list[str]:
    """Problems found comparing ``ops`` on ``device`` with the CPU ops (an empty list: the case passed)."""
    expected = case.run("cpu", torch.ops.tokenflow_ext)
    actual = case.run(device, ops)
    return case.check(expected, actual)


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return tuple(_cpu(v) for v in value)


def _randn(g: torch.Generator, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def _tolerance(dtype: torch.dtype) -> dict:
    if dtype in LOW_PRECISION:
        return dict(rtol=1e-2, atol=1e-2)
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-12)
    return dict(rtol=1e-5, atol=1e-6)


def _close(name: str, expected: torch.Tensor, actual: torch.Tensor, dtype: torch.dtype, *,
           atol_scale: float = 1.0) -> list[str]:
    """``atol_scale``: the number of terms summed into one output (rounding grows with it)."""
    if expected.shape != actual.shape:
        return [f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"]
    if expected.dtype != actual.dtype:
        return [f"{name}: dtype {actual.dtype}, expected {expected.dtype}"]
    if expected.numel() == 0:
        return []
    e, a = expected.double(), actual.double()
    tolerance = _tolerance(dtype)
    tolerance["atol"] *= atol_scale
    if torch.allclose(e, a, equal_nan=True, **tolerance):
        return []
    excess = ((e - a).abs() - tolerance["atol"] - tolerance["rtol"] * e.abs()).nan_to_num(float("inf"))
    worst = int(excess.flatten().argmax())
    return [f"{name}: {a.flatten()[worst].item():.6g} vs {e.flatten()[worst].item():.6g} at flat index {worst} "
            f"(tolerance {tolerance})"]


def _register(name: str, check: Callable[[Outputs, Outputs], list[str]], *, emulate: bool = True):
    def decorator(run):
        CASES.append(ParityCase(name, run, check, emulate))
        return run

    return decorator


# ---------------------------------------------------------------------------------------------- codebook_search

def _search_check(pixel_weight: float, l2_norm: bool, dtype: torch.dtype, exact_indices: bool):
    tie_tolerance = 1e-9 if dtype == torch.float64 else 1e-4

    def check(expected: Outputs, actual: Outputs) -> list[str]:
        problems = _close("min_distance", expected["min_distance"], actual["min_distance"], dtype)
        x, sem, pix = expected["x"], expected["semantic"], expected.get("pixel")
        ref_indices, _ = codebook_search_reference(x, sem, pix, pixel_weight=pixel_weight, l2_norm=l2_norm)
        for label, other in (("CPU op", expected["indices"]), ("reference", ref_indices)):
            if exact_indices:
                if not torch.equal(actual["indices"], other):
                    differ = (actual["indices"] != other).nonzero()[:4].flatten().tolist()
                    problems.append(f"indices differ from the {label} at rows {differ}")
                continue
            fraction, gap, ok = index_agreement(x, sem, pix, actual["indices"], other, pixel_weight=pixel_weight,
                                                l2_norm=l2_norm, tie_tolerance=tie_tolerance)
            if not ok:
                problems.append(f"indices vs the {label}: {fraction:.2%} equal, a distance gap of {gap:.3e} "
                                f"(> {tie_tolerance}) where they differ")
        return problems

    return check


def _search_case(name, N, K, Ds, Dp, *, dtype=torch.float32, pixel_weight=0.5, l2_norm=True, seed=0,
                 make=None, exact_indices=False, emulate=True, x_shape=None):
    check = _search_check(pixel_weight, l2_norm, dtype, exact_indices)

    @_register(f"codebook_search {name}", check, emulate=emulate)
    def run(device, ops):
        g = torch.Generator().manual_seed(seed)
        if make is None:
            x, sem, pix = _randn(g, N, Ds + Dp, dtype=dtype), _randn(g, K, Ds, dtype=dtype), \
                (_randn(g, K, Dp, dtype=dtype) if Dp else None)
        else:
            x, sem, pix = make(g)
        if x_shape is not None:
            x = x.reshape(x_shape)
        on = lambda t: None if t is None else t.to(device)  # noqa: E731
        indices, min_distance = ops.codebook_search(on(x), on(sem), on(pix), pixel_weight, l2_norm)
        out = {"x": x, "semantic": sem, "indices": _cpu(indices), "min_distance": _cpu(min_distance)}
        if pix is not None:
            out["pixel"] = pix
        return out


_search_case("N=1 K=1 D=3", 1, 1, 3, 0, l2_norm=False)
_search_case("N=130 K=300 D=32+8 (2 uneven K splits)", 130, 300, 32, 8)
_search_case("N=257 K=129 D=5+3 fp64 (one split)", 257, 129, 5, 3, dtype=torch.float64, l2_norm=False)
_search_case("N=70 K=1000 D=32+8 bf16 (4 K splits)", 70, 1000, 32, 8, dtype=torch.bfloat16)
_search_case("N=33 K=17 D=7 fp16", 33, 17, 7, 0, dtype=torch.float16)
_search_case("N=600 K=200 D=13+9 (depth remainder, one split)", 600, 200, 13, 9, pixel_weight=2.0)
_search_case("N=1 K=2000 D=32+8 (16 tiles over 4 splits)", 1, 2000, 32, 8)
_search_case("x (3, 7, 11, 40) K=150", 3 * 7 * 11, 150, 32, 8, x_shape=(3, 7, 11, 40), pixel_weight=0.0)
_search_case("N=40000 K=4096 D=32+8 (GPU: one split per row tile)", 40000, 4096, 32, 8, emulate=False)
_search_case("N=256 K=32768 D=32+8 (GPU: K split)", 256, 32768, 32, 8, emulate=False)


def _duplicated_codes(g):
    # K = 360: each code repeats every 40 rows, so equal minima sit in other tiles and other K splits.
    codes = torch.randn(40, 8, generator=g).repeat(9, 1)
    x = codes[torch.randint(0, 360, (50,), generator=g)].clone()
    return x, codes, None


def _nan_codes(g):
    x, codes, _ = _duplicated_codes(g)
    codes[200] = float("nan")
    codes[300] = float("nan")
    return x, codes, None


def _nan_rows(g):
    x, codes, _ = _duplicated_codes(g)
    x[3, 0] = float("nan")
    x[17] = float("nan")
    return x, codes, None


_search_case("ties across tiles and splits -> lowest index", 0, 0, 0, 0, l2_norm=False, pixel_weight=1.0,
             make=_duplicated_codes, exact_indices=True)
_search_case("NaN codes -> first NaN code", 0, 0, 0, 0, l2_norm=False, pixel_weight=1.0, make=_nan_codes,
             exact_indices=True)
_search_case("NaN rows -> index 0", 0, 0, 0, 0, l2_norm=False, pixel_weight=1.0, make=_nan_rows, exact_indices=True)
_search_case("empty x (0, 40)", 0, 9, 32, 8)


# ---------------------------------------------------------------------------------------------- codebook_gather

def _gather_inputs(g, index_shape, K, Ds, Dp, dtype, skew):
    sem = _randn(g, K, Ds, dtype=dtype)
    sem[0] = 0  # a zero row takes the eps clamp of F.normalize
    pix = _randn(g, K, Dp, dtype=dtype) if Dp else None
    n = 1
    for s in index_shape:
        n *= s
    if skew == "one code":
        indices = torch.full((n,), min(5, K - 1), dtype=torch.long)
    elif skew == "zipf":
        weights = 1.0 / torch.arange(1, K + 1, dtype=torch.float64) ** 1.1
        indices = torch.multinomial(weights, n, replacement=True, generator=g)
    else:
        indices = torch.randint(0, K, (n,), generator=g)
    return indices.reshape(index_shape), sem, pix


def _gather_case(name, index_shape, K, Ds, Dp, *, dtype=torch.float32, l2_norm=True, skew="uniform", seed=1,
                 emulate=True):
    width = Ds + Dp

    def check(expected: Outputs, actual: Outputs) -> list[str]:
        # rows summed into one code's gradient: rounding grows with it
        per_code = float(torch.bincount(expected["indices"].flatten()).max()) if expected["indices"].numel() else 1.0
        problems = _close("rows", expected["rows"], actual["rows"], dtype)
        ref = codebook_gather_reference(expected["indices"], expected["semantic"].double(),
                                        None if Dp == 0 else expected["pixel"].double(), l2_norm=l2_norm)
        problems += _close("rows vs reference", ref.to(dtype), actual["rows"], dtype)
        # The reference gradient: autograd through F.normalize and indexing, in float64.
        sem = expected["semantic"].double().requires_grad_()
        pix = None if Dp == 0 else expected["pixel"].double().requires_grad_()
        rows = codebook_gather_reference(expected["indices"], sem, pix, l2_norm=l2_norm)
        inputs = [sem] + ([pix] if pix is not None else [])
        ref_grads = torch.autograd.grad(rows, inputs, expected["grad_rows"].double(), allow_unused=True)
        for mode in ("deterministic", "atomic"):
            for part, ref_grad in zip(("semantic", "pixel"), ref_grads):
                got = actual[f"grad_{part}_{mode}"]
                problems += _close(f"grad_{part} ({mode}) vs CPU op", expected[f"grad_{part}_{mode}"], got, dtype,
                                   atol_scale=per_code)
                problems += _close(f"grad_{part} ({mode}) vs reference", ref_grad.to(dtype), got, dtype,
                                   atol_scale=per_code)
        for part in ("semantic", "pixel"):
            if not torch.equal(actual[f"grad_{part}_deterministic"], actual[f"grad_{part}_deterministic_again"]):
                problems.append(f"deterministic grad_{part} differs between two runs")
        return problems

    @_register(f"codebook_gather {name}", check, emulate=emulate)
    def run(device, ops):
        g = torch.Generator().manual_seed(seed)
        indices, sem, pix = _gather_inputs(g, index_shape, K, Ds, Dp, dtype, skew)
        grad_rows = _randn(g, *index_shape, width, dtype=dtype)
        on = lambda t: None if t is None else t.to(device)  # noqa: E731
        out = {"indices": indices, "semantic": sem, "grad_rows": grad_rows,
               "rows": _cpu(ops.codebook_gather(on(indices), on(sem), on(pix), l2_norm, False))}
        if pix is not None:
            out["pixel"] = pix
        for mode, deterministic in (("deterministic", True), ("atomic", False), ("deterministic_again", True)):
            gs, gp = ops.codebook_gather_backward(on(grad_rows), on(indices), on(sem), on(pix), l2_norm,
                                                  deterministic)
            out[f"grad_semantic_{mode}"], out[f"grad_pixel_{mode}"] = _cpu(gs), _cpu(gp)
        return out


_gather_case("N=37 K=11 D=32+8", (37,), 11, 32, 8)
_gather_case("N=5 K=3 D=40 fp64 no l2", (5,), 3, 40, 0, dtype=torch.float64, l2_norm=False)
_gather_case("idx (4, 5, 6) K=7 D=33+9 bf16", (4, 5, 6), 7, 33, 9, dtype=torch.bfloat16)
_gather_case("N=64 K=300 D=32+8 fp16", (64,), 300, 32, 8, dtype=torch.float16)
_gather_case("N=1100 on one code (heavy-code split)", (1100,), 50, 32, 8, skew="one code")
_gather_case("N=1100 zipf fp64 (heavy-code split)", (1100,), 60, 32, 8, dtype=torch.float64, skew="zipf")
_gather_case("empty indices (0,)", (0,), 9, 32, 8)
_gather_case("N=300000 on one code (GPU)", (300000,), 32768, 32, 8, emulate=False, skew="one code")


# ---------------------------------------------------------------------------------------------- flow_step

def _flow_inputs(g, shape, dtype, count):
    return [_randn(g, *shape, dtype=dtype) for _ in range(count)]


def _flow_case(name, shape, *, dtype=torch.float32, seed=2, emulate=True):
    B = shape[0]
    sigma_min = 1e-4

    def check(expected: Outputs, actual: Outputs) -> list[str]:
        problems = []
        for key in expected:
            if key.startswith("in_"):
                continue
            problems += _close(key, expected[key], actual[key], dtype)
        if B == 0:
            return problems
        x0, x1, v, t = (expected[k].double() for k in ("in_x0", "in_x1", "in_v", "in_t"))
        x_t, v_target = interpolate_reference(x0, x1, t, sigma_min)
        problems += _close("x_t vs reference", x_t.to(dtype), actual["x_t"], dtype)
        problems += _close("v_target vs reference", v_target.to(dtype), actual["v_target"], dtype)
        if not torch.equal(actual["x_t_no_target"], actual["x_t"]) or actual["v_target_skipped"].numel() != 0:
            problems.append("with_target=False: x_t differs from the with-target call, or v_target is not empty")
        loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # the losses' accumulate dtype
        loss = matching_loss_reference(v, x0, x1, sigma_min, reduction="none")
        problems += _close("loss vs reference", loss.to(loss_dtype), actual["loss"], loss_dtype)
        problems += _close("velocity loss vs reference", velocity_loss_reference(v, x1, "none").to(loss_dtype),
                           actual["velocity_loss"], loss_dtype)
        vs = expected["in_v_stacked"].double()
        problems += _close("euler stacked vs reference",
                           euler_step_reference(x0, vs, dt=0.05, guidance_scale=2.0).to(dtype),
                           actual["euler_stacked"], dtype)
        return problems

    @_register(f"flow_step {name}", check, emulate=emulate)
    def run(device, ops):
        g = torch.Generator().manual_seed(seed)
        x0, x1, v, v2 = (t.to(device) for t in _flow_inputs(g, shape, dtype, 4))
        t = torch.rand(B, generator=g).to(device)
        v_stacked = _randn(g, 2 * B, *shape[1:], dtype=dtype).to(device)
        grad_loss = torch.rand(B, generator=g).to(device)
        out = {"in_x0": x0, "in_x1": x1, "in_v": v, "in_t": t, "in_v_stacked": v_stacked}
        out["x_t"], out["v_target"] = ops.flow_interpolate(x0, x1, t, sigma_min)
        # with_target=False: x_t alone, v_target comes back empty
        out["x_t_no_target"], out["v_target_skipped"] = ops.flow_interpolate(x0, x1, t, sigma_min, False)
        # t in another float dtype than x is converted by the op
        out["x_t_t64"], _ = ops.flow_interpolate(x0, x1, t.double(), sigma_min)
        for tag, (gx, gv, n0, n1) in {"both": (x1, v, True, True), "xt_only": (x1, None, True, False),
                                      "v_only": (None, v, False, True)}.items():
            out[f"interp_grad_x0_{tag}"], out[f"interp_grad_x1_{tag}"] = ops.flow_interpolate_backward(
                gx, gv, t, sigma_min, n0, n1)
        out["loss"] = ops.flow_matching_loss(v, x0, x1, sigma_min)
        (out["loss_grad_v"], out["loss_grad_x0"], out["loss_grad_x1"]) = ops.flow_matching_loss_backward(
            grad_loss, v, x0, x1, sigma_min, True, True)
        out["loss_grad_v_alone"], _, _ = ops.flow_matching_loss_backward(grad_loss, v, x0, x1, sigma_min, False,
                                                                         False)
        # no x0 (flow.velocity_loss): x1 is the target velocity itself
        out["velocity_loss"] = ops.flow_matching_loss(v, None, x1, 0.0)
        out["velocity_loss_grad_v"], _, out["velocity_loss_grad_target"] = ops.flow_matching_loss_backward(
            grad_loss, v, None, x1, 0.0, False, True)
        if B > 0:  # with B = 0 the stacked (2B, ...) shape is x's own shape: no stacked call to make
            out["euler_stacked"] = ops.flow_euler_step(x0, v_stacked, None, 0.05, 2.0)
        out["euler_split"] = ops.flow_euler_step(x0, v, v2, -0.1, 1.5)
        out["euler_plain"] = ops.flow_euler_step(x0, v, None, 0.2, 1.0)
        out["euler_v_is_x"] = ops.flow_euler_step(x0, x0, None, 0.2, 1.0)
        # In place: contiguous, non-contiguous (a transposed copy), and x aliasing v_cond / v_uncond exactly.
        inplace = x0.clone()
        ops.flow_euler_step_(inplace, v, v2, 0.05, 1.5)
        out["euler_inplace"] = inplace
        strided = x0.clone().transpose(0, -1).contiguous().transpose(0, -1)
        ops.flow_euler_step_(strided, v, v2, 0.05, 1.5)
        out["euler_inplace_strided"] = strided
        alias = x0.clone()
        ops.flow_euler_step_(alias, alias, None, 0.3, 1.0)
        out["euler_inplace_x_is_v"] = alias
        alias_u = x0.clone()
        ops.flow_euler_step_(alias_u, v, alias_u, 0.3, 2.0)
        out["euler_inplace_x_is_v_uncond"] = alias_u
        if B > 0:
            stacked_in_place = x0.clone()
            ops.flow_euler_step_(stacked_in_place, v_stacked, None, 0.05, 4.0)
            out["euler_inplace_stacked"] = stacked_in_place
        return {k: _cpu(value) for k, value in out.items()}


_flow_case("(3, 5, 7) fp32", (3, 5, 7))
_flow_case("(2, 20000) fp64 (5 loss chunks)", (2, 20000), dtype=torch.float64)
_flow_case("(4, 3, 8, 8) bf16", (4, 3, 8, 8), dtype=torch.bfloat16)
_flow_case("(5, 77, 16) fp16", (5, 77, 16), dtype=torch.float16)
_flow_case("(0, 77, 16) empty", (0, 77, 16))
_flow_case("(9, 4) fp32 (small samples: a thread per sample)", (9, 4))
_flow_case("(256, 77, 16) fp32 (GPU)", (256, 77, 16), emulate=False)


def _many_samples_check(expected: Outputs, actual: Outputs) -> list[str]:
    problems = _close("loss", expected["loss"], actual["loss"], torch.float32)
    return problems + _close("loss_grad_v", expected["loss_grad_v"], actual["loss_grad_v"], torch.float32)


def _many_samples_case(M: int, emulate: bool):
    @_register(f"flow_matching_loss B=70000 M={M} (more samples than gridDim.y allows)", _many_samples_check,
               emulate=emulate)
    def run(device, ops):
        g = torch.Generator().manual_seed(3)
        v, x0, x1 = (_randn(g, 70000, M).to(device) for _ in range(3))
        grad_loss = torch.rand(70000, generator=g).to(device)
        return {"loss": _cpu(ops.flow_matching_loss(v, x0, x1, 0.0)),
                "loss_grad_v": _cpu(ops.flow_matching_loss_backward(grad_loss, v, x0, x1, 0.0, False, False)[0])}


_many_samples_case(3, emulate=True)
_many_samples_case(100, emulate=False)


# ---------------------------------------------------------------------------------------------- sample_logits

def _sample_check(guidance: float, top_k: int, top_p: float, start: int, K: int):
    """Codes equal to the CPU op's (one Philox stream on both backends) and inside the official kept set."""
    from ..reference import sample_logits_filter_reference  # noqa: PLC0415  (imports the t2i model package)

    def check(expected: Outputs, actual: Outputs) -> list[str]:
        problems = []
        for key in ("codes", "codes_other_seed"):
            e, a = expected[key], actual[key]
            if e.shape != a.shape or e.dtype != a.dtype:
                problems.append(f"{key}: {tuple(a.shape)} {a.dtype}, expected {tuple(e.shape)} {e.dtype}")
                continue
            if not torch.equal(e, a):
                differ = (e != a).nonzero()[:4].tolist()
                problems.append(f"{key} differ from the CPU op at {differ}")
        codes = actual["codes"]
        if codes.numel():
            kept, _ = sample_logits_filter_reference(expected["logits"], guidance=guidance, top_k=top_k, top_p=top_p,
                                                     image_token_start=start, image_vocab_size=K)
            # A tie group straddling the top-p crossing stays whole (the official sort splits it arbitrarily):
            # ids tied with the smallest kept value (equal top-k-only probabilities) count as kept.
            _, by_k = sample_logits_filter_reference(expected["logits"], guidance=guidance, top_k=top_k, top_p=0.0,
                                                     image_token_start=start, image_vocab_size=K)
            crossing = torch.where(kept, by_k, float("inf")).amin(dim=-1, keepdim=True)
            kept = kept | ((by_k == crossing) & (by_k > 0))
            finite = kept.any(-1)
            if not torch.equal(codes < 0, ~finite):
                problems.append("codes are -1 exactly where a row has no finite guided logit: not so")
            drawn_ok = kept.gather(-1, codes.clamp(min=0).unsqueeze(-1)).squeeze(-1) | ~finite
            if not drawn_ok.all():
                problems.append(f"{int((~drawn_ok).sum())} codes outside the official kept set")
        return problems

    return check


# Emulated rows are few: every top-p bisection step is a block barrier, and the emulator runs one OS thread per
# CUDA thread.
def _sample_case(name, shape, V, *, start=0, K=None, guidance=2.0, top_k=0, top_p=0.0, dtype=torch.float32,
                 make=None, seed=5, emulate=True):
    K = V - start if K is None else K

    @_register(f"sample_logits {name}", _sample_check(guidance, top_k, top_p, start, K), emulate=emulate)
    def run(device, ops):
        g = torch.Generator().manual_seed(seed)
        logits = _randn(g, *shape, V, dtype=dtype) if make is None else make(g)
        on = logits.to(device)
        return {"logits": logits,
                "codes": _cpu(ops.sample_logits(on, guidance, top_k, top_p, start, K, 1234)),
                "codes_other_seed": _cpu(ops.sample_logits(on, guidance, top_k, top_p, start, K, -98765))}


def _sample_special_rows(g):
    logits = torch.randn(2 * 6, 1, 300, generator=g)
    logits[0] = float("-inf")              # nothing to draw: -1
    logits[1] = float("nan")               # NaN is -inf: -1
    logits[2, 0, 7] = float("inf")         # +inf takes all the mass
    logits[2, 0, 250] = float("inf")
    logits[3, 0, ::2] = float("-inf")
    logits[4, 0, 100:] = 3.0               # ties across the top-k boundary and the top-p crossing
    logits[5] = 0.0                        # all tied
    logits[6:] = 0.0
    return logits


_sample_case("(2x3, 1, 40) no filter", (6, 1), 40, guidance=0.0)
_sample_case("(2x2, 3, 300) top-k 25 top-p 0.8 (ids 10..290)", (4, 3), 300, start=10, K=280, top_k=25, top_p=0.8)
_sample_case("(2x1, 4, 700) top-k 600 top-p 0.6 (loop1)", (2, 4), 700, top_k=600, top_p=0.6, guidance=1.5)
_sample_case("(2x5, 3, 257) greedy top-k 1", (10, 3), 257, top_k=1)
_sample_case("(2x2, 2, 200) top-p 0.9 only, bf16", (4, 2), 200, top_p=0.9, dtype=torch.bfloat16)
_sample_case("(2x2, 3, 90) top-k 30 fp16", (4, 3), 90, top_k=30, top_p=0.5, dtype=torch.float16)
_sample_case("(2x2, 3, 513) top-k 100 top-p 0.8 fp64", (4, 3), 513, top_k=100, top_p=0.8, dtype=torch.float64)
_sample_case("NaN / inf / tied rows", (0,), 300, top_k=40, top_p=0.7, make=_sample_special_rows)
_sample_case("empty (0, 4, 50)", (0, 4), 50, top_k=5)
_sample_case("(2x4, 256, 32768 + 32001) loop3 pass 1 (GPU)", (8, 256), 64769, start=32001, K=32768, top_k=1200,
             top_p=0.8, guidance=7.5, emulate=False)
