"""The flow ops' backward ops have Autograd kernels of their own (issue 25 item 13): differentiating through
them (double backward, or a direct call under grad mode) gives the true derivatives of the first-order
formulas, and torch never warns that an autograd kernel is missing."""

import warnings

import torch

import tokenflow_ext  # noqa: F401  (registers the ops)

ops = torch.ops.tokenflow_ext


def _no_missing_kernel_warning(caught):
    return not any("autograd kernel was not registered" in str(w.message) for w in caught)


def test_matching_loss_backward_op_is_differentiable():
    g = torch.Generator().manual_seed(0)
    v, x0, x1 = (torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad_loss = torch.rand(3, generator=g, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.autograd.gradcheck(
            lambda gl, a, b, c: ops.flow_matching_loss_backward(gl, a, b, c, 1e-5, True, True), (grad_loss, v, x0, x1))
        loss = ops.flow_matching_loss(v, x0, x1, 1e-5).sum()
        (grad_v,) = torch.autograd.grad(loss, v, create_graph=True)
        grad_v.sum().backward()
    assert _no_missing_kernel_warning(caught), [str(w.message) for w in caught]
    # d/dv of sum(d loss/dv) = 2 / M per element, summed over the sample's elements: 2 * count / M = 2 per row
    torch.testing.assert_close(v.grad, torch.full_like(v, 2.0 / 20))


def test_interpolate_backward_op_is_differentiable_and_warning_free():
    g = torch.Generator().manual_seed(1)
    grad_x_t, grad_v = (torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t = torch.rand(2, generator=g, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.autograd.gradcheck(
            lambda a, b, c: ops.flow_interpolate_backward(a, b, c, 1e-5, True, True), (grad_x_t, grad_v, t))
        x0, x1 = (torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
        x_t, v_target = ops.flow_interpolate(x0, x1, t.detach(), 1e-5, True)
        loss = ops.flow_matching_loss(x_t, None, v_target, 1e-5).sum()  # velocity_loss's path
        grads = torch.autograd.grad(loss, (x0, x1), create_graph=True)
        sum(grad.sum() for grad in grads).backward()
    assert _no_missing_kernel_warning(caught), [str(w.message) for w in caught]
