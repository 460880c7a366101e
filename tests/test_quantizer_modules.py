import random

import pytest
import torch
import torch.nn.functional as F

from tokenflow_ext.bench.timing import peak_extra_memory
from tokenflow_ext.nn import SCALE_PRESETS, DualCodebookQuantizer, MultiScaleQuantizer
from tokenflow_ext.reference import official_multiscale_encode, official_quantizer_forward

FIXTURE = [2755, 3485, 24588, 13797, 31719, 30217, 4913, 20538]


def official_codebooks(seed, size=32768, widths=(32, 8)):
    torch.manual_seed(seed)
    books = []
    for width in widths:
        embedding = torch.nn.Embedding(size, width)
        embedding.weight.data.uniform_(-1.0 / size, 1.0 / size)
        books.append(F.normalize(embedding.weight.data, p=2, dim=-1))
    return books


def small_quantizer(seed=0, size=512, **kwargs):
    torch.manual_seed(seed)
    q = DualCodebookQuantizer(size, **kwargs)
    with torch.no_grad():  # spread the codes out (the official init puts them near a few directions)
        q.embedding_vqkd.weight.normal_()
        q.embedding_vqgan.weight.normal_()
    return q


def test_initialisation_and_parity_fixture_match_the_official_code():
    torch.manual_seed(0)
    q = DualCodebookQuantizer(32768, 32, 8, 0.25, 0.0, True, True).eval()
    semantic, pixel = official_codebooks(0)
    assert torch.equal(q.embedding_vqkd.weight, semantic) and torch.equal(q.embedding_vqgan.weight, pixel)
    torch.manual_seed(1)
    z = torch.randn(2, 40, 4, 4)
    z_q, losses, (perplexity, encodings, indices) = q(z)
    assert indices[:8].tolist() == FIXTURE and indices.shape == (32,) and indices.dtype == torch.int64
    assert perplexity is None and encodings is None
    assert losses[:4] == (None, None, None, 0)
    assert z_q.shape == z.shape


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("entropy_ratio", [0.0, 0.1])
def test_forward_and_gradients_match_the_official_formulation(training, entropy_ratio):
    q = small_quantizer(entropy_loss_ratio=entropy_ratio).train(training)
    torch.manual_seed(2)
    z = torch.randn(3, 40, 5, 6)
    z_ours, z_ref = z.clone().requires_grad_(), z.clone().requires_grad_()
    weights_ref = [q.embedding_vqkd.weight.detach().clone().requires_grad_(),
                   q.embedding_vqgan.weight.detach().clone().requires_grad_()]
    z_q, losses, (_, _, indices) = q(z_ours)
    ref_q, ref_losses, ref_indices = official_quantizer_forward(z_ref, *weights_ref, training=training,
                                                                entropy_loss_ratio=entropy_ratio)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(z_q, ref_q, atol=1e-6, rtol=1e-6)
    vq, commit, entropy, usage, d_norm_s, d_norm_p = losses
    torch.testing.assert_close(d_norm_s, ref_losses[3], rtol=1e-5, atol=0)
    torch.testing.assert_close(d_norm_p, ref_losses[4], rtol=1e-5, atol=0)
    if not training:
        assert (vq, commit, entropy, usage) == (None, None, None, 0)
        return
    for ours, ref in zip((vq, commit, entropy), ref_losses[:3]):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    window = torch.cat([indices, torch.zeros(1, dtype=torch.long)])  # the zero-filled window also counts code 0
    assert usage == pytest.approx(torch.unique(window).numel() / 512)
    weight = torch.linspace(0.5, 1.5, 40).reshape(1, 40, 1, 1)
    (vq + commit + entropy + (z_q * weight).sum()).backward()
    (ref_losses[0] + ref_losses[1] + ref_losses[2] + (ref_q * weight).sum()).backward()
    torch.testing.assert_close(z_ours.grad, z_ref.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q.embedding_vqkd.weight.grad, weights_ref[0].grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q.embedding_vqgan.weight.grad, weights_ref[1].grad, atol=1e-6, rtol=1e-5)


def test_official_state_dict_loads_strictly_and_mismatches_fail():
    semantic, pixel = official_codebooks(3, size=256)
    official = {"embedding_vqkd.weight": semantic, "embedding_vqgan.weight": pixel,
                "codebook_used": torch.nn.Parameter(torch.zeros(131072))}  # the official buffer holds a Parameter
    q = DualCodebookQuantizer(256)
    q.load_state_dict(official, strict=True)
    assert torch.equal(q.embedding_vqkd.weight, semantic)
    assert set(q.state_dict()) == set(official)
    with pytest.raises(RuntimeError, match="Missing key"):
        q.load_state_dict({"embedding_vqkd.weight": semantic, "codebook_used": torch.zeros(131072)}, strict=True)


def test_usage_window_trains_on_cpu_and_handles_large_batches():
    q = small_quantizer(size=64, usage_window=100).train()
    z = torch.randn(1, 40, 4, 4)
    _, losses, (_, _, indices) = q(z)  # official: "a view of a leaf Variable that requires grad" on the CPU
    assert q.codebook_used[-16:].tolist() == indices.float().tolist()
    assert losses[3] == pytest.approx(torch.unique(torch.cat([indices, torch.zeros(1, dtype=torch.long)])).numel() / 64)
    big = torch.randn(2, 40, 10, 10)  # 200 indices > the 100-long window
    _, losses, (_, _, indices) = q(big)
    assert q.codebook_used.tolist() == indices[-100:].float().tolist()
    assert losses[3] == pytest.approx(torch.unique(indices[-100:]).numel() / 64)


def test_bad_input():
    q = small_quantizer(size=16)
    with pytest.raises(ValueError, match=r"z must be \(B, 40, H, W\)"):
        q(torch.randn(2, 39, 3, 3))
    with pytest.raises(ValueError, match="pixel_weight must be >= 0"):
        DualCodebookQuantizer(16, pixel_weight=-1)


@pytest.mark.parametrize("preset,tokens", [("clipb_224", 561), ("clipb_256", 817), ("vitamin_256", 817),
                                           ("siglip_384", 2227)])
def test_scale_presets(preset, tokens):
    ms = MultiScaleQuantizer(small_quantizer(size=32), preset)
    assert ms.tokens_per_image == tokens == sum(s * s for s in SCALE_PRESETS[preset])


@pytest.mark.parametrize("preset", ["clipb_224", "siglip_384"])
def test_multiscale_matches_the_official_loop_and_decodes(preset):
    q = small_quantizer(size=256).eval()
    ms = MultiScaleQuantizer(q, preset).eval()
    size = ms.scales[-1]
    torch.manual_seed(4)
    h = torch.randn(2, 40, size, size)
    features, losses, indices = ms(h)
    ref_features, ref_losses, ref_indices = official_multiscale_encode(h, q.embedding_vqkd.weight,
                                                                       q.embedding_vqgan.weight, ms.scales)
    assert indices.shape == (2, ms.tokens_per_image) and torch.equal(indices, ref_indices)
    torch.testing.assert_close(features, ref_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses[4], ref_losses[3], rtol=1e-5, atol=0)
    assert losses[:3] == (None, None, None)
    torch.testing.assert_close(ms.decode_indices(indices), features, atol=1e-5, rtol=1e-5)
    prefix = sum(s * s for s in ms.scales[:3])
    partial = ms.decode_indices(indices[:, :prefix])
    expected = sum(F.interpolate(q.get_codebook_entry(indices[:, start:start + s * s]).reshape(2, s, s, 40)
                                 .permute(0, 3, 1, 2), size=(size, size), mode="bicubic")
                   for s, start in zip(ms.scales[:3], (0, 1, 1 + ms.scales[1] ** 2)))
    torch.testing.assert_close(partial, expected)
    with pytest.raises(ValueError, match="is no prefix of scales"):
        ms.decode_indices(indices[:, :prefix + 1])
    with pytest.raises(ValueError, match=rf"h must be \(B, C, {size}, {size}\)"):
        ms(torch.randn(1, 40, size + 1, size + 1))


def test_multiscale_training_gradients_and_scale_drop():
    q = small_quantizer(size=128)
    always_drop = MultiScaleQuantizer(q, "clipb_224", drop_probability=1.0, rng=random.Random(0)).train()
    h = torch.randn(2, 40, 14, 14, requires_grad=True)
    features, losses, indices = always_drop(h)
    assert indices.shape[1] in {561 - s * s for s in always_drop.scales[1:]}  # exactly one scale (not the first) dropped
    (losses[0] + losses[1] + features.square().mean()).backward()
    assert h.grad.abs().sum() > 0 and q.embedding_vqkd.weight.grad.abs().sum() > 0
    never_drop = MultiScaleQuantizer(q, "clipb_224", drop_probability=0.0).train()
    assert never_drop(h)[2].shape == (2, 561)
    assert MultiScaleQuantizer(q, "clipb_224", drop_probability=1.0).eval()(h)[2].shape == (2, 561)
    with pytest.raises(ValueError, match="cannot drop 7 of 8 scales"):
        MultiScaleQuantizer(q, "clipb_224", drop_count=7)
    with pytest.raises(ValueError, match="unknown preset"):
        MultiScaleQuantizer(q, "clipb_512")


def test_quantizer_memory_stays_bounded():
    """One siglip batch of 4 images: 8908 rows x 32768 codes, where the official code keeps ~6 N x K matrices
    (one scale alone, 2916 x 32768 fp32, is 382 MB each)."""
    torch.manual_seed(5)
    ms = MultiScaleQuantizer(DualCodebookQuantizer(32768), "siglip_384").eval()
    h = torch.randn(4, 40, 27, 27)
    with torch.no_grad():
        peak = peak_extra_memory(lambda: ms(h), "cpu")
    assert peak is not None and peak < 128 * 2**20, f"{peak / 2**20:.0f} MiB"


def one_hot_ema_reference(semantic, pixel, samples, indices, decay):
    """The official EMA step written with a one-hot, extended to both codebooks."""
    one_hot = F.one_hot(indices, semantic.shape[0]).float()
    bins = one_hot.sum(0)
    new = []
    for old, part in ((semantic, samples[:, :32]), (pixel, samples[:, 32:])):
        mean = F.normalize((one_hot.t() @ part) / bins.clamp_min(1)[:, None], dim=-1)
        mean = torch.where((bins == 0)[:, None], old, mean)
        new.append(F.normalize(decay * old + (1 - decay) * mean, dim=-1))
    return new


def test_ema_step_matches_the_one_hot_formulation():
    q = small_quantizer(size=64, ema=True, ema_decay=0.9).train()
    assert not q.embedding_vqkd.weight.requires_grad
    before = [F.normalize(q.embedding_vqkd.weight.detach().clone(), dim=-1),
              F.normalize(q.embedding_vqgan.weight.detach().clone(), dim=-1)]
    q.embedding_vqkd.weight.data.copy_(before[0])
    q.embedding_vqgan.weight.data.copy_(before[1])
    z = torch.randn(2, 40, 6, 6, requires_grad=True)
    z_q, losses, (_, _, indices) = q(z)
    samples = torch.cat([F.normalize(z.detach().permute(0, 2, 3, 1)[..., :32], dim=-1),
                         F.normalize(z.detach().permute(0, 2, 3, 1)[..., 32:], dim=-1)], -1).reshape(-1, 40)
    expected = one_hot_ema_reference(*before, samples, indices, 0.9)
    torch.testing.assert_close(q.embedding_vqkd.weight, expected[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q.embedding_vqgan.weight, expected[1], atol=1e-6, rtol=1e-5)
    codes = torch.cat(before, -1)[indices].reshape(2, 6, 6, 40)  # z_q uses the codes before the update
    torch.testing.assert_close(z_q.permute(0, 2, 3, 1), codes, atol=1e-6, rtol=1e-6)
    assert losses[0] == 0
    squared = (codes - samples.reshape(2, 6, 6, 40)) ** 2
    torch.testing.assert_close(losses[1], 0.25 * (squared[..., :32].mean() + squared[..., 32:].mean()))
    losses[1].backward()
    assert z.grad.abs().sum() > 0


def test_kmeans_init_clusters_both_codebooks():
    torch.manual_seed(6)
    centers = torch.randn(8, 40)
    z = (centers[torch.arange(8).repeat(32)] + 0.01 * torch.randn(256, 40)).reshape(4, 8, 8, 40).permute(0, 3, 1, 2)
    q = DualCodebookQuantizer(64, kmeans_init=True).train()
    q(z)
    assert bool(q.kmeans_initted)
    found = torch.cat([q.embedding_vqkd.weight, q.embedding_vqgan.weight], dim=1)
    unit_centers = torch.cat([F.normalize(centers[:, :32], dim=-1), F.normalize(centers[:, 32:], dim=-1)], dim=1)
    similarity = found[:, :32] @ unit_centers[:, :32].t() + found[:, 32:] @ unit_centers[:, 32:].t()
    assert similarity.max(dim=0).values.min() > 1.99  # every planted center is recovered, in both parts
    assert similarity.max(dim=1).values.min() > 1.99  # and every code sits on one (the pixel part is set too)
    before = found.clone()
    q(z)  # initialised once only
    assert torch.equal(torch.cat([q.embedding_vqkd.weight, q.embedding_vqgan.weight], dim=1), before)


def test_distributed_ranks_keep_identical_codebooks(tmp_path):
    """2 processes (gloo, CPU, loopback): k-means on all-gathered samples, all-reduced EMA statistics."""
    import torch.multiprocessing as mp
    from dist_worker import make_batches, run, train_quantizer

    mp.spawn(run, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0]["semantic"], ranks[1]["semantic"]) and torch.equal(ranks[0]["pixel"], ranks[1]["pixel"])
    # the same as one process that sees both ranks' batches at once
    single = train_quantizer([torch.cat(pair) for pair in zip(make_batches(0), make_batches(1))])
    torch.testing.assert_close(ranks[0]["semantic"], single[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ranks[0]["pixel"], single[1], atol=1e-5, rtol=1e-5)


def test_d_norm_logging_values_follow_the_model_dtype():
    """Issue 12 (6): the official d_norm values have the dtype of its N x K formula (z with the codebooks)."""
    q = small_quantizer(size=64, pixel_weight=1.0).double()
    z = torch.randn(2, 40, 3, 3, dtype=torch.float64)
    _, losses, _ = q(z)
    _, ref_losses, _ = official_quantizer_forward(z, q.embedding_vqkd.weight, q.embedding_vqgan.weight)
    assert losses[4].dtype == losses[5].dtype == ref_losses[3].dtype == torch.float64
    q16 = small_quantizer(size=64).to(torch.bfloat16)
    _, losses, _ = q16(torch.randn(2, 40, 3, 3, dtype=torch.bfloat16))
    assert losses[4].dtype == losses[5].dtype == torch.bfloat16


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("device, dtype", [("cpu", torch.bfloat16),
                                           pytest.param("cuda", torch.float16, marks=pytest.mark.cuda),
                                           pytest.param("cuda", torch.bfloat16, marks=pytest.mark.cuda)])
def test_autocast_and_mixed_dtypes(training, device, dtype):
    """Issue 12 (7): low-precision features from an autocast region (or fp16 z) meet fp32 codebooks, as in
    the official eager module."""
    q = small_quantizer(size=64, entropy_loss_ratio=0.1).train(training).to(device)
    conv = torch.nn.Conv2d(40, 40, 1).to(device)
    torch.manual_seed(5)
    z = torch.randn(2, 40, 4, 4, device=device)
    with torch.autocast(device, dtype):
        features = conv(z)
        assert features.dtype == dtype
        z_q, losses, (_, _, indices) = q(features)
        ref_q, _, ref_indices = official_quantizer_forward(features, q.embedding_vqkd.weight,
                                                           q.embedding_vqgan.weight)
    # the fp32 search of the (exact) bf16 features agrees with the eager formula outside its bf16 einsum
    expected = official_quantizer_forward(features.float(), q.embedding_vqkd.weight.detach(),
                                          q.embedding_vqgan.weight.detach())[2]
    assert torch.equal(indices, expected)
    assert (indices == ref_indices).double().mean() >= 0.9  # the official one rounds its distances to bf16
    assert z_q.dtype == ref_q.dtype == torch.float32
    if training:
        (z_q.sum() + losses[0] + losses[1] + losses[2]).backward()
        assert conv.weight.grad is not None and q.embedding_vqkd.weight.grad is not None
    # fp16 z with fp32 codebooks, no autocast
    half = z.half()
    z_q, _, (_, _, indices) = q(half)
    expected = official_quantizer_forward(half.float(), q.embedding_vqkd.weight.detach(),
                                          q.embedding_vqgan.weight.detach())[2]
    assert torch.equal(indices, expected) and z_q.dtype == torch.float32


@pytest.mark.parametrize("ema", [False, True])
def test_empty_training_batch_gives_zero_losses_with_a_warning(ema):
    q = DualCodebookQuantizer(codebook_size=16, semantic_dim=4, pixel_dim=2, ema=ema).train()
    z = torch.randn(0, 6, 3, 3, requires_grad=True)
    with pytest.warns(UserWarning, match="empty training batch"):
        z_q, (vq_loss, commit_loss, entropy, _, d_sem, d_pix), _ = q(z)
    assert z_q.shape == (0, 6, 3, 3)
    for value in (vq_loss, commit_loss, entropy, d_sem, d_pix):
        assert torch.isfinite(value).all() and float(value.detach()) == 0.0
    (vq_loss + commit_loss).backward()
    assert z.grad is not None and z.grad.shape == z.shape
