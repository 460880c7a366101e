"""sample_logits (issue 13, part 4): the fused CFG + image-vocab mask + top-k + top-p + Gumbel-max draw.

Statistics: a row repeated N times in one call gives N independent draws (the Philox stream depends on the
row), so one call checks (a) the set of drawn codes against the kept set of the official filter, exactly, and
(b) a chi-square of the counts against the filtered softmax. Then reproducibility, ties, NaN / inf rows,
dtypes, shapes, bad input, opcheck, torch.compile and the TokenFlowT2I hook.
"""

import math

import pytest
import torch

import tokenflow_ext
from tokenflow_ext.models.tokenflow.generation import top_k_top_p_filter
from tokenflow_ext.ops.sample_logits import random_seed, sample_scale_fused
from tokenflow_ext.reference import sample_logits_filter_reference

from helpers import DEVICES

ops = torch.ops.tokenflow_ext


def stacked(cond: torch.Tensor, uncond: torch.Tensor, copies: int) -> torch.Tensor:
    """(2 * copies, L, V): `copies` repeats of the (L, V) conditional rows, then as many unconditional ones."""
    return torch.cat([cond.expand(copies, *cond.shape), uncond.expand(copies, *uncond.shape)]).contiguous()


def chi_square_z(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Wilson-Hilferty normal score of the chi-square statistic; ~N(0, 1) under the null. Cells expecting
    fewer than 5 draws are pooled into one (the chi-square approximation needs populated cells)."""
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = counts.numel() - 1
    if df == 0:
        return 0.0
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


CONFIGS = [  # (V, start, K, guidance, top_k, top_p)
    (64, 0, 64, 0.0, 0, 0.0),
    (64, 0, 64, 2.0, 20, 0.0),
    (70, 5, 60, 3.0, 0, 0.7),
    (70, 5, 60, 1.5, 25, 0.9),
    (48, 8, 33, 7.5, 1200, 0.8),  # top-k larger than the vocabulary: off
    (40, 3, 30, 0.5, 12, 0.6),
]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_kept_set_and_distribution_match_the_official_filter(config):
    V, start, K, guidance, top_k, top_p = config
    g = torch.Generator().manual_seed(hash(config) % 1000)
    rows, copies = 3, 20000
    scale = 0.7 / math.hypot(1 + guidance, guidance)  # guided logits ~ N(0, 0.7^2): many ids kept
    cond, uncond = scale * torch.randn(rows, V, generator=g), scale * torch.randn(rows, V, generator=g)
    logits = stacked(cond, uncond, copies)
    codes = tokenflow_ext.sample_logits(logits, guidance=guidance, top_k=top_k, top_p=top_p,
                                        image_token_start=start, image_vocab_size=K, seed=7)
    assert codes.shape == (copies, rows) and codes.dtype == torch.long
    kept, probs = sample_logits_filter_reference(torch.stack([cond, uncond]), guidance=guidance, top_k=top_k,
                                                 top_p=top_p, image_token_start=start, image_vocab_size=K)
    for r in range(rows):
        counts = torch.bincount(codes[:, r], minlength=K).double()
        expected = copies * probs[0, r].double()
        drawn = counts > 0
        assert not (drawn & ~kept[0, r]).any(), f"row {r}: drew ids the official filter drops"
        # every kept id likely enough to show up (P(missed) < e^-25) was drawn
        likely = kept[0, r] & (expected > 25)
        assert drawn[likely].all(), f"row {r}: kept ids never drawn"
        if bool((expected[kept[0, r]] > 25).all()):  # the usual case here: the drawn set IS the kept set
            assert torch.equal(drawn, kept[0, r]), f"row {r}: kept set differs from the official filter"
        z = chi_square_z(counts[kept[0, r]], expected[kept[0, r]])
        assert z < 4.5, f"row {r}: chi-square z = {z:.2f}"


def test_greedy_top_k_1_is_the_argmax():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2 * 50, 7, 300, generator=g)
    codes = tokenflow_ext.sample_logits(logits, guidance=1.25, top_k=1, seed=0)
    guided = 2.25 * logits[:50] - 1.25 * logits[50:]
    assert torch.equal(codes, guided.argmax(-1))


def test_matches_the_multinomial_path_in_distribution():
    # The draw of sample_scale (torch.multinomial) and of the fused op: both histograms fit the same filter.
    g = torch.Generator().manual_seed(11)
    cond, uncond = torch.randn(1, 50, generator=g), torch.randn(1, 50, generator=g)
    logits = stacked(cond, uncond, 20000)
    fused = tokenflow_ext.sample_logits(logits, guidance=2.0, top_k=15, top_p=0.8, seed=3)[:, 0]
    from tokenflow_ext.models.tokenflow.t2i import sample_scale
    python = sample_scale(logits, guidance=2.0, top_k=15, top_p=0.8, image_token_start=0, image_vocab_size=50,
                          generator=torch.Generator().manual_seed(0))[:, 0]
    a, b = torch.bincount(fused, minlength=50).double(), torch.bincount(python, minlength=50).double()
    assert torch.equal(a > 0, b > 0)
    used = a + b > 0
    # two-sample chi-square on the kept cells
    total = a[used] + b[used]
    stat = float(((a[used] - b[used]) ** 2 / total).sum())
    df = int(used.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    assert z < 4.5


def test_reproducible_per_seed_and_thread_count():
    logits = torch.randn(2 * 16, 9, 500, generator=torch.Generator().manual_seed(0))
    kwargs = dict(guidance=3.0, top_k=100, top_p=0.8, image_token_start=20, image_vocab_size=400)
    first = tokenflow_ext.sample_logits(logits, seed=123, **kwargs)
    assert torch.equal(first, tokenflow_ext.sample_logits(logits, seed=123, **kwargs))
    assert not torch.equal(first, tokenflow_ext.sample_logits(logits, seed=124, **kwargs))
    torch.set_num_threads(2)
    assert torch.equal(first, tokenflow_ext.sample_logits(logits, seed=123, **kwargs))
    # seeds >= 2^63 are taken modulo 2^64 (the schema's int is signed)
    assert torch.equal(tokenflow_ext.sample_logits(logits, seed=2 ** 64 - 1, **kwargs),
                       tokenflow_ext.sample_logits(logits, seed=-1, **kwargs))
    # a generator makes the seed, so a seeded generator reproduces the draws
    a = tokenflow_ext.sample_logits(logits, generator=torch.Generator().manual_seed(5), **kwargs)
    b = tokenflow_ext.sample_logits(logits, generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(a, b) and 0 <= random_seed(torch.Generator().manual_seed(5)) < 2 ** 63


def test_ties_are_kept_together_and_drawn_uniformly():
    # top-k boundary inside a tie group of three: all three stay (as the official filter), each ~1/3
    row = torch.full((20,), -5.0)
    row[[2, 9, 15]] = 4.0
    row[4] = 6.0
    logits = stacked(row[None], torch.zeros(1, 20), 30000)
    codes = tokenflow_ext.sample_logits(logits, top_k=2, seed=1)[:, 0]
    kept = top_k_top_p_filter(row, top_k=2) > float("-inf")
    assert torch.equal(torch.bincount(codes, minlength=20) > 0, kept)
    counts = torch.bincount(codes, minlength=20)[[2, 4, 9, 15]].double()
    probs = torch.softmax(row[[2, 4, 9, 15]].double(), 0)
    assert chi_square_z(counts, 30000 * probs) < 4.5
    # greedy on an exact tie: uniform among the tied maxima
    flat = stacked(torch.zeros(1, 8), torch.zeros(1, 8), 16000)
    codes = tokenflow_ext.sample_logits(flat, top_k=1, seed=2)[:, 0]
    assert chi_square_z(torch.bincount(codes, minlength=8).double(), torch.full((8,), 2000.0)) < 4.5
    # a top-p crossing inside a tie group keeps the whole group
    row = torch.tensor([3.0, 1.0, 1.0, 1.0, -2.0, -4.0])
    codes = tokenflow_ext.sample_logits(stacked(row[None], torch.zeros(1, 6), 8000), top_p=0.9, seed=3)[:, 0]
    assert set(codes.unique().tolist()) == {0, 1, 2, 3}


def test_nan_and_infinite_rows():
    V = 12
    cond = torch.randn(6, V, generator=torch.Generator().manual_seed(4))
    uncond = torch.zeros(6, V)
    cond[0] = float("-inf")                     # nothing to draw: -1
    cond[1] = float("nan")                      # NaN counts as -inf: -1
    cond[2, :] = float("nan")
    cond[2, 5] = 0.3                            # the one finite id is certain
    cond[3, [1, 7]] = float("inf")              # +inf takes all the mass, shared by the +inf ids
    cond[4, 3] = float("inf")
    uncond[4, 3] = float("inf")                 # inf - inf under guidance is NaN: dropped
    cond[5, :6] = float("-inf")                 # partly -inf: never drawn
    logits = stacked(cond, uncond, 4000)
    codes = tokenflow_ext.sample_logits(logits, guidance=1.0, top_k=4, top_p=0.9, seed=9)
    assert (codes[:, 0] == -1).all() and (codes[:, 1] == -1).all() and (codes[:, 2] == 5).all()
    assert set(codes[:, 3].unique().tolist()) == {1, 7}
    assert abs(float((codes[:, 3] == 1).double().mean()) - 0.5) < 0.05
    assert (codes[:, 4] != 3).all() and (codes[:, 4] >= 0).all()
    assert (codes[:, 5] >= 6).all()
    with pytest.raises(ValueError, match="no finite value"):
        sample_scale_fused(logits, guidance=1.0, top_k=4, top_p=0.9, image_token_start=0, image_vocab_size=V)


def test_ids_outside_the_image_vocabulary_are_never_drawn():
    logits = torch.randn(2 * 200, 3, 30, generator=torch.Generator().manual_seed(5))
    logits[..., :10] += 100.0  # text ids with huge logits
    logits[..., 25:] += 100.0  # ids after the image vocabulary ([PAD], the official sampler's quirk)
    codes = tokenflow_ext.sample_logits(logits, guidance=0.5, top_k=5, top_p=0.5, image_token_start=10,
                                        image_vocab_size=15, seed=0)
    assert codes.min() >= 0 and codes.max() < 15


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_draw_inside_the_reference_kept_set(dtype):
    g = torch.Generator().manual_seed(6)
    cond, uncond = torch.randn(4, 80, generator=g).to(dtype), torch.randn(4, 80, generator=g).to(dtype)
    logits = stacked(cond, uncond, 2000)
    codes = tokenflow_ext.sample_logits(logits, guidance=2.0, top_k=30, top_p=0.85, image_token_start=4,
                                        image_vocab_size=70, seed=1)
    kept, _ = sample_logits_filter_reference(torch.stack([cond, uncond]), guidance=2.0, top_k=30, top_p=0.85,
                                             image_token_start=4, image_vocab_size=70)
    for r in range(4):
        drawn = torch.bincount(codes[:, r], minlength=70) > 0
        assert not (drawn & ~kept[0, r]).any()


def test_shapes_non_contiguous_and_empty():
    base = torch.randn(40, 6, 2 * 4, generator=torch.Generator().manual_seed(7))
    logits = base.transpose(0, 2)  # (8, 6, 40) non-contiguous
    codes = tokenflow_ext.sample_logits(logits, top_k=5, seed=4)
    assert torch.equal(codes, tokenflow_ext.sample_logits(logits.contiguous(), top_k=5, seed=4))
    assert tokenflow_ext.sample_logits(torch.randn(6, 11), seed=0).shape == (3,)
    assert tokenflow_ext.sample_logits(torch.randn(4, 2, 3, 11), seed=0).shape == (2, 2, 3)
    assert tokenflow_ext.sample_logits(torch.randn(0, 5, 11), seed=0).shape == (0, 5)
    assert tokenflow_ext.sample_logits(torch.randn(4, 0, 11), seed=0).shape == (2, 0)


def test_bad_input():
    x = torch.randn(4, 3, 10)
    with pytest.raises(RuntimeError, match="must be even"):
        ops.sample_logits(torch.randn(3, 3, 10), 1.0, 0, 0.0, 0, 10, 0)
    with pytest.raises(RuntimeError, match=r"\(2B, \.\.\., V\)"):
        ops.sample_logits(torch.randn(10), 1.0, 0, 0.0, 0, 10, 0)
    with pytest.raises(RuntimeError, match="image ids"):
        ops.sample_logits(x, 1.0, 0, 0.0, 4, 7, 0)
    with pytest.raises(RuntimeError, match="image ids"):
        ops.sample_logits(x, 1.0, 0, 0.0, 0, 0, 0)
    with pytest.raises(RuntimeError, match="float32, float16"):
        ops.sample_logits(x.long(), 1.0, 0, 0.0, 0, 10, 0)
    with pytest.raises(RuntimeError, match="top_p is NaN"):
        ops.sample_logits(x, 1.0, 0, float("nan"), 0, 10, 0)
    with pytest.raises(RuntimeError, match="guidance must be finite"):
        ops.sample_logits(x, float("inf"), 0, 0.5, 0, 10, 0)
    with pytest.raises(ValueError, match="64 bits"):
        tokenflow_ext.sample_logits(x, seed=2 ** 64)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    logits = torch.randn(6, 5, 40, device=device)
    torch.library.opcheck(ops.sample_logits.default, (logits, 2.0, 7, 0.8, 3, 30, 11))
    torch.library.opcheck(ops.sample_logits.default, (logits.double(), 0.0, 0, 0.0, 0, 40, -5))

    def draw(x):
        return ops.sample_logits(x, 2.0, 7, 0.8, 3, 30, 11) + 1

    compiled = torch.compile(draw, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(logits), draw(logits))


@pytest.mark.cuda
def test_cuda_draws_the_cpu_codes():
    logits = torch.randn(2 * 8, 37, 3000, generator=torch.Generator().manual_seed(8))
    for top_k, top_p in ((600, 0.6), (1200, 0.8), (100, 0.8), (1, 0.0), (0, 0.9), (0, 0.0)):
        cpu = ops.sample_logits(logits, 3.0, top_k, top_p, 5, 2990, 77)
        gpu = ops.sample_logits(logits.cuda(), 3.0, top_k, top_p, 5, 2990, 77).cpu()
        assert (cpu == gpu).double().mean() > 0.999, (top_k, top_p)


def test_t2i_generate_with_the_fused_sampler():
    from tokenflow_ext.models.tokenflow.t2i import resolve_sampler, sample_scale
    from test_t2i import PREFIX, K, tiny_model
    model = tiny_model(torch.float32)
    kwargs = dict(negative_prompt=PREFIX[2:], refinement="loop3", cfg=4.0, top_k=8)
    out = model.generate(PREFIX[:2], sampler="fused", seed=1, **kwargs)
    assert out.codes.shape == (2, 14) and out.codes.min() >= 0 and out.codes.max() < K
    assert torch.equal(out.codes, model.generate(PREFIX[:2], sampler="fused", seed=1, **kwargs).codes)
    # greedy: the fused path (head over the image rows only) and the official ops pick the same codes
    greedy = dict(negative_prompt=PREFIX[2:], refinement="loop2", cfg=3.0, top_k=1)
    assert torch.equal(tiny_model().generate(PREFIX[:2], sampler="fused", seed=0, **greedy).codes,
                       tiny_model().generate(PREFIX[:2], seed=5, **greedy).codes)
    assert resolve_sampler(None) is sample_scale and resolve_sampler("python") is sample_scale
    assert resolve_sampler("fused") is sample_scale_fused
    with pytest.raises(ValueError, match="sampler"):
        resolve_sampler("cub")
