import pytest
import torch
from helpers import DEVICES, FLOAT_DTYPES, make_near_tie_problem, make_problem, tie_tolerance

import tokenflow_ext
from tokenflow_ext.reference import codebook_distances, codebook_search_reference, index_agreement


def assert_search_matches_reference(x, semantic, pixel, *, pixel_weight=1.0, l2_norm=True, min_exact=0.99):
    indices, distance = tokenflow_ext.codebook_search(x, semantic, pixel, pixel_weight=pixel_weight, l2_norm=l2_norm)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    ref_indices, _ = codebook_search_reference(cpu(x), cpu(semantic), cpu(pixel), pixel_weight=pixel_weight,
                                               l2_norm=l2_norm)
    assert indices.dtype == torch.int64 and indices.shape == x.shape[:-1] and indices.device == x.device
    expected_distance_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert distance.dtype == expected_distance_dtype and distance.shape == x.shape[:-1]
    exact, gap, ok = index_agreement(cpu(x), cpu(semantic), cpu(pixel), indices.cpu(), ref_indices,
                                     pixel_weight=pixel_weight, l2_norm=l2_norm, tie_tolerance=tie_tolerance(x.dtype))
    assert ok, f"disagreement beyond a near-tie: distance gap {gap}"
    assert exact >= min_exact, f"only {exact:.4f} of the indices agree"
    # min_distance is d(n, idx(n)) computed directly: compare with float64 arithmetic on the same inputs
    exact_distance = codebook_distances(cpu(x), cpu(semantic), cpu(pixel), indices.cpu(), pixel_weight=pixel_weight,
                                        l2_norm=l2_norm)
    torch.testing.assert_close(distance.cpu().double(), exact_distance, atol=1e-5 if x.dtype != torch.float64 else 1e-12,
                               rtol=1e-5 if x.dtype != torch.float64 else 1e-12)
    return indices, distance


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("l2_norm", [True, False])
def test_random_data_all_dtypes(device, dtype, l2_norm):
    x, semantic, pixel = make_problem(777, 1500, dtype=dtype, device=device)
    assert_search_matches_reference(x, semantic, pixel, l2_norm=l2_norm)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pixel_weight", [0.0, 0.5, 1.0, 2.5])
def test_pixel_weights(device, pixel_weight):
    x, semantic, pixel = make_problem(500, 1100, device=device, seed=1)
    assert_search_matches_reference(x, semantic, pixel, pixel_weight=pixel_weight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("l2_norm", [True, False])
def test_clustered_near_ties(device, dtype, l2_norm):
    x, semantic, pixel, pick = make_near_tie_problem(1000, 2048, dtype=dtype, device=device)
    # The two codes of a pair are 1e-6 apart: the fp32 expanded formula of the reference picks either at random,
    # so only near-tie agreement is required of it.
    indices, _ = assert_search_matches_reference(x, semantic, pixel, l2_norm=l2_norm, min_exact=0.0)
    # the planted pair is found, whichever of its two near-identical codes wins
    assert torch.equal(indices % 1024, pick % 1024)
    if device == "cpu":  # the CPU re-ranks GEMM near-ties by exact distance: it mostly finds the fp64 winner
        truth = codebook_distances(x, semantic, pixel, l2_norm=l2_norm).argmin(dim=1)
        assert (indices == truth).double().mean() >= 0.95


def test_pixel_weight_zero_ignores_pixel_part():
    x, semantic, pixel = make_problem(300, 400, seed=3)
    indices, _ = tokenflow_ext.codebook_search(x, semantic, pixel, pixel_weight=0.0)
    semantic_only, _ = tokenflow_ext.codebook_search(x[:, :32], semantic)
    assert torch.equal(indices, semantic_only)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (257, 513), (1000, 1025), (3, 4097), (513, 1)])
def test_odd_sizes(device, n, k):
    x, semantic, pixel = make_problem(n, k, device=device, seed=n + k)
    indices, _ = assert_search_matches_reference(x, semantic, pixel)
    if k == 1:
        assert (indices == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("semantic_dim,pixel_dim", [(1, 0), (1, 1), (8, 0), (32, 0), (3, 5), (64, 16)])
def test_widths(device, semantic_dim, pixel_dim):
    x, semantic, pixel = make_problem(300, 700, semantic_dim, pixel_dim, device=device, seed=semantic_dim)
    for l2_norm in (True, False):
        assert_search_matches_reference(x, semantic, pixel, l2_norm=l2_norm)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows(device):
    _, semantic, pixel = make_problem(1, 50, device=device)
    for shape in [(0, 40), (2, 0, 40)]:
        x = torch.empty(shape, device=device)
        indices, distance = tokenflow_ext.codebook_search(x, semantic, pixel)
        assert indices.shape == shape[:-1] and distance.shape == shape[:-1]
        assert indices.dtype == torch.int64


@pytest.mark.parametrize("device", DEVICES)
def test_batched_shape_and_row_major_order(device):
    x, semantic, pixel = make_problem(2 * 5 * 6, 300, device=device)
    flat_indices, _ = tokenflow_ext.codebook_search(x, semantic, pixel)
    batched, distance = tokenflow_ext.codebook_search(x.reshape(2, 5, 6, 40), semantic, pixel)
    assert batched.shape == (2, 5, 6) and distance.shape == (2, 5, 6)
    assert torch.equal(batched.reshape(-1), flat_indices)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x, semantic, pixel = make_problem(400, 600, device=device, seed=5)
    x_nc = x.t().contiguous().t()  # column-major storage
    semantic_nc = torch.stack([semantic, -semantic], dim=2)[..., 0]  # row stride 64, column stride 2
    pixel_nc = pixel.t().contiguous().t()
    assert not x_nc.is_contiguous() and not semantic_nc.is_contiguous() and not pixel_nc.is_contiguous()
    expected = tokenflow_ext.codebook_search(x, semantic, pixel)
    got = tokenflow_ext.codebook_search(x_nc, semantic_nc, pixel_nc)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    # a strided channel-last view of an NCHW tensor, the quantizer's layout
    nchw = x.reshape(4, 10, 10, 40).permute(0, 3, 1, 2).contiguous()
    got_view = tokenflow_ext.codebook_search(nchw.permute(0, 2, 3, 1), semantic, pixel)
    assert torch.equal(got_view[0].reshape(-1), expected[0])


@pytest.mark.parametrize("device", DEVICES)
def test_ties_do_not_depend_on_the_batch(device):
    """Issue 12 (4): bitwise-identical codes gave a higher index in a batch (BLAS rounding differs by column
    position) than for the row alone. The CPU re-ranks near-ties by exact distance, then by index; CUDA
    computes every (row, code) score with one fixed FMA sequence."""
    g = torch.Generator().manual_seed(1)
    sem = torch.randn(7, 7, generator=g, dtype=torch.float64)
    sem[5] = sem[1]
    x = torch.randn(20, 7, generator=g, dtype=torch.float64)
    sem, x = sem.to(device), x.to(device)
    batch, _ = tokenflow_ext.codebook_search(x, sem, l2_norm=False)
    alone = torch.stack([tokenflow_ext.codebook_search(x[r:r + 1], sem, l2_norm=False)[0][0] for r in range(20)])
    assert batch[4] == 1 and torch.equal(batch, alone) and not (batch == 5).any()
    # fp32, dual codebook, many copies spread over several GEMM tiles and thread splits
    x, semantic, pixel = make_problem(300, 700, seed=5, device=device)
    semantic[650], pixel[650] = semantic[3], pixel[3]
    semantic[1300 // 2 + 1], pixel[1300 // 2 + 1] = semantic[3], pixel[3]
    for l2_norm in (True, False):
        batch, _ = tokenflow_ext.codebook_search(x, semantic, pixel, l2_norm=l2_norm)
        assert not ((batch == 650) | (batch == 651)).any()
        for rows in (slice(0, 1), slice(7, 9), slice(0, 257)):
            part, _ = tokenflow_ext.codebook_search(x[rows], semantic, pixel, l2_norm=l2_norm)
            assert torch.equal(part, batch[rows])


@pytest.mark.parametrize("device", DEVICES)
def test_ties_take_the_lowest_index(device):
    x, semantic, pixel = make_problem(200, 64, device=device, seed=7)
    # every code appears three times: positions k, k + 64, k + 128
    semantic3, pixel3 = semantic.repeat(3, 1), pixel.repeat(3, 1)
    indices, _ = tokenflow_ext.codebook_search(x, semantic3, pixel3)
    assert (indices < 64).all()
    reference, _ = tokenflow_ext.codebook_search(x, semantic, pixel)
    assert torch.equal(indices, reference)
    # all codes identical: index 0 everywhere, across every tile and thread split
    flat_semantic = semantic[:1].expand(5000, -1).contiguous()
    flat_pixel = pixel[:1].expand(5000, -1).contiguous()
    indices, _ = tokenflow_ext.codebook_search(x, flat_semantic, flat_pixel)
    assert (indices == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_zero_vectors_stay_zero_under_l2_norm(device):
    x, semantic, pixel = make_problem(64, 100, device=device, seed=9)
    x[:8] = 0
    semantic[10] = 0
    pixel[10] = 0
    indices, distance = assert_search_matches_reference(x, semantic, pixel)
    assert torch.isfinite(distance).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_follows_torch_argmin(device):
    x, semantic, pixel = make_problem(16, 100, device=device, seed=11)
    x[3, 5] = float("nan")  # a NaN row: every distance is NaN -> index 0, as torch.argmin gives
    semantic[42, 0] = float("nan")  # a NaN code: it is the first NaN of every other row -> 42
    indices, distance = tokenflow_ext.codebook_search(x, semantic, pixel)
    reference, _ = codebook_search_reference(x.cpu(), semantic.cpu(), pixel.cpu())
    assert torch.equal(indices.cpu(), reference)
    assert indices[3] == 0 and (indices[torch.arange(16, device=device) != 3] == 42).all()
    assert torch.isnan(distance).all()


@pytest.mark.parametrize("device", DEVICES)
def test_large_codebook(device):
    # K = 2^20 codes (LlamaGen-style 8-d), a few rows: exercises the K split across threads / blocks
    x, semantic, _ = make_problem(37, 1 << 20, 8, 0, device=device, seed=13)
    indices, distance = tokenflow_ext.codebook_search(x, semantic)
    ref_indices, _ = codebook_search_reference(x.cpu(), semantic.cpu(), chunk_size=8)
    exact, gap, ok = index_agreement(x.cpu(), semantic.cpu(), None, indices.cpu(), ref_indices)
    assert ok and exact > 0.9, (exact, gap)


@pytest.mark.parametrize("device", DEVICES)
def test_more_than_2_pow_31_distance_pairs(device):
    # N * K = 70,000 * 32,768 > 2^31: index arithmetic must not overflow. Checked on a sample of rows.
    x, semantic, _ = make_problem(70_000, 32_768, 4, 0, device=device, seed=17)
    assert x.shape[0] * semantic.shape[0] > 2**31
    indices, _ = tokenflow_ext.codebook_search(x, semantic)
    sample = torch.cat([torch.arange(0, 64), torch.arange(69_936, 70_000)])
    ref_indices, _ = codebook_search_reference(x[sample].cpu(), semantic.cpu())
    exact, gap, ok = index_agreement(x[sample].cpu(), semantic.cpu(), None, indices[sample.to(device)].cpu(),
                                     ref_indices)
    assert ok and exact > 0.9, (exact, gap)
    assert indices.min() >= 0 and indices.max() < 32_768


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l2_norm", [True, False])
def test_gradcheck_min_distance(device, l2_norm):
    x, semantic, pixel = make_problem(6, 5, 3, 2, dtype=torch.float64, device=device, seed=19)
    inputs = [t.requires_grad_() for t in (x, semantic, pixel)]
    fn = lambda a, b, c: tokenflow_ext.codebook_search(a, b, c, pixel_weight=0.7, l2_norm=l2_norm)[1]  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_min_distance_gradient_matches_reference_autograd(device):
    x, semantic, pixel = make_problem(50, 30, dtype=torch.float64, device=device, seed=23)
    ours = [t.clone().requires_grad_() for t in (x, semantic, pixel)]
    ref = [t.clone().requires_grad_() for t in (x, semantic, pixel)]
    indices, distance = tokenflow_ext.codebook_search(*ours, pixel_weight=1.5)
    (distance * torch.linspace(0.1, 1, 50, device=device, dtype=torch.float64)).sum().backward()
    expected = codebook_distances(*ref, indices, pixel_weight=1.5)
    (expected * torch.linspace(0.1, 1, 50, device=device, dtype=torch.float64)).sum().backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, semantic, pixel = make_problem(20, 33, device=device, seed=29)
    torch.library.opcheck(torch.ops.tokenflow_ext.codebook_search.default, (x, semantic, pixel, 1.0, True))
    torch.library.opcheck(torch.ops.tokenflow_ext.codebook_search.default, (x[:, :32], semantic, None, 1.0, False))
    grads = [t.clone().requires_grad_() for t in (x, semantic, pixel)]
    # With grads, opcheck's AOT tests sum every output into one accumulator typed by the first output (our
    # int64 indices) and fail before our op is involved; the compiled-backward test below covers AOT autograd.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.tokenflow_ext.codebook_search.default, (*grads, 0.5, True), test_utils=utils)


@pytest.mark.parametrize("dynamic", [False, True])
def test_aot_dispatch_with_grad_inputs(dynamic):
    """Issue 12 (16): opcheck's test_aot_dispatch_{static,dynamic} with inputs that require grad, run by hand.

    opcheck sums the op's outputs into an accumulator that starts as the int64 ``indices`` and then cannot take
    the float ``min_distance`` (a harness limitation, before our op is involved). The same check on a wrapper
    that lists ``min_distance`` first compares outputs and gradients of eager and AOT-autograd runs."""
    from torch.testing._internal.optests.aot_autograd import aot_autograd_check

    x, semantic, pixel = make_problem(20, 33, seed=29)
    grads = tuple(t.clone().requires_grad_() for t in (x, semantic, pixel))

    def distance_first(*args):
        indices, distance = torch.ops.tokenflow_ext.codebook_search.default(*(t.clone() for t in args), 0.5, True)
        return distance, indices

    aot_autograd_check(distance_first, grads, {}, dynamic, check_gradients="auto")


def test_torch_compile_fullgraph():
    x, semantic, pixel = make_problem(64, 128, seed=31)

    @torch.compile(fullgraph=True)
    def search(a, b, c):
        indices, distance = tokenflow_ext.codebook_search(a, b, c, pixel_weight=0.5)
        return indices + 1, distance * 2

    indices, distance = search(x, semantic, pixel)
    expected_indices, expected_distance = tokenflow_ext.codebook_search(x, semantic, pixel, pixel_weight=0.5)
    assert torch.equal(indices, expected_indices + 1)
    torch.testing.assert_close(distance, expected_distance * 2)

    # backward through the compiled graph (AOT autograd) equals eager autograd
    leaves = [t.clone().requires_grad_() for t in (x, semantic, pixel)]
    compiled = torch.compile(lambda a, b, c: tokenflow_ext.codebook_search(a, b, c)[1].square().sum(), fullgraph=True)
    compiled(*leaves).backward()
    eager = [t.clone().requires_grad_() for t in (x, semantic, pixel)]
    tokenflow_ext.codebook_search(*eager)[1].square().sum().backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


class TestBadInput:
    def setup_method(self):
        self.x, self.semantic, self.pixel = make_problem(10, 20)

    def search(self, *args, **kwargs):
        return tokenflow_ext.codebook_search(*args, **kwargs)

    def test_integer_x(self):
        with pytest.raises(RuntimeError, match="x must be float32, float16, bfloat16 or float64"):
            self.search(self.x.long(), self.semantic, self.pixel)

    def test_integer_codebook(self):
        with pytest.raises(RuntimeError, match="semantic_codebook must be float32"):
            self.search(self.x, self.semantic.int(), self.pixel)

    def test_wrong_last_dim(self):
        with pytest.raises(RuntimeError, match="last dim of x is 39 but the codebooks need 40"):
            self.search(self.x[:, :39], self.semantic, self.pixel)

    def test_mismatched_codebook_rows(self):
        with pytest.raises(RuntimeError, match="same number of rows; semantic_codebook has 20, pixel_codebook has 19"):
            self.search(self.x, self.semantic, self.pixel[:19])

    def test_codebook_dtype_mismatch(self):
        # the raw op takes one dtype; the public wrapper promotes mixed dtypes first (issue 12, item 7)
        raw = torch.ops.tokenflow_ext.codebook_search
        with pytest.raises(RuntimeError, match="pixel_codebook has dtype Double but semantic_codebook has dtype Float"):
            raw(self.x, self.semantic, self.pixel.double(), 1.0, True)
        with pytest.raises(RuntimeError, match="x has dtype Half but semantic_codebook has dtype Float"):
            raw(self.x.half(), self.semantic, self.pixel, 1.0, True)
        indices, distance = self.search(self.x, self.semantic, self.pixel.double())
        assert distance.dtype == torch.float64
        assert torch.equal(indices, self.search(self.x.double(), self.semantic.double(), self.pixel.double())[0])

    def test_codebook_on_another_device(self):
        with pytest.raises(RuntimeError, match="pixel_codebook is on meta but semantic_codebook is on cpu"):
            self.search(self.x, self.semantic, self.pixel.to("meta"))
        with pytest.raises(RuntimeError, match="x is on meta but semantic_codebook is on cpu"):
            self.search(self.x.to("meta"), self.semantic, self.pixel)

    def test_one_dimensional_codebook(self):
        with pytest.raises(RuntimeError, match=r"semantic_codebook must be 2-D \(K, Ds\)"):
            self.search(self.x[:, 0], self.semantic[0], None)

    def test_empty_codebook(self):
        with pytest.raises(RuntimeError, match=r"no rows \(K = 0\)"):
            self.search(self.x, self.semantic[:0], self.pixel[:0])

    def test_negative_or_non_finite_weight(self):
        with pytest.raises(RuntimeError, match="pixel_weight must be finite and >= 0, got -0.5"):
            self.search(self.x, self.semantic, self.pixel, pixel_weight=-0.5)
        with pytest.raises(RuntimeError, match="pixel_weight must be finite"):
            self.search(self.x, self.semantic, self.pixel, pixel_weight=float("inf"))

    def test_weight_that_overflows_the_accumulate_type(self):
        # issue 12 (5): 1e300 is inf in fp32 arithmetic; it used to give index 0 everywhere and inf distances
        with pytest.raises(RuntimeError, match=r"codebook_search: pixel_weight = 1e\+300 overflows the Float"):
            self.search(self.x, self.semantic, self.pixel, pixel_weight=1e300)
        with pytest.raises(RuntimeError, match="pixel_weight = 1e\\+300 overflows"):  # the fake kernel too
            torch.ops.tokenflow_ext.codebook_search(self.x.to("meta"), self.semantic.to("meta"),
                                                    self.pixel.to("meta"), 1e300, True)
        x, semantic, pixel = (t.double() for t in (self.x, self.semantic, self.pixel))
        indices, distance = self.search(x, semantic, pixel, pixel_weight=1e300)  # fine in fp64
        assert torch.isfinite(distance).all()
        ref, _ = codebook_search_reference(x, semantic, pixel, pixel_weight=1e300)
        assert torch.equal(indices, ref)

    def test_zero_dim_x(self):
        with pytest.raises(RuntimeError, match="at least 1 dim"):
            self.search(torch.tensor(1.0), self.semantic[:, :1])


@pytest.mark.parametrize("l2_norm", [True, False])
def test_double_backward_min_distance(l2_norm):
    """Issue 12 (3): the min_distance backward is differentiable (create_graph=True)."""
    x, semantic, pixel = make_problem(7, 9, 6, 3, dtype=torch.float64, seed=43)
    leaves = tuple(t.requires_grad_() for t in (x, semantic, pixel))
    assert torch.autograd.gradgradcheck(
        lambda a, s, p: tokenflow_ext.codebook_search(a, s, p, pixel_weight=0.5, l2_norm=l2_norm)[1], leaves)


def autocast_case(device, dtype):
    x, semantic, pixel = make_problem(50, 70, seed=61, device=device)
    low = x.to(dtype)
    with torch.autocast(device, dtype):
        indices, distance = tokenflow_ext.codebook_search(low, semantic, pixel)
        raw_indices, raw_distance = torch.ops.tokenflow_ext.codebook_search(low, semantic, pixel, 1.0, True)
    expected, expected_distance = tokenflow_ext.codebook_search(low.float(), semantic, pixel)
    assert torch.equal(indices, expected) and torch.equal(raw_indices, expected)
    assert distance.dtype == raw_distance.dtype == torch.float32
    torch.testing.assert_close(distance, expected_distance)
    # mixed dtypes without autocast: computed in the promoted dtype, gradients in each input's dtype
    leaves = [low.clone().requires_grad_(), semantic.clone().requires_grad_(), pixel.clone().requires_grad_()]
    indices, distance = tokenflow_ext.codebook_search(*leaves)
    assert torch.equal(indices, expected)
    distance.sum().backward()
    assert [t.grad.dtype for t in leaves] == [dtype, torch.float32, torch.float32]
    codes = tokenflow_ext.codebook_gather(indices, semantic, pixel.to(dtype))
    assert codes.dtype == torch.float32


def test_autocast_and_mixed_dtypes_cpu():
    """Issue 12 (7): bf16 (autocast) features with fp32 codebooks."""
    autocast_case("cpu", torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_and_mixed_dtypes_cuda(dtype):
    autocast_case("cuda", dtype)
