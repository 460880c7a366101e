"""The models' inference speed paths (channels-last pixel CNN, fused q/k/v, SDPA, opt-in bf16 autocast) against
the official-style eager paths of :mod:`tokenflow_ext.reference.official_models`, on tiny configs; and the
whole-model benchmark callables at a tiny size. No timing assertions."""

import pytest
import torch

from tokenflow_ext.bench.models import (
    FlowTokSampleProblem,
    TokenizerProblem,
    run_flowtok_sample_case,
    run_tokenizer_case,
)
from tokenflow_ext.models import FlowTok
from tokenflow_ext.models._layers import projected_attention
from tokenflow_ext.models.tokenflow.pixel_cnn import AttnBlock, PixelDecoder, PixelEncoder
from tokenflow_ext.reference.official_models import (
    OfficialStyleFlowTransformer,
    OfficialStyleTokenFlow,
    official_flowtok_sample,
    official_pixel_decoder,
    official_pixel_encoder,
)

from tokenflow_tiny import TINY_VARIANTS, tiny_images, tiny_tokenizer

TINY_FLOW = dict(clip_dim=24, text_layers=1, text_heads=2, text_hidden=32, text_dropout=0.0)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_flow(seed=0, preset=(2, 32, 2)):
    torch.manual_seed(seed)
    model = FlowTok(preset, text_encoder=False, tokenizer=False, **TINY_FLOW).eval()
    for parameter in model.nnet.final_layer.parameters():  # a non-zero velocity
        torch.nn.init.normal_(parameter, std=0.02)
    return model


# ----------------------------------------------------------------------------------------- TokenFlow


@pytest.mark.parametrize("name", ["clipb_256", "siglip_384"])
def test_official_style_tokenflow_loads_the_same_state_dict(name):
    tokenizer = tiny_tokenizer(name).eval()
    official = OfficialStyleTokenFlow(tokenizer.config)
    official.load_state_dict(tokenizer.state_dict(), strict=True)
    assert list(official.state_dict()) == list(tokenizer.state_dict())


@pytest.mark.parametrize("name", ["clipb_256", "siglip_384"])
def test_fp32_encode_and_decode_match_the_official_style_path(name):
    tokenizer = tiny_tokenizer(name).eval()
    official = OfficialStyleTokenFlow.like(tokenizer).eval()
    images = tiny_images(tokenizer, batch=4)
    features, _, indices = tokenizer.encode(images)
    expected_features, _, expected_indices = official.official_encode(images)
    assert torch.equal(tokenizer.tokenize(images), expected_indices)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(features, expected_features, atol=1e-5, rtol=1e-5)
    image = tokenizer.decode_indices(indices)
    semantic, expected_image = official.official_decode_code(indices)
    torch.testing.assert_close(image, expected_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tokenizer.decode(features).semantic, semantic, atol=1e-5, rtol=1e-5)


def test_pixel_encoder_channels_last_inference_matches_nchw_and_the_official_formulation():
    tokenizer = tiny_tokenizer("clipb_256")
    encoder = tokenizer.encoder.eval()
    assert isinstance(encoder, PixelEncoder) and isinstance(tokenizer.decoder, PixelDecoder)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # the channels-last path
        z = encoder(x)
        assert z.is_contiguous()
        torch.testing.assert_close(z, official_pixel_encoder(encoder, x), atol=1e-5, rtol=1e-5)
    z_grad = encoder(x)  # autograd on: the NCHW training path
    assert z_grad.requires_grad
    torch.testing.assert_close(z, z_grad.detach(), atol=1e-5, rtol=1e-5)


def test_pixel_decoder_channels_last_matches_the_official_formulation():
    tokenizer = tiny_tokenizer("clipb_256")
    decoder = tokenizer.decoder.eval()
    z = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(decoder(z), official_pixel_decoder(decoder, z), atol=1e-5, rtol=1e-5)


def test_attn_block_nhwc_path_and_its_fused_weight_cache():
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 5, 5)
    reference = block(x)  # grad enabled: the NCHW path with three convolutions
    with torch.no_grad():
        fast = block(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(fast, reference.detach(), atol=1e-5, rtol=1e-5)
        block.k.weight.mul_(2.0)  # an in-place change must not leave the cached q|k|v matrix stale
        changed = block(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(changed, block(x).detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed, fast)


def test_projected_attention_fused_inference_matches_separate_projections():
    torch.manual_seed(0)
    projections = [torch.nn.Linear(16, 16) for _ in range(4)]
    x = torch.randn(3, 7, 16)
    separate = projected_attention(x, *projections, heads=2)
    with torch.no_grad():
        fused = projected_attention(x, *projections, heads=2)
        torch.testing.assert_close(fused, separate.detach(), atol=1e-6, rtol=1e-6)
        projections[2].load_state_dict({"weight": torch.randn(16, 16), "bias": torch.randn(16)})
        reloaded = projected_attention(x, *projections, heads=2)
    torch.testing.assert_close(reloaded, projected_attention(x, *projections, heads=2).detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["clipb_256", "siglip_384"])
def test_bf16_autocast_paths_run_and_stay_near_fp32(name):
    tokenizer = tiny_tokenizer(name).eval()
    images = tiny_images(tokenizer, batch=4)
    exact = tokenizer.tokenize(images)
    approx = tokenizer.tokenize(images, autocast_dtype=torch.bfloat16)
    assert approx.dtype == torch.int64 and approx.shape == exact.shape
    assert 0 <= int(approx.min()) and int(approx.max()) < tokenizer.config.codebook_size
    agreement = (approx == exact).float().mean().item()
    print(f"{name}: bf16 autocast keeps {agreement:.1%} of the fp32 indices")
    assert agreement > 0.0
    features, _, _ = tokenizer.encode(images, autocast_dtype=torch.bfloat16)
    assert features.dtype == torch.float32
    image = tokenizer.decode_indices(exact)
    image_bf16 = tokenizer.decode_indices(exact, autocast_dtype=torch.bfloat16)
    assert image_bf16.dtype == torch.float32 and image_bf16.shape == image.shape
    assert (image_bf16 - image).abs().max().item() < 0.1 * max(1.0, image.abs().max().item())
    with pytest.raises(ValueError, match="autocast_dtype"):
        tokenizer.tokenize(images, autocast_dtype=torch.float64)


# ----------------------------------------------------------------------------------------- FlowTok


def test_official_style_flow_transformer_has_the_same_state_dict_and_outputs():
    model = tiny_flow()
    official = OfficialStyleFlowTransformer.like(model.nnet)
    assert list(official.state_dict()) == list(model.nnet.state_dict())
    x, t = torch.randn(3, 77, 16), torch.rand(3)
    null = torch.tensor([False, True, False])
    with torch.no_grad():
        torch.testing.assert_close(model.nnet(x, t, null), official(x, t, null), atol=1e-5, rtol=1e-5)


def test_generate_matches_the_official_two_pass_sampler_and_bf16_stays_close():
    model = tiny_flow()
    official = OfficialStyleFlowTransformer.like(model.nnet)
    features = torch.randn(3, 77, 24, generator=torch.Generator().manual_seed(0))
    latents = model.generate(features, num_steps=4, decode=False, generator=torch.Generator().manual_seed(1))
    x0, _, _ = model.nnet.encode_text(features, generator=torch.Generator().manual_seed(1))
    expected = official_flowtok_sample(official, x0, 4, 2.0)
    scale = expected.abs().max().item()
    assert (latents - expected).abs().max().item() <= 1e-3 * max(1.0, scale)
    approx = model.generate(features, num_steps=4, decode=False, generator=torch.Generator().manual_seed(1),
                            autocast_dtype=torch.bfloat16)
    assert approx.dtype == torch.float32
    error = (approx - expected).abs().max().item()
    print(f"FlowTok bf16 autocast: max |latent diff| {error:.2e} (|max| {scale:.2f})")
    assert error < 0.05 * max(1.0, scale)


# ----------------------------------------------------------------------------------------- bench callables


@pytest.mark.parametrize("op", ["encode", "decode"])
@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_tokenizer_bench_rows_run_at_a_tiny_size(op, autocast):
    problem = TokenizerProblem("clipb_256", 2, op=op, autocast=autocast, overrides=TINY_VARIANTS["clipb_256"])
    rows = run_tokenizer_case(problem, "cpu")
    assert [row.dtype for row in rows] == ["float32"] + ([] if autocast is None else ["bf16-autocast"])
    for row in rows:
        assert row.ok, row.agreement
        assert row.baseline == "official-eager" and ("bf16" in row.agreement) == (row.dtype != "float32")
    assert len({row.baseline_ms for row in rows}) == 1  # one baseline timing shared by both rows


@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_flowtok_bench_row_runs_at_a_tiny_size(autocast):
    problem = FlowTokSampleProblem((2, 32, 2), batch=2, steps=2, autocast=autocast, flow_kwargs=TINY_FLOW)
    rows = run_flowtok_sample_case(problem, "cpu")
    assert len(rows) == (1 if autocast is None else 2)
    for row in rows:
        assert row.ok, row.agreement
        assert row.ours_ms > 0 and row.baseline_ms > 0
