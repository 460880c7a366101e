import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICES, make_problem

import tokenflow_ext
from tokenflow_ext.reference import quantize_reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("l2_norm", [True, False])
@pytest.mark.parametrize("with_pixel", [True, False])
def test_matches_official_formulation(device, l2_norm, with_pixel):
    x, semantic, pixel = make_problem(2 * 6 * 6, 512, device=device, seed=1)
    x = x.reshape(2, 6, 6, 40)
    if not with_pixel:
        x, pixel = x[..., :32], None
    res = tokenflow_ext.quantize(x, semantic, pixel, l2_norm=l2_norm)
    ref_indices, ref_codes, ref_quantized = quantize_reference(x, semantic, pixel, l2_norm=l2_norm)
    assert res.indices.shape == x.shape[:-1] and res.indices.dtype == torch.int64
    assert torch.equal(res.indices, ref_indices)
    assert res.codes.shape == x.shape and res.quantized.shape == x.shape
    torch.testing.assert_close(res.codes, ref_codes, atol=1e-6, rtol=1e-6)
    # quantized carries the value of the codes (up to the straight-through rounding, <= 3e-8 officially)
    torch.testing.assert_close(res.quantized, ref_quantized, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(res.quantized, res.codes, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_official_losses(device):
    """vq + commitment losses as TokenFlow trains them: gradients reach x (STE) and both codebooks."""
    x, semantic, pixel = make_problem(300, 128, device=device, seed=2)
    beta = 0.25

    def losses(quantize_fn, leaves):
        x_, semantic_, pixel_ = leaves
        out = quantize_fn(x_, semantic_, pixel_)
        codes, quantized = out[1], out[2]
        x_hat = torch.cat([F.normalize(x_[:, :32], dim=-1), F.normalize(x_[:, 32:], dim=-1)], dim=-1)
        vq = ((codes - x_hat.detach()) ** 2).mean()
        commit = beta * ((codes.detach() - x_hat) ** 2).mean()
        downstream = (quantized * torch.linspace(-1, 1, 40, device=device)).sum()
        return vq + commit + downstream

    ours = [t.clone().requires_grad_() for t in (x, semantic, pixel)]
    ref = [t.clone().requires_grad_() for t in (x, semantic, pixel)]
    losses(tokenflow_ext.quantize, ours).backward()
    losses(quantize_reference, ref).backward()
    for a, b in zip(ours, ref):
        assert a.grad is not None and a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_codes_and_distances(device):
    # `quantized` is left out on purpose: its straight-through gradient is not the derivative of its value
    # (test_gradients_match_official_losses checks it against the official formulation instead).
    x, semantic, pixel = make_problem(5, 7, 3, 2, dtype=torch.float64, device=device, seed=3)
    leaves = [t.requires_grad_() for t in (x, semantic, pixel)]

    def fn(a, b, c):
        res = tokenflow_ext.quantize(a, b, c, pixel_weight=0.5)
        return res.codes, res.distances

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    x, semantic, pixel = make_problem(100, 256, dtype=dtype, seed=4)
    res = tokenflow_ext.quantize(x, semantic, pixel)
    assert res.codes.dtype == dtype and res.quantized.dtype == dtype and res.distances.dtype == torch.float32
    indices, _ = tokenflow_ext.codebook_search(x.float(), semantic.float(), pixel.float())
    assert torch.equal(res.indices, indices)  # fp16/bf16 values are exact in fp32


def test_torch_compile_fullgraph_training_step():
    x, semantic, pixel = make_problem(64, 96, seed=5)

    def step(a, b, c):
        res = tokenflow_ext.quantize(a, b, c)
        return ((res.codes - res.quantized.detach()) ** 2).mean() + res.quantized.square().mean(), res.indices

    compiled = torch.compile(step, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, semantic, pixel)]
    loss, indices = compiled(*leaves)
    loss.backward()
    eager_leaves = [t.clone().requires_grad_() for t in (x, semantic, pixel)]
    eager_loss, eager_indices = step(*eager_leaves)
    eager_loss.backward()
    assert torch.equal(indices, eager_indices)
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_bad_input_names_the_problem():
    x, semantic, pixel = make_problem(4, 8)
    with pytest.raises(RuntimeError, match="last dim of x is 40 but the codebooks need 32"):
        tokenflow_ext.quantize(x, semantic)
    with pytest.raises(RuntimeError, match="pixel_weight must be finite and >= 0"):
        tokenflow_ext.quantize(x, semantic, pixel, pixel_weight=-1.0)


def test_official_parity_fixture():
    """The official VectorQuantizer(32768, split=[32, 8]) built after torch.manual_seed(0), fed
    torch.manual_seed(1); randn(2, 40, 4, 4) in eval mode, picks these first eight indices."""
    torch.manual_seed(0)
    books = []
    for width in (32, 8):  # the official init order: Embedding (normal init), uniform_(-1/K, 1/K), normalize
        embedding = torch.nn.Embedding(32768, width)
        embedding.weight.data.uniform_(-1.0 / 32768, 1.0 / 32768)
        books.append(F.normalize(embedding.weight.data, p=2, dim=-1))
    torch.manual_seed(1)
    z = torch.randn(2, 40, 4, 4)
    res = tokenflow_ext.quantize(z.permute(0, 2, 3, 1), *books)
    assert res.indices.reshape(-1)[:8].tolist() == [2755, 3485, 24588, 13797, 31719, 30217, 4913, 20538]
    assert res.indices.shape == (2, 4, 4)  # row-major (b, h, w), as the official flattening


class TestArgumentTypes:
    """Issue 12 (12): non-float weights and non-bool switches are refused with the op and argument named."""

    def setup_method(self):
        self.x, self.semantic, self.pixel = make_problem(6, 9, seed=77)

    def test_pixel_weight_tensor_that_requires_grad(self):
        weight = torch.tensor(0.5, requires_grad=True)
        with pytest.raises(TypeError, match="codebook_search: pixel_weight must be a Python float, got a Tensor "
                                            "that requires grad"):
            tokenflow_ext.codebook_search(self.x, self.semantic, self.pixel, pixel_weight=weight)
        with pytest.raises(TypeError, match="quantize: pixel_weight must be a Python float"):
            tokenflow_ext.quantize(self.x, self.semantic, self.pixel, pixel_weight=weight)
        with pytest.raises(TypeError, match="codebook_search: pixel_weight must be a float, got str"):
            tokenflow_ext.codebook_search(self.x, self.semantic, self.pixel, pixel_weight="1")

    def test_l2_norm_must_be_a_bool(self):
        with pytest.raises(TypeError, match="codebook_search: l2_norm must be a bool, got str 'no'"):
            tokenflow_ext.codebook_search(self.x, self.semantic, self.pixel, l2_norm="no")
        with pytest.raises(TypeError, match="codebook_gather: l2_norm must be a bool"):
            tokenflow_ext.codebook_gather(torch.zeros(2, dtype=torch.long), self.semantic, self.pixel, l2_norm="no")
        with pytest.raises(TypeError, match="codebook_gather: deterministic must be a bool"):
            tokenflow_ext.codebook_gather(torch.zeros(2, dtype=torch.long), self.semantic, deterministic=1)
        with pytest.raises(TypeError, match="quantize: l2_norm must be a bool"):
            tokenflow_ext.quantize(self.x, self.semantic, self.pixel, l2_norm=0)

    def test_modules_and_flow_ops(self):
        from tokenflow_ext import flow
        from tokenflow_ext.nn import DualCodebookQuantizer

        with pytest.raises(TypeError, match="DualCodebookQuantizer: l2_norm must be a bool"):
            DualCodebookQuantizer(16, 4, 2, l2_norm="no")
        with pytest.raises(TypeError, match="DualCodebookQuantizer: pixel_weight must be a Python float"):
            DualCodebookQuantizer(16, 4, 2, pixel_weight=torch.tensor(1.0, requires_grad=True))
        x = torch.randn(2, 3)
        with pytest.raises(TypeError, match="flow.euler_step: dt must be a Python float"):
            flow.euler_step(x, x, dt=torch.tensor(0.1, requires_grad=True))
        with pytest.raises(TypeError, match="flow.matching_loss: sigma_min must be a float"):
            flow.matching_loss(x, x, x, sigma_min=None)
        # plain numbers of any kind still work
        tokenflow_ext.codebook_search(self.x, self.semantic, self.pixel, pixel_weight=1, l2_norm=np.bool_(True))
        flow.euler_step(x, x, dt=np.float32(0.1))
