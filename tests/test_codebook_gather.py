import pytest
import torch
from helpers import DEVICES, FLOAT_DTYPES, make_problem

import tokenflow_ext
from tokenflow_ext.reference import codebook_gather_reference

LOW_PRECISION_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_indices(shape, k, device, seed=0):
    return torch.randint(0, k, shape, generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("l2_norm", [True, False])
@pytest.mark.parametrize("with_pixel", [True, False])
def test_forward_matches_reference(device, dtype, l2_norm, with_pixel):
    _, semantic, pixel = make_problem(1, 300, dtype=dtype, device=device)
    pixel = pixel if with_pixel else None
    indices = random_indices((4, 7, 9), 300, device)
    rows = tokenflow_ext.codebook_gather(indices, semantic, pixel, l2_norm=l2_norm)
    expected = codebook_gather_reference(indices, semantic, pixel, l2_norm=l2_norm)
    assert rows.shape == (4, 7, 9, 32 + (8 if with_pixel else 0)) and rows.dtype == dtype
    tol = LOW_PRECISION_TOLERANCE.get(dtype, 0.0)
    # fp16/bf16: normalised in fp32 and rounded once, so within one rounding of the dtype of the reference
    torch.testing.assert_close(rows, expected, atol=tol or 1e-6, rtol=tol or 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l2_norm", [True, False])
@pytest.mark.parametrize("deterministic", [True, False])
def test_backward_matches_reference_autograd(device, l2_norm, deterministic):
    _, semantic, pixel = make_problem(1, 64, dtype=torch.float64, device=device, seed=3)
    semantic[5] = 0  # a zero row: the gradient is g / eps through the clamp
    # skewed indices: hot codes, unused codes
    indices = (random_indices((2000,), 64, device, seed=4) ** 2) // 64
    upstream = torch.randn(2000, 40, dtype=torch.float64, device=device)
    ours = [semantic.clone().requires_grad_(), pixel.clone().requires_grad_()]
    ref = [semantic.clone().requires_grad_(), pixel.clone().requires_grad_()]
    (tokenflow_ext.codebook_gather(indices, *ours, l2_norm=l2_norm, deterministic=deterministic) * upstream).sum().backward()
    (codebook_gather_reference(indices, *ref, l2_norm=l2_norm) * upstream).sum().backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backward_low_precision_accumulates_in_fp32(device, dtype):
    _, semantic, pixel = make_problem(1, 16, dtype=dtype, device=device, seed=5)
    indices = torch.zeros(4096, dtype=torch.long, device=device)  # one hot code: 4096 rows summed
    upstream = torch.full((4096, 40), 1e-3, dtype=dtype, device=device)
    leaves = [semantic.clone().requires_grad_(), pixel.clone().requires_grad_()]
    (tokenflow_ext.codebook_gather(indices, *leaves, l2_norm=False) * upstream).sum().backward()
    expected = 4096 * upstream[0, 0].double()
    assert torch.allclose(leaves[0].grad[0].double(), expected.expand(32), rtol=1e-2)
    assert (leaves[0].grad[1:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_is_bitwise_reproducible(device):
    _, semantic, pixel = make_problem(1, 32, device=device, seed=6)
    indices = random_indices((50_000,), 32, device, seed=7) // 4  # contention on 8 codes
    upstream = torch.randn(50_000, 40, device=device)
    grads = []
    for _ in range(3):
        leaves = [semantic.clone().requires_grad_(), pixel.clone().requires_grad_()]
        (tokenflow_ext.codebook_gather(indices, *leaves, deterministic=True) * upstream).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for later in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], later))


@pytest.mark.parametrize("device", DEVICES)
def test_int32_indices_and_empty(device):
    _, semantic, pixel = make_problem(1, 10, device=device)
    indices = random_indices((5,), 10, device)
    torch.testing.assert_close(tokenflow_ext.codebook_gather(indices.int(), semantic, pixel),
                               tokenflow_ext.codebook_gather(indices, semantic, pixel))
    empty = tokenflow_ext.codebook_gather(torch.zeros(0, 3, dtype=torch.long, device=device), semantic, pixel)
    assert empty.shape == (0, 3, 40)
    leaves = [semantic.clone().requires_grad_(), pixel.clone().requires_grad_()]
    tokenflow_ext.codebook_gather(torch.zeros(0, dtype=torch.long, device=device), *leaves).sum().backward()
    assert all((leaf.grad == 0).all() for leaf in leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l2_norm", [True, False])
def test_gradcheck(device, l2_norm):
    _, semantic, pixel = make_problem(1, 6, 3, 2, dtype=torch.float64, device=device, seed=8)
    indices = torch.tensor([[0, 5, 5], [2, 0, 1]], device=device)
    fn = lambda a, b: tokenflow_ext.codebook_gather(indices, a, b, l2_norm=l2_norm)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (semantic.requires_grad_(), pixel.requires_grad_()))
    fn_single = lambda a: tokenflow_ext.codebook_gather(indices, a, l2_norm=l2_norm)  # noqa: E731
    assert torch.autograd.gradcheck(fn_single, (semantic.detach().requires_grad_(),))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _, semantic, pixel = make_problem(1, 12, device=device, seed=9)
    indices = random_indices((3, 5), 12, device)
    op = torch.ops.tokenflow_ext.codebook_gather.default
    torch.library.opcheck(op, (indices, semantic, pixel, True, True))
    torch.library.opcheck(op, (indices, semantic.clone().requires_grad_(), pixel.clone().requires_grad_(), True, False))
    torch.library.opcheck(op, (indices, semantic.clone().requires_grad_(), None, False, True))
    grad = torch.randn(3, 5, 40, device=device)
    torch.library.opcheck(torch.ops.tokenflow_ext.codebook_gather_backward.default,
                          (grad, indices, semantic, pixel, True, True))


class TestBadInput:
    def setup_method(self):
        _, self.semantic, self.pixel = make_problem(1, 10)

    def test_out_of_range_index(self):
        with pytest.raises(RuntimeError, match=r"indices must lie in \[0, K\) with K = 10; found 10"):
            tokenflow_ext.codebook_gather(torch.tensor([0, 10]), self.semantic, self.pixel)
        with pytest.raises(RuntimeError, match="found -1"):
            tokenflow_ext.codebook_gather(torch.tensor([-1]), self.semantic, self.pixel)

    def test_float_indices(self):
        with pytest.raises(RuntimeError, match="indices must be int64 or int32, got Float"):
            tokenflow_ext.codebook_gather(torch.tensor([0.0]), self.semantic, self.pixel)

    def test_mismatched_codebooks(self):
        with pytest.raises(RuntimeError, match="same number of rows"):
            tokenflow_ext.codebook_gather(torch.tensor([0]), self.semantic, self.pixel[:5])
        # the raw op takes one dtype; the public wrapper promotes mixed codebooks first (issue 12, item 7)
        with pytest.raises(RuntimeError, match="pixel_codebook has dtype Half but semantic_codebook has dtype Float"):
            torch.ops.tokenflow_ext.codebook_gather(torch.tensor([0]), self.semantic, self.pixel.half(), True, False)
        assert tokenflow_ext.codebook_gather(torch.tensor([0]), self.semantic, self.pixel.half()).dtype == torch.float32

    def test_one_dimensional_codebook(self):
        with pytest.raises(RuntimeError, match=r"semantic_codebook must be 2-D"):
            tokenflow_ext.codebook_gather(torch.tensor([0]), self.semantic[0])

    def test_backward_grad_shape(self):
        with pytest.raises(RuntimeError, match=r"grad_rows must have shape indices.shape \+ \(40,\)"):
            torch.ops.tokenflow_ext.codebook_gather_backward(torch.zeros(3, 39), torch.tensor([0, 1, 2]),
                                                             self.semantic, self.pixel, True, True)


@pytest.mark.parametrize("l2_norm", [True, False])
def test_double_backward(l2_norm):
    """Issue 12 (3): gradgradcheck used to see a zero Jacobian (the backward op had no autograd)."""
    _, semantic, pixel = make_problem(1, 9, 6, 3, dtype=torch.float64, seed=41)
    indices = torch.tensor([0, 3, 3, 8, 5, 0, 1])
    leaves = (semantic.requires_grad_(), pixel.requires_grad_())
    assert torch.autograd.gradgradcheck(
        lambda s, p: tokenflow_ext.codebook_gather(indices, s, p, l2_norm=l2_norm), leaves)
