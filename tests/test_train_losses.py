"""The tokenizer's training losses equal the official formulas on fixed inputs (vq_loss.py, lpips.py)."""

import pytest
import torch
import torch.nn.functional as F

from tokenflow_ext.train import losses


def _direct_lpips(lpips, x, y):
    """LPIPS from the raw weights with functional ops: torchvision VGG16 taps relu1_2 ... relu5_3."""
    shift, scale = lpips.shift, lpips.scale
    convs = [m for m in lpips.features if isinstance(m, torch.nn.Conv2d)]
    plan = [2, 2, 3, 3, 3]  # convs per block; LPIPS reads the relu after each block's last conv
    hx, hy = (x - shift) / scale, (y - shift) / scale
    total, c = 0.0, 0
    for block, count in enumerate(plan):
        if block:
            hx, hy = F.max_pool2d(hx, 2), F.max_pool2d(hy, 2)
        for _ in range(count):
            hx = F.relu(F.conv2d(hx, convs[c].weight, convs[c].bias, padding=1))
            hy = F.relu(F.conv2d(hy, convs[c].weight, convs[c].bias, padding=1))
            c += 1
        nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        head = getattr(lpips, f"lin{block}").model[1].weight
        total = total + F.conv2d((nx - ny) ** 2, head).mean((2, 3), keepdim=True)
    return total


def test_lpips_random_weights_match_direct_vgg_computation():
    torch.manual_seed(0)
    lpips = losses.LPIPS()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    got = lpips(x, y)
    assert got.shape == (2, 1, 1, 1)
    torch.testing.assert_close(got, _direct_lpips(lpips, x, y), rtol=1e-5, atol=1e-6)
    assert torch.allclose(lpips(x, x), torch.zeros(2, 1, 1, 1))
    assert not any(p.requires_grad for p in lpips.parameters())
    assert not lpips.train().training  # the heads' dropout never runs


def test_lpips_loads_torchvision_and_lpips_files(tmp_path):
    torch.manual_seed(0)
    reference = losses.LPIPS()
    vgg = {k: v for k, v in reference.state_dict().items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier too: ignored
    heads = {k: v for k, v in reference.state_dict().items() if k.startswith("lin")}
    assert sorted(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
    assert "features.28.weight" in vgg  # torchvision's layer names
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "vgg.pth")
    loaded = losses.LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        losses.LPIPS.from_files(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="lack"):
        losses.LPIPS.from_files(tmp_path / "vgg16.pth")  # heads missing


def test_gan_losses_match_the_official_formulas():
    real = torch.tensor([[-2.0, 0.5], [1.5, 3.0]])
    fake = torch.tensor([[0.2, -1.5], [-0.7, 2.0]])
    hinge = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
    vanilla = 0.5 * (torch.log1p(torch.exp(-real)).mean() + torch.log1p(torch.exp(fake)).mean())
    torch.testing.assert_close(losses.hinge_d_loss(real, fake), hinge)
    torch.testing.assert_close(losses.vanilla_d_loss(real, fake), vanilla)
    torch.testing.assert_close(losses.non_saturating_d_loss(real, fake), vanilla)  # BCE(real,1) + BCE(fake,0)
    torch.testing.assert_close(losses.hinge_gen_loss(fake), -fake.mean())
    torch.testing.assert_close(losses.non_saturating_gen_loss(fake), torch.log1p(torch.exp(-fake)).mean())
    assert float(losses.hinge_d_loss(real, fake)) == pytest.approx(0.5 * ((3 + 0.5 + 0 + 0) / 4 + (1.2 + 0 + 0.3 + 3) / 4))


def test_disc_start_schedule_and_adaptive_weight():
    assert losses.adopt_weight(0.5, 19999, threshold=20000) == 0.0
    assert losses.adopt_weight(0.5, 20000, threshold=20000) == 0.5
    torch.manual_seed(0)
    last = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    nll = (x @ last).pow(2).mean()
    g = -(x @ last).mean() * 3
    got = losses.adaptive_weight(nll, g, last)
    expected = torch.autograd.grad(nll, last, retain_graph=True)[0].norm() / (
        torch.autograd.grad(g, last, retain_graph=True)[0].norm() + 1e-4)
    torch.testing.assert_close(got, expected.clamp(0, 1e4))
    assert not got.requires_grad


def test_semantic_loss_is_one_minus_cosine():
    g = torch.Generator().manual_seed(0)
    rec, target = torch.randn(2, 9, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    expected = (1 - F.cosine_similarity(rec, target, dim=-1)).mean()
    torch.testing.assert_close(losses.semantic_loss(rec, target), expected)


def test_patchgan_layout_and_init():
    torch.manual_seed(0)
    d = losses.PatchGANDiscriminator(3, 64, 3)
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    # the official NLayerDiscriminator's keys (taming layout): convs at main.0, 2, 5, 8, 11
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and shapes["main.2.weight"] == (128, 64, 4, 4)
    assert shapes["main.5.weight"] == (256, 128, 4, 4) and shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.11.weight"] == (1, 512, 4, 4) and "main.2.bias" not in shapes
    assert abs(float(d.main[8].weight.detach().std()) - 0.02) < 2e-3
    assert d(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)
