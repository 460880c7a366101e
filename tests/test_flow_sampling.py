import math

import pytest
import torch
from helpers import DEVICES

from tokenflow_ext import flow
from tokenflow_ext.reference import matching_loss_reference, sample_reference


@pytest.mark.parametrize("num_steps", [1, 20, 50])
def test_flowtok_grid_matches_the_official_schedule(num_steps):
    grid = flow.time_grid(num_steps, "flowtok")
    times = [t for t, _ in grid]
    steps = {dt for _, dt in grid}
    assert steps == {(1 - 1e-5) / num_steps}
    assert times == torch.linspace(0, 1 - 1e-5, num_steps).tolist()
    if num_steps == 20:
        assert times[1] == pytest.approx(0.0526311, abs=1e-7) and times[-1] == pytest.approx(0.99999, abs=1e-7)
        assert grid[0][1] == pytest.approx(0.0499995, abs=1e-9)


def test_uniform_grid_is_left_endpoints_and_reverse_mirrors():
    assert flow.time_grid(4) == [(0.0, 0.25), (0.25, 0.25), (0.5, 0.25), (0.75, 0.25)]
    assert flow.time_grid(4, reverse=True) == [(1.0, -0.25), (0.75, -0.25), (0.5, -0.25), (0.25, -0.25)]
    reverse_flowtok = flow.time_grid(3, "flowtok", reverse=True)
    assert [t for t, _ in reverse_flowtok] == torch.linspace(1 - 1e-5, 0, 3).tolist()
    assert all(dt == -(1 - 1e-5) / 3 for _, dt in reverse_flowtok)
    with pytest.raises(ValueError, match="kind must be one of"):
        flow.time_grid(4, "cosine")
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        flow.time_grid(0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("time_grid", ["uniform", "flowtok"])
def test_constant_field_is_integrated_exactly(device, time_grid):
    """v = c: Euler is exact, x(1) = x0 + c * total_time (total_time = 1, or 1 - 1e-5 on FlowTok's grid)."""
    x0 = torch.randn(3, 77, 16, dtype=torch.float64, device=device)
    c = torch.randn(1, 77, 16, dtype=torch.float64, device=device)
    out = flow.sample(lambda x, t: c.expand_as(x), x0, num_steps=10, guidance_scale=1.0, time_grid=time_grid,
                      progress=False)
    total = 1.0 if time_grid == "uniform" else 1 - 1e-5
    torch.testing.assert_close(out, x0 + total * c, rtol=1e-12, atol=1e-12)
    back = flow.sample(lambda x, t: c.expand_as(x), out, num_steps=10, guidance_scale=1.0, time_grid=time_grid,
                       reverse=True, progress=False)
    torch.testing.assert_close(back, x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_linear_field_has_the_closed_form_of_euler(device):
    """v = a x: each Euler step multiplies by (1 + a dt), so x_N = x0 (1 + a/N)^N on the uniform grid."""
    a, steps = -0.7, 20
    x0 = torch.randn(2, 77, 16, dtype=torch.float64, device=device)
    out = flow.sample(lambda x, t: a * x, x0, num_steps=steps, guidance_scale=1.0, progress=False)
    torch.testing.assert_close(out, x0 * (1 + a / steps) ** steps, rtol=1e-12, atol=1e-12)
    assert (1 + a / steps) ** steps == pytest.approx(math.exp(a), rel=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["pair", "stacked"])
@pytest.mark.parametrize("time_grid", ["uniform", "flowtok"])
def test_guided_sampler_reproduces_the_eager_loop(device, layout, time_grid):
    """A time-dependent toy model with a conditional and an unconditional branch, CFG s = 2."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1, 77, 16, generator=g).to(device)
    drift = torch.randn(1, 77, 16, generator=g).to(device)

    def branches(x, t):
        tt = t.reshape(-1, 1, 1)
        return target - x + tt * drift, 0.5 * (target - x)

    def velocity(x, t):
        v_cond, v_uncond = branches(x, t)
        return (v_cond, v_uncond) if layout == "pair" else torch.cat([v_cond, v_uncond])

    x0 = torch.randn(4, 77, 16, generator=g).to(device)
    out = flow.sample(velocity, x0, num_steps=20, guidance_scale=2.0, time_grid=time_grid, progress=False)
    expected = sample_reference(branches, x0, flow.time_grid(20, time_grid), guidance_scale=2.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(out, x0)


def test_sample_leaves_x0_alone_and_shows_progress(capsys):
    x0 = torch.zeros(2, 3)
    out = flow.sample(lambda x, t: torch.ones_like(x), x0, num_steps=4, guidance_scale=1.0, progress=True)
    assert (x0 == 0).all() and torch.allclose(out, torch.ones(2, 3))
    assert "flow sampling" in capsys.readouterr().err


def test_velocity_receives_per_sample_times():
    seen = []
    flow.sample(lambda x, t: seen.append(t.clone()) or torch.zeros_like(x), torch.zeros(5, 2), num_steps=3,
                guidance_scale=1.0, progress=False)
    assert [s.shape for s in seen] == [(5,)] * 3 and [s[0].item() for s in seen] == pytest.approx([0, 1 / 3, 2 / 3])


def test_guidance_needs_both_branches():
    with pytest.raises(RuntimeError, match="needs the unconditional velocity"):
        flow.sample(lambda x, t: x, torch.zeros(2, 3), num_steps=2, guidance_scale=2.0, progress=False)


def test_logit_normal_timesteps():
    g = torch.Generator().manual_seed(0)
    t = flow.logit_normal_timesteps(200_000, generator=g)
    assert t.shape == (200_000,) and ((t > 0) & (t < 1)).all()
    logits = torch.log(t / (1 - t))
    assert abs(logits.mean().item()) < 0.01 and abs(logits.std().item() - 1) < 0.01
    shifted = flow.logit_normal_timesteps(1000, mean=2.0, std=0.5, generator=g)
    assert shifted.mean() > 0.8
    with pytest.raises(ValueError, match="std must be > 0"):
        flow.logit_normal_timesteps(4, std=0.0)


def test_flow_matching_loss_module():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(8, 77, 16, generator=g, requires_grad=True)
    x1 = torch.randn(8, 77, 16, generator=g, requires_grad=True)
    t = torch.rand(8, generator=g)
    layer = torch.nn.Linear(16, 16)
    model = lambda x_t, tt, scale=1.0: layer(x_t) * scale  # noqa: E731
    loss_fn = flow.FlowMatchingLoss()
    loss = loss_fn(model, x0, x1, t, scale=0.5)
    x_t = (1 - (1 - 1e-5) * t.reshape(-1, 1, 1)) * x0 + t.reshape(-1, 1, 1) * x1
    expected = matching_loss_reference(layer(x_t) * 0.5, x0, x1)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert x0.grad is not None and layer.weight.grad is not None
    assert x1.grad is None  # frozen-tokenizer default
    sampled = loss_fn(model, x0.detach(), x1.detach())  # samples logit-normal t itself
    assert sampled.shape == () and torch.isfinite(sampled)
    assert "x1_grad=False" in repr(loss_fn)


def test_graphed_sampler_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="example_x0 must be a CUDA tensor"):
        flow.GraphedSampler(lambda x, t: x, torch.zeros(2, 3))


@pytest.mark.cuda
@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_graphed_sampler_replays_the_eager_loop(guidance_scale):
    weight = torch.randn(16, 16, device="cuda") / 4

    def velocity(x, t):
        v = torch.tanh(x @ weight) * (1 + t[:, None, None])
        return v if guidance_scale == 1.0 else torch.cat([v, 0.5 * v])

    x0 = torch.randn(3, 77, 16, device="cuda")
    eager = flow.sample(velocity, x0, num_steps=20, guidance_scale=guidance_scale, time_grid="flowtok", progress=False)
    sampler = flow.GraphedSampler(velocity, x0, num_steps=20, guidance_scale=guidance_scale, time_grid="flowtok")
    torch.testing.assert_close(sampler(x0), eager, rtol=1e-6, atol=1e-6)
    other = torch.randn_like(x0)  # a replay reads the new input; in-place weight updates are seen
    weight.mul_(0.5)
    expected = flow.sample(velocity, other, num_steps=20, guidance_scale=guidance_scale, time_grid="flowtok",
                           progress=False)
    torch.testing.assert_close(sampler(other), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="x0 must be"):
        sampler(x0[:2])
