import pytest
import torch
from helpers import DEVICES, FLOAT_DTYPES

from tokenflow_ext import flow
from tokenflow_ext.reference import (
    euler_step_reference,
    interpolate_reference,
    matching_loss_reference,
    velocity_loss_reference,
)

SIGMA = 1e-5


def latents(shape, *, dtype=torch.float32, device="cpu", seed=0, count=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(count)]


def timesteps(batch, device="cpu", seed=1):
    return torch.rand(batch, generator=torch.Generator().manual_seed(seed)).to(device)


def upcast(*tensors):
    return [t.double() for t in tensors]


def assert_within_one_rounding(ours, exact, dtype):
    """Low precision: the fused op computes in fp32 and rounds once, so it is within half an ulp of the dtype."""
    torch.testing.assert_close(ours.double(), exact.to(dtype).double(),
                               **({} if dtype == torch.float64 else {"atol": 1e-6, "rtol": {
                                   torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(8, 77, 16), (3, 5), (1, 1), (4, 2, 3, 7)])
def test_interpolate_values(device, dtype, shape):
    x0, x1 = latents(shape, dtype=dtype, device=device, count=2)
    t = timesteps(shape[0], device)
    x_t, v_target = flow.interpolate(x0, x1, t, sigma_min=SIGMA)
    exact_xt, exact_v = interpolate_reference(*upcast(x0, x1), t.double(), SIGMA)
    assert x_t.dtype == dtype and x_t.shape == shape
    assert_within_one_rounding(x_t, exact_xt, dtype)
    assert_within_one_rounding(v_target, exact_v, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matching_loss_values(device, dtype, reduction):
    v_pred, x0, x1 = latents((6, 77, 16), dtype=dtype, device=device)
    loss = flow.matching_loss(v_pred, x0, x1, sigma_min=SIGMA, reduction=reduction)
    exact = matching_loss_reference(*upcast(v_pred, x0, x1), SIGMA, reduction)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == exact.shape
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(6, 77, 16), (3, 37), (2, 1)])
def test_velocity_loss_values(device, dtype, reduction, shape):
    v_pred, v_target = latents(shape, dtype=dtype, device=device, seed=12, count=2)
    loss = flow.velocity_loss(v_pred, v_target, reduction)
    exact = velocity_loss_reference(*upcast(v_pred, v_target), reduction)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == exact.shape
    torch.testing.assert_close(loss.double(), exact, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_matching_loss_large_samples_stay_accurate(device):
    # [64, 4096, 64]-like per-sample sizes (262144 elements): fp64 partial sums keep fp32 inputs exact
    v_pred, x0, x1 = latents((2, 4096, 64), device=device, seed=3)
    loss = flow.matching_loss(v_pred, x0, x1, reduction="none")
    exact = matching_loss_reference(*upcast(v_pred, x0, x1), SIGMA, "none")
    torch.testing.assert_close(loss.double(), exact, rtol=2e-7, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_training_gradients_match_eager_autograd(device):
    """Gradients reach v_pred, x0 through x_t *and* the target, x1 and t, as autograd of the eager formula."""
    base = latents((5, 77, 16), dtype=torch.float64, device=device, seed=4, count=2)
    t_base = timesteps(5, device).double()
    weights = torch.randn(5, 77, 16, dtype=torch.float64, device=device)

    def run(interp, loss_fn):
        x0, x1 = [b.clone().requires_grad_() for b in base]
        t = t_base.clone().requires_grad_()
        x_t, _ = interp(x0, x1, t, SIGMA)
        v_pred = torch.tanh(x_t) * weights  # a stand-in model
        loss_fn(v_pred, x0, x1, SIGMA).backward()
        return x0.grad, x1.grad, t.grad

    ours = run(flow.interpolate, flow.matching_loss)
    expected = run(interpolate_reference, matching_loss_reference)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x1_grad", [True, False])
def test_velocity_loss_on_the_stored_target_trains_like_matching_loss(device, x1_grad):
    """interpolate's v_target + velocity_loss: the target's gradient goes back through interpolate, which gives x0
    (and x1) their whole gradient; the same loss and gradients as matching_loss and as eager autograd."""
    base = latents((5, 77, 16), dtype=torch.float64, device=device, seed=14, count=2)
    t_base = timesteps(5, device).double()
    weights = torch.randn(5, 77, 16, dtype=torch.float64, device=device)

    def run(loss_of):
        x0, x1 = [b.clone().requires_grad_() for b in base]
        t = t_base.clone().requires_grad_()
        loss = loss_of(x0, x1, t)
        loss.backward()
        return loss.detach(), x0.grad, x1.grad, t.grad

    def stored_target(x0, x1, t):
        x_t, v_target = flow.interpolate(x0, x1, t, SIGMA, x1_grad=x1_grad)
        return flow.velocity_loss(torch.tanh(x_t) * weights, v_target)

    def recomputed_target(x0, x1, t):
        x_t, _ = flow.interpolate(x0, x1, t, SIGMA, x1_grad=x1_grad, with_target=False)
        return flow.matching_loss(torch.tanh(x_t) * weights, x0, x1, SIGMA, x1_grad=x1_grad)

    def eager(x0, x1, t):
        x_t, v_target = interpolate_reference(x0, x1 if x1_grad else x1.detach(), t, SIGMA)
        return velocity_loss_reference(torch.tanh(x_t) * weights, v_target)

    ours, recomputed, expected = run(stored_target), run(recomputed_target), run(eager)
    assert (ours[2] is None) == (not x1_grad)
    for a, b, c in zip(ours, recomputed, expected):
        if c is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_velocity_loss_gradients_and_op_checks(device):
    v_pred, v_target = [t.requires_grad_() for t in latents((3, 2, 4), dtype=torch.float64, device=device, seed=15,
                                                            count=2)]
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(lambda v, tgt: flow.velocity_loss(v, tgt, reduction), (v_pred, v_target))
    assert torch.autograd.gradgradcheck(lambda v, tgt: flow.velocity_loss(v, tgt, "none"), (v_pred, v_target))
    ops = torch.ops.tokenflow_ext
    v, tgt = latents((4, 77, 16), device=device, seed=16, count=2)
    grad_loss = timesteps(4, device)
    torch.library.opcheck(ops.flow_matching_loss.default, (v, None, tgt, 0.0))
    torch.library.opcheck(ops.flow_matching_loss.default, (v.requires_grad_(), None, tgt.requires_grad_(), 0.0))
    torch.library.opcheck(ops.flow_matching_loss_backward.default, (grad_loss, v, None, tgt, 0.0, False, True))
    with pytest.raises(RuntimeError, match="flow_matching_loss_backward: x0_needs_grad is set but x0 is None"):
        ops.flow_matching_loss_backward(grad_loss, v.detach(), None, tgt.detach(), 0.0, True, False)
    with pytest.raises(RuntimeError, match=r"x1 \(the target velocity, x0 being None\) has shape .* but v_pred has"):
        flow.velocity_loss(v, tgt[:, :3])
    with pytest.raises(TypeError, match="matching_loss: x0 is None; for a stored target velocity use velocity_loss"):
        flow.matching_loss(v, None, tgt)
    with pytest.raises(ValueError, match="velocity_loss: reduction must be one of"):
        flow.velocity_loss(v, tgt, reduction="batchmean")


@pytest.mark.parametrize("device", DEVICES)
def test_interpolate_without_target(device):
    """with_target=False: the same x_t and gradients (also to t, which needs the target internally), no v_target."""
    base = latents((5, 7, 3), dtype=torch.float64, device=device, seed=8, count=2)
    t_base = timesteps(5, device).double()
    results = {}
    for with_target in (True, False):
        x0, x1 = [b.clone().requires_grad_() for b in base]
        t = t_base.clone().requires_grad_()
        x_t, v_target = flow.interpolate(x0, x1, t, SIGMA, with_target=with_target)
        assert (v_target is None) == (not with_target)
        (x_t * x_t).sum().backward()
        results[with_target] = (x_t.detach(), x0.grad, x1.grad, t.grad)
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x0, x1 = [b.clone().requires_grad_() for b in base]
    t = t_base.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: flow.interpolate(a, b, c, SIGMA, with_target=False)[0], (x0, x1, t))
    torch.library.opcheck(torch.ops.tokenflow_ext.flow_interpolate.default, (x0, x1, t, SIGMA, False))
    with pytest.raises(TypeError, match="with_target"):
        flow.interpolate(x0, x1, t, SIGMA, with_target=1)


@pytest.mark.parametrize("device", DEVICES)
def test_x1_grad_switch(device):
    v_pred, x0, x1 = [t.requires_grad_() for t in latents((3, 4, 5), device=device)]
    flow.matching_loss(v_pred, x0, x1, x1_grad=False).backward()
    assert x1.grad is None and x0.grad is not None and v_pred.grad is not None
    x_t, _ = flow.interpolate(x0, x1, timesteps(3, device), x1_grad=False)
    x_t.sum().backward()
    assert x1.grad is None


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    x0, x1, v_pred = [t.requires_grad_() for t in latents((3, 2, 4), dtype=torch.float64, device=device, seed=5)]
    t = timesteps(3, device).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: flow.interpolate(a, b, c, SIGMA), (x0, x1, t))
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(lambda v, a, b: flow.matching_loss(v, a, b, SIGMA, reduction), (v_pred, x0, x1))
    v_uncond = torch.randn_like(v_pred).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, c, u: flow.euler_step(x, c, u, dt=0.1, guidance_scale=2.5),
                                    (x0, v_pred, v_uncond))
    stacked = torch.randn(6, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: flow.euler_step(x, s, dt=-0.05, guidance_scale=1.7), (x0, stacked))
    assert torch.autograd.gradcheck(lambda x, c: flow.euler_step(x, c, dt=0.2), (x0, v_pred))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x0, x1, v = latents((4, 77, 16), device=device, seed=6)
    t = timesteps(4, device)
    ops = torch.ops.tokenflow_ext
    grads = [a.clone().requires_grad_() for a in (x0, x1, v)]
    torch.library.opcheck(ops.flow_interpolate.default, (x0, x1, t, SIGMA))
    torch.library.opcheck(ops.flow_interpolate.default, (grads[0], grads[1], t, SIGMA))
    torch.library.opcheck(ops.flow_interpolate_backward.default, (x0, None, t, SIGMA, True, False))
    torch.library.opcheck(ops.flow_matching_loss.default, (v, x0, x1, SIGMA))
    torch.library.opcheck(ops.flow_matching_loss.default, (grads[2], grads[0], grads[1], SIGMA))
    torch.library.opcheck(ops.flow_matching_loss_backward.default, (t, v, x0, x1, SIGMA, True, True))
    torch.library.opcheck(ops.flow_euler_step.default, (x0, v, x1, 0.05, 2.0))
    torch.library.opcheck(ops.flow_euler_step.default, (grads[0], grads[2], None, 0.05, 1.0))
    torch.library.opcheck(ops.flow_euler_step.default, (x0, torch.cat([v, x1]), None, 0.05, 2.0))
    torch.library.opcheck(ops.flow_euler_step_.default, (x0.clone(), v, x1, 0.05, 2.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_euler_step_cfg_layouts_agree(device, dtype):
    x, v_cond, v_uncond = latents((4, 77, 16), dtype=dtype, device=device, seed=7)
    split = flow.euler_step(x, v_cond, v_uncond, dt=0.05, guidance_scale=2.0)
    stacked = flow.euler_step(x, torch.cat([v_cond, v_uncond]), dt=0.05, guidance_scale=2.0)
    assert torch.equal(split, stacked)
    exact = euler_step_reference(*upcast(x, v_cond, v_uncond), dt=0.05, guidance_scale=2.0)
    assert_within_one_rounding(split, exact, dtype)
    plain = flow.euler_step(x, v_cond, dt=0.05)
    assert_within_one_rounding(plain, euler_step_reference(*upcast(x, v_cond), dt=0.05), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_euler_step_in_place(device):
    x, v_cond, v_uncond = latents((3, 77, 16), device=device, seed=8)
    expected = flow.euler_step(x, v_cond, v_uncond, dt=0.1, guidance_scale=3.0)
    target = x.clone()
    returned = flow.euler_step_(target, v_cond, v_uncond, dt=0.1, guidance_scale=3.0)
    assert returned is target and torch.equal(target, expected)
    # a non-contiguous x is updated through its own strides
    wide = torch.zeros(3, 77, 32, device=device)
    view = wide[..., ::2]
    view.copy_(x)
    flow.euler_step_(view, v_cond, v_uncond, dt=0.1, guidance_scale=3.0)
    assert torch.equal(view, expected) and (wide[..., 1::2] == 0).all()


def test_bf16_pairs_round_like_single_elements():
    # CPU bf16 spans go two elements per 32-bit word, an odd last element alone: both must give the same bits,
    # NaN, infinities and subnormals included, in the Euler step (3 inputs) and the interpolation (2 outputs)
    values = torch.randn(37, generator=torch.Generator().manual_seed(11))
    values[[3, 4, 20]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    values[[9, 10, 36]] = torch.tensor([1e-39, -3e-40, 2e-39])  # subnormal in float32 and bfloat16
    x, v_cond, v_uncond = (values.roll(shift).bfloat16() for shift in (0, 5, 11))
    together = flow.euler_step(x[None], v_cond[None], v_uncond[None], dt=0.25, guidance_scale=1.5)[0]
    alone = torch.stack([flow.euler_step(x[i:i + 1][None], v_cond[i:i + 1][None], v_uncond[i:i + 1][None], dt=0.25,
                                         guidance_scale=1.5)[0, 0] for i in range(37)])
    assert torch.equal(together.isnan(), alone.isnan())
    assert torch.equal(together.nan_to_num(0.0).view(torch.int16), alone.nan_to_num(0.0).view(torch.int16))
    unchanged = flow.euler_step(x[None], torch.zeros_like(x)[None], dt=0.5)[0]  # x + 0: every finite x kept bit for bit
    finite = x.isfinite()
    assert torch.equal(unchanged[finite].view(torch.int16), x[finite].view(torch.int16))
    assert unchanged[3].isnan() and unchanged[4] == float("inf") and unchanged[20] == -float("inf")
    t = torch.tensor([0.3])
    x_t, v = flow.interpolate(x[None], v_cond[None], t)
    for i in (0, 9, 35, 36):
        one_t, one_v = flow.interpolate(x[i:i + 1][None], v_cond[i:i + 1][None], t)
        assert torch.equal(x_t[0, i:i + 1].nan_to_num(0.0), one_t[0].nan_to_num(0.0))
        assert torch.equal(v[0, i:i + 1].nan_to_num(0.0), one_v[0].nan_to_num(0.0))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x0, x1 = torch.empty(0, 77, 16, device=device), torch.empty(0, 77, 16, device=device)
    t = torch.empty(0, device=device)
    x_t, v = flow.interpolate(x0, x1, t)
    assert x_t.shape == (0, 77, 16) and v.shape == (0, 77, 16)
    assert flow.matching_loss(x0, x0, x1, reduction="none").shape == (0,)
    assert flow.velocity_loss(x0, x1, reduction="none").shape == (0,)
    assert flow.euler_step(x0, x1, dt=0.1).shape == (0, 77, 16)


def test_torch_compile_fullgraph():
    x0, x1, weights = latents((4, 77, 16), seed=9)
    t = timesteps(4)

    def train_step(a, b, tt):
        x_t, _ = flow.interpolate(a, b, tt, with_target=False)
        v_pred = x_t * weights
        return flow.matching_loss(v_pred, a, b)

    def train_step_stored_target(a, b, tt):
        x_t, v_target = flow.interpolate(a, b, tt)
        return flow.velocity_loss(x_t * weights, v_target)

    def sample_step(x, v_cond, v_uncond):
        return flow.euler_step(x, v_cond, v_uncond, dt=0.05, guidance_scale=2.0)

    compiled_train = torch.compile(train_step, fullgraph=True)
    leaves = [x0.clone().requires_grad_(), x1.clone().requires_grad_()]
    loss = compiled_train(*leaves, t)
    loss.backward()
    eager_leaves = [x0.clone().requires_grad_(), x1.clone().requires_grad_()]
    eager_loss = train_step(*eager_leaves, t)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)
    stored = [x0.clone().requires_grad_(), x1.clone().requires_grad_()]
    stored_loss = torch.compile(train_step_stored_target, fullgraph=True)(*stored, t)
    stored_loss.backward()
    torch.testing.assert_close(stored_loss, eager_loss)
    for a, b in zip(stored, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)
    compiled_sample = torch.compile(sample_step, fullgraph=True)
    torch.testing.assert_close(compiled_sample(x0, x1, weights), sample_step(x0, x1, weights))

    @torch.compile(fullgraph=True)
    def in_place(x, v_cond, v_uncond):
        flow.euler_step_(x, v_cond, v_uncond, dt=0.05, guidance_scale=2.0)
        return x * 1

    torch.testing.assert_close(in_place(x0.clone(), x1, weights), sample_step(x0, x1, weights))


class TestBadInput:
    def setup_method(self):
        self.x0, self.x1, self.v = latents((4, 77, 16), seed=10)
        self.t = timesteps(4)

    def test_shape_mismatch(self):
        with pytest.raises(RuntimeError, match=r"x1 has shape \[4, 77, 15\] but x0 has shape \[4, 77, 16\]"):
            flow.interpolate(self.x0, self.x1[..., :15], self.t)
        with pytest.raises(RuntimeError, match="x0 has shape .* but v_pred has shape"):
            flow.matching_loss(self.v, self.x0[:3], self.x1)
        with pytest.raises(RuntimeError, match="v_uncond has shape"):
            flow.euler_step(self.x0, self.v, self.x1[:2], dt=0.1, guidance_scale=2.0)
        with pytest.raises(RuntimeError, match=r"v_cond must have the shape of x .* or the stacked shape \[8, 77, 16\]"):
            flow.euler_step(self.x0, self.v[:3], dt=0.1)

    def test_wrong_t(self):
        with pytest.raises(RuntimeError, match=r"t must have shape \(B,\) = \(4,\), got \[3\]"):
            flow.interpolate(self.x0, self.x1, self.t[:3])
        with pytest.raises(RuntimeError, match=r"t must have shape \(B,\)"):
            flow.interpolate(self.x0, self.x1, self.t.reshape(2, 2))
        with pytest.raises(RuntimeError, match="t must be float32"):
            flow.interpolate(self.x0, self.x1, torch.ones(4, dtype=torch.long))

    def test_integer_tensors(self):
        with pytest.raises(RuntimeError, match="x0 must be float32"):
            flow.interpolate(self.x0.int(), self.x1.int(), self.t)
        with pytest.raises(RuntimeError, match="v_pred must be float32"):
            flow.matching_loss(self.v.long(), self.x0, self.x1)
        with pytest.raises(RuntimeError, match="x must be float32"):
            flow.euler_step(self.x0.int(), self.v.int(), dt=0.1)

    def test_mixed_dtypes(self):
        with pytest.raises(RuntimeError, match="x1 has dtype BFloat16 but x0 has dtype Float"):
            flow.interpolate(self.x0, self.x1.bfloat16(), self.t)

    def test_non_finite_dt_and_scale(self):
        with pytest.raises(RuntimeError, match="dt must be finite, got nan"):
            flow.euler_step(self.x0, self.v, dt=float("nan"))
        with pytest.raises(RuntimeError, match="dt must be finite, got inf"):
            flow.euler_step_(self.x0, self.v, dt=float("inf"))
        with pytest.raises(RuntimeError, match="guidance_scale must be finite"):
            flow.euler_step(self.x0, self.v, self.x1, dt=0.1, guidance_scale=float("inf"))

    def test_guidance_without_uncond(self):
        with pytest.raises(RuntimeError, match="guidance_scale = 2 needs the unconditional velocity"):
            flow.euler_step(self.x0, self.v, dt=0.1, guidance_scale=2.0)

    def test_bad_sigma_and_reduction(self):
        with pytest.raises(RuntimeError, match=r"sigma_min must be in \[0, 1\), got 1.5"):
            flow.interpolate(self.x0, self.x1, self.t, sigma_min=1.5)
        with pytest.raises(ValueError, match="reduction must be one of"):
            flow.matching_loss(self.v, self.x0, self.x1, reduction="batchmean")

    def test_zero_dim(self):
        with pytest.raises(RuntimeError, match="must have a batch dim"):
            flow.euler_step(torch.tensor(1.0), torch.tensor(1.0), dt=0.1)


class TestEulerStepInPlaceIsAMutatingOp:
    """Issue 12 (1, 2): the in-place step bumps the version, records autograd, and rejects partial aliasing."""

    def setup_method(self):
        self.v_cond, self.v_uncond, self.x = latents((3, 5, 4), seed=12)

    def test_version_bump_catches_a_modified_saved_tensor(self):
        a = self.x.clone().requires_grad_()
        y = a.exp()  # exp saves its result for the backward
        flow.euler_step_(y, self.v_cond, self.v_uncond, dt=0.1, guidance_scale=2.0)
        assert y._version == 1
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
        plain = self.x.clone()
        flow.euler_step_(plain, self.v_cond, dt=0.1)
        assert plain._version == 1

    def test_gradients_flow_through_the_in_place_step(self):
        leaves = [t.clone().requires_grad_() for t in (self.x, self.v_cond, self.v_uncond)]
        eager = [t.clone().requires_grad_() for t in (self.x, self.v_cond, self.v_uncond)]
        y = leaves[0] * 1.5
        flow.euler_step_(y, leaves[1], leaves[2], dt=0.1, guidance_scale=2.0)
        (y * y).sum().backward()
        y_ref = euler_step_reference(eager[0] * 1.5, eager[1], eager[2], dt=0.1, guidance_scale=2.0)
        (y_ref * y_ref).sum().backward()
        for ours, ref in zip(leaves, eager):
            torch.testing.assert_close(ours.grad, ref.grad)
        # x that needs no grad, v_cond that does (the gradient used to be dropped)
        x = self.x.clone()
        v = self.v_cond.clone().requires_grad_()
        flow.euler_step_(x, v, dt=0.25)
        assert x.requires_grad
        x.sum().backward()
        torch.testing.assert_close(v.grad, torch.full_like(v, 0.25))

    def test_eager_in_place_errors(self):
        leaf = self.x.clone().requires_grad_()
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            flow.euler_step_(leaf, self.v_cond, dt=0.1)
        with torch.no_grad():  # as leaf.add_(...) under no_grad
            flow.euler_step_(leaf, self.v_cond, dt=0.1)
        with torch.inference_mode():
            inference = self.x.clone()
            flow.euler_step_(inference, self.v_cond, dt=0.1)  # fine inside inference mode
        with pytest.raises(RuntimeError, match="flow_euler_step_: x is an inference tensor"):
            flow.euler_step_(inference, self.v_cond, dt=0.1)

    def test_partial_overlap_is_rejected(self):
        buf = torch.randn(61)
        with pytest.raises(RuntimeError, match="flow_euler_step_: x partially overlaps v_cond"):
            flow.euler_step_(buf[1:61].view(3, 5, 4), buf[:60].view(3, 5, 4), dt=0.1)
        stacked = torch.randn(6, 5, 4)
        with pytest.raises(RuntimeError, match="partially overlaps the (un)?conditional half"):
            flow.euler_step_(stacked[1:4], stacked, dt=0.1, guidance_scale=2.0)
        with pytest.raises(RuntimeError, match="partially overlaps v_uncond"):
            flow.euler_step_(buf[1:61].view(3, 5, 4), self.v_cond, buf[:60].view(3, 5, 4), dt=0.1, guidance_scale=2.0)
        with pytest.raises(RuntimeError, match="flow_euler_step_: x has elements that share one memory location"):
            flow.euler_step_(torch.zeros(1, 1, 1).expand(3, 5, 4), self.v_cond, dt=0.1)

    def test_exact_aliasing_stays_supported(self):
        x = self.x.clone()
        expected = euler_step_reference(x.clone(), x.clone(), dt=0.1)
        flow.euler_step_(x, x, dt=0.1)
        torch.testing.assert_close(x, expected)
        stacked = torch.randn(6, 5, 4)
        expected = euler_step_reference(stacked[:3].clone(), stacked.clone(), dt=0.1, guidance_scale=2.0)
        flow.euler_step_(stacked[:3], stacked, dt=0.1, guidance_scale=2.0)
        torch.testing.assert_close(stacked[:3], expected)


def test_double_backward():
    """Issue 12 (3): the backward of interpolate and matching_loss is differentiable (create_graph=True)."""
    g = torch.Generator().manual_seed(31)
    x0, x1, v = (torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    t = torch.rand(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b, tt: flow.interpolate(a, b, tt, 0.1), (x0, x1, t))
    assert torch.autograd.gradgradcheck(lambda p, a, b: flow.matching_loss(p, a, b, 0.1, "none"), (v, x0, x1))
    # d/dv sum(d loss / dv) for loss = mean_b mean_i (v - target)^2 is 2 / (B M) per element
    first = torch.autograd.grad(flow.matching_loss(v, x0, x1), v, create_graph=True)[0]
    second = torch.autograd.grad(first.sum(), v)[0]
    torch.testing.assert_close(second, torch.full_like(v, 2.0 / v.numel()))


def test_matching_loss_under_autocast():
    """Issue 12 (7): a bf16 prediction from an autocast region with fp32 latents (eager mse runs in fp32)."""
    x0, x1, v = latents((2, 7, 4), seed=33)
    layer = torch.nn.Linear(4, 4)
    with torch.autocast("cpu", torch.bfloat16):
        v_pred = layer(v)
        assert v_pred.dtype == torch.bfloat16
        loss = flow.matching_loss(v_pred, x0, x1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, matching_loss_reference(v_pred.float(), x0, x1, SIGMA))
    loss.backward()
    assert layer.weight.grad is not None


def test_in_place_step_compiles_with_grad_inputs():
    """Issue 12 (1): under torch.compile the in-place step records the velocity gradient as in eager."""
    x, v_cond, v_uncond = latents((2, 3, 4), seed=35)
    v_cond.requires_grad_()

    def step(a, vc, vu):
        y = a * 2
        flow.euler_step_(y, vc, vu, dt=0.1, guidance_scale=2.0)
        return (y * y).sum()

    torch.compile(step, fullgraph=True)(x, v_cond, v_uncond).backward()
    compiled_grad, v_cond.grad = v_cond.grad, None
    step(x, v_cond, v_uncond).backward()
    torch.testing.assert_close(compiled_grad, v_cond.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_step_checks_on_every_backend(device):
    """Issue 12 (1, 2): the version bump, the aliasing checks and the in-place gradient on each backend."""
    buf = torch.randn(61, device=device)
    with pytest.raises(RuntimeError, match="flow_euler_step_: x partially overlaps v_cond"):
        flow.euler_step_(buf[1:61].view(3, 5, 4), buf[:60].view(3, 5, 4), dt=0.1)
    stacked = torch.randn(6, 5, 4, device=device)
    expected = euler_step_reference(stacked[:3].clone(), stacked.clone(), dt=0.1, guidance_scale=2.0)
    flow.euler_step_(stacked[:3], stacked, dt=0.1, guidance_scale=2.0)
    torch.testing.assert_close(stacked[:3], expected)
    assert stacked._version == 1
    x = torch.randn(3, 5, 4, device=device)
    v = torch.randn(3, 5, 4, device=device, requires_grad=True)
    flow.euler_step_(x, v, dt=0.5)
    x.sum().backward()
    torch.testing.assert_close(v.grad, torch.full_like(v, 0.5))
