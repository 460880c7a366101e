"""TokenFlowTokenizer: official layout and sizes (meta device), encode/decode on tiny configs, checkpoints."""

import argparse
import os

import pytest
import torch
import torch.nn.functional as F

from tokenflow_ext.models import StateDictMismatchError, TokenFlowTokenizer
from tokenflow_ext.models.tokenflow import CONFIGS
from tokenflow_ext.models.tokenflow.pixel_cnn import AttnBlock
from tokenflow_ext.models.tokenflow.semantic_decoder import Attention

from tokenflow_tiny import TINY, TINY_VARIANTS, tiny_images, tiny_tokenizer


def meta_tokenizer(name, **overrides):
    with torch.device("meta"):
        return TokenFlowTokenizer(name, **overrides)


def numel(state, prefix=""):
    return sum(v.numel() for k, v in state.items() if k.startswith(prefix))


# ------------------------------------------------------------------------------------- official layout


def test_clipb_enhanced_matches_spec_layout_and_size():
    state = meta_tokenizer("clipb_256", enhanced_decoder=True).state_dict()
    assert numel(state) == pytest.approx(376.7e6, abs=0.05e6)
    expected_millions = {"encoder_vqkd.": 85.8, "decoder.": 237.1, "encoder.": 29.3, "decoder_vqkd.": 21.4,
                         "quantize.": 1.44}
    for prefix, millions in expected_millions.items():
        assert numel(state, prefix) / 1e6 == pytest.approx(millions, abs=0.05), prefix
    assert sum(k.startswith("encoder.") for k in state) == 144
    shapes = {
        "quant_conv.weight": (8, 256, 1, 1), "post_quant_conv.weight": (256, 8, 1, 1),
        "quantize.embedding_vqkd.weight": (32768, 32), "quantize.embedding_vqgan.weight": (32768, 8),
        "quantize.codebook_used": (131072,),
        "encoder_vqkd.positional_embedding": (197, 768), "encoder_vqkd.class_embedding": (768,),
        "encoder_vqkd.conv1.weight": (768, 3, 16, 16),
        "encoder_vqkd.transformer.resblocks.11.attn.in_proj_weight": (2304, 768),
        "encoder_vqkd.transformer.resblocks.11.mlp.c_proj.weight": (768, 3072), "encoder_vqkd.ln_post.bias": (768,),
        "decoder_vqkd.cls_token": (1, 1, 768), "decoder_vqkd.pos_embed": (1, 197, 768),
        "decoder_vqkd.patch_embed.proj.weight": (768, 32, 1, 1), "decoder_vqkd.blocks.2.attn.qkv.weight": (2304, 768),
        "decoder_vqkd.blocks.2.attn.q_bias": (768,), "decoder_vqkd.blocks.2.attn.v_bias": (768,),
        "decoder_vqkd.fc_norm.weight": (768,),
        "encode_task_layer.0.weight": (768, 768), "encode_task_layer.2.weight": (32, 768),
        "decode_task_layer.2.weight": (512, 768),
        "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3), "encoder.mid.1.q.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "decoder.conv_in.weight": (1024, 256, 3, 3), "decoder.conv_blocks.0.res.4.conv2.weight": (1024, 1024, 3, 3),
        "decoder.conv_blocks.0.attn.4.k.weight": (1024, 1024, 1, 1),
        "decoder.conv_blocks.3.upsample.conv.weight": (256, 256, 3, 3), "decoder.conv_out.weight": (3, 256, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("scaling_layer") for k in state)  # clipb: no input normalisation
    assert not any(k.startswith("encoder_vqkd.proj") for k in state)
    assert not any(".attn." in k and "conv_blocks.1." in k for k in state if k.startswith("decoder."))
    assert {k.split(".")[0] for k in state} == {"encoder", "decoder", "quant_conv", "post_quant_conv", "encoder_vqkd",
                                                "decoder_vqkd", "encode_task_layer", "decode_task_layer", "quantize"}


def test_normal_decoder_and_clipb_224():
    normal = meta_tokenizer("clipb_224").state_dict()
    assert numel(normal, "decoder.") / 1e6 == pytest.approx(42.4, abs=0.05)
    assert "decoder.conv_blocks.0.res.2.conv1.weight" in normal and "decoder.conv_blocks.0.res.3.conv1.weight" not in normal
    tokenizer = meta_tokenizer("clipb_224")
    assert tokenizer.tokens_per_image == 561 and tokenizer.scale_rq_layers == [1, 2, 4, 6, 8, 10, 12, 14]
    assert meta_tokenizer("clipb_256").tokens_per_image == 817


def test_siglip_384_layout():
    tokenizer = meta_tokenizer("siglip_384")
    state = tokenizer.state_dict()
    assert tokenizer.tokens_per_image == 2227 and tokenizer.config.pixel_size == 432
    prefix = "encoder_vqkd.vision_model."
    shapes = {
        prefix + "embeddings.patch_embedding.weight": (1152, 3, 14, 14),
        prefix + "embeddings.position_embedding.weight": (729, 1152),
        prefix + "encoder.layers.26.self_attn.q_proj.weight": (1152, 1152),
        prefix + "encoder.layers.26.mlp.fc1.weight": (4304, 1152),
        prefix + "encoder.layers.0.layer_norm2.bias": (1152,), prefix + "post_layernorm.weight": (1152,),
        prefix + "head.probe": (1, 1, 1152), prefix + "head.attention.in_proj_weight": (3456, 1152),
        prefix + "head.mlp.fc2.weight": (1152, 4304),
        "decoder_vqkd.pos_embed": (1, 730, 1152), "decoder_vqkd.blocks.0.attn.qkv.weight": (3456, 1152),
        "encode_task_layer.0.weight": (1152, 1152), "decode_task_layer.2.weight": (1152, 1152),
        "scaling_layer.shift": (1, 3, 1, 1), "scaling_layer.scale": (1, 3, 1, 1),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(k.startswith(prefix + "encoder.layers.") for k in state) == 27 * 16
    assert numel(state, "encoder_vqkd.") / 1e6 == pytest.approx(428.2, abs=0.1)  # so400m vision tower


def test_vitamin_needs_an_external_encoder():
    with pytest.raises(ValueError, match="semantic_encoder"):
        meta_tokenizer("vitamin_256")

    class StandIn(torch.nn.Module):  # the shape contract of timm's ViTamin forward_features
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 64, 8, stride=8)

        def forward_features(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    torch.manual_seed(0)
    tokenizer = TokenFlowTokenizer("vitamin_256", semantic_encoder=StandIn(),
                                   **dict(TINY, semantic_scaling="clip")).eval()
    assert "encoder_vqkd.proj.weight" in tokenizer.state_dict() and "scaling_layer.shift" in tokenizer.state_dict()
    assert tokenizer.tokenize(tiny_images(tokenizer)).shape == (2, 21)


# ------------------------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_train_forward_backward_reaches_every_trainable_part(name):
    tokenizer = tiny_tokenizer(name).train()
    tokenizer.residual_quantizer.random_scale_drop = False
    images = tiny_images(tokenizer)
    features, losses, indices = tokenizer.encode(images)
    semantic, image = tokenizer.decode(features)
    grid = tokenizer.config.semantic_grid
    assert features.shape == (2, 40, grid, grid) and indices.shape == (2, tokenizer.tokens_per_image)
    assert semantic.shape == (2, grid * grid, 48) and image.shape == images.shape
    vq_loss, commit_loss, entropy = losses[:3]
    (vq_loss + commit_loss + entropy + F.mse_loss(image, images) + semantic.square().mean()).backward()
    for part in ["encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight",
                 "decoder_vqkd.blocks.0.attn.q_bias", "encode_task_layer.0.weight", "decode_task_layer.2.weight",
                 "quantize.embedding_vqkd.weight", "quantize.embedding_vqgan.weight"]:
        grad = dict(tokenizer.named_parameters())[part].grad
        assert grad is not None and grad.abs().sum() > 0, part
    encoder_grads = [p.grad for n, p in tokenizer.named_parameters() if n.startswith("encoder_vqkd.")
                     and p.grad is not None and p.grad.abs().sum() > 0]
    assert encoder_grads  # the straight-through estimator reaches the semantic encoder


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_decode_indices_of_tokenize_equals_decode_of_encode(name):
    tokenizer = tiny_tokenizer(name).eval()
    images = tiny_images(tokenizer)
    with torch.no_grad():
        features, losses, indices = tokenizer.encode(images)
        assert losses[0] is None and losses[1] is None
        assert torch.equal(tokenizer.tokenize(images), indices)
        assert torch.allclose(tokenizer.features_from_indices(indices), features, atol=1e-6)
        from_indices = tokenizer.decode_indices(indices)
        from_features = tokenizer.decode(features).image
    assert from_indices.shape == images.shape
    assert torch.allclose(from_indices, from_features, atol=1e-4, rtol=1e-4)


def test_understanding_features_are_the_final_quantize_tokens():
    tokenizer = tiny_tokenizer("siglip_384").eval()
    images = tiny_images(tokenizer, batch=3)
    with torch.no_grad():
        tokens = tokenizer.understanding_features(images)
        features = tokenizer.encode(images).features
    assert tokens.shape == (3, 9, 40)
    assert torch.equal(tokens[:, 4], features[:, :, 1, 1])  # row-major (h, w)


def test_prefix_decoding_and_invalid_lengths():
    tokenizer = tiny_tokenizer().eval()
    indices = tokenizer.tokenize(tiny_images(tokenizer))
    assert tokenizer.decode_indices(indices[:, :5]).shape == (2, 3, 32, 32)  # scales 1 and 2 only
    with pytest.raises(ValueError, match="prefix"):
        tokenizer.decode_indices(indices[:, :4])
    with pytest.raises(TypeError, match="integer"):
        tokenizer.decode_indices(indices.float())


def test_empty_batch():
    tokenizer = tiny_tokenizer().eval()
    empty = tiny_images(tokenizer)[:0]
    features, _, indices = tokenizer.encode(empty)
    assert features.shape == (0, 40, 4, 4) and indices.shape == (0, 21)
    assert tokenizer.decode(features).semantic.shape == (0, 16, 48)
    assert tokenizer.decode_indices(indices).shape == (0, 3, 32, 32)


def test_bad_inputs_are_rejected():
    tokenizer = tiny_tokenizer().eval()
    images = tiny_images(tokenizer)
    with pytest.raises(ValueError, match="32x32"):
        tokenizer.encode(F.interpolate(images, size=(40, 40)))
    with pytest.raises(ValueError, match=r"\(B, 3"):
        tokenizer.encode(images[:, :2])
    with pytest.raises(ValueError, match=r"\(B, 3"):
        tokenizer.encode(images[0])
    with pytest.raises(TypeError, match="floating"):
        tokenizer.encode((images * 100).to(torch.int64))
    with pytest.raises(ValueError, match="features"):
        tokenizer.decode(torch.zeros(2, 39, 4, 4))
    with pytest.raises(ValueError, match="unknown config"):
        TokenFlowTokenizer("clipb_512")
    with pytest.raises(TypeError, match="unknown field"):
        TokenFlowTokenizer("clipb_256", codebook_sise=8)
    with pytest.raises(ValueError, match="last scale"):
        TokenFlowTokenizer("clipb_256", **dict(TINY, scales=(1, 2, 3)))


# ------------------------------------------------------------------------------------- blocks vs the formulas


def test_pixel_attention_matches_the_official_formula():
    torch.manual_seed(0)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 5, 5)
    h = block.norm(x)
    q, k, v = block.q(h).flatten(2), block.k(h).flatten(2), block.v(h).flatten(2)  # (b, c, hw)
    weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * 32 ** -0.5, dim=2)  # (b, hw_q, hw_k)
    expected = x + block.proj_out(torch.bmm(v, weights.transpose(1, 2)).reshape(2, 32, 5, 5))
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_semantic_decoder_attention_has_no_k_bias():
    torch.manual_seed(0)
    attention = Attention(16, 2)
    torch.nn.init.normal_(attention.q_bias)
    torch.nn.init.normal_(attention.v_bias)
    x = torch.randn(3, 7, 16)
    q, k, v = F.linear(x, attention.qkv.weight).chunk(3, dim=-1)
    q, v = q + attention.q_bias, v + attention.v_bias
    heads = lambda t: t.reshape(3, 7, 2, 8).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(heads(q) * 8 ** -0.5 @ heads(k).transpose(-1, -2), dim=-1)
    expected = attention.proj((weights @ heads(v)).transpose(1, 2).reshape(3, 7, 16))
    assert torch.allclose(attention(x), expected, atol=1e-5)


def test_interpolated_positions_follow_the_official_scale_factor():
    tokenizer = tiny_tokenizer("clipb_256")
    tower = tokenizer.encoder_vqkd
    stored = tower.positional_embedding
    resized = tower.positional_embedding_for(4, 4)
    patches = stored[1:].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(patches, scale_factor=(4.1 / 3, 4.1 / 3), mode="bicubic")
    assert resized.shape == (17, 64) and torch.equal(resized[0], stored[0])
    assert torch.allclose(resized[1:], expected.permute(0, 2, 3, 1).reshape(16, -1))
    assert tower.positional_embedding_for(3, 3) is stored


# ------------------------------------------------------------------------------------- checkpoints


def official_style_file(tokenizer, path, entry="ema", prefix=""):
    """A file shaped like the released ones: weights under `entry`, plus training extras."""
    state = {prefix + k: v.clone() + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone()
             for k, v in tokenizer.state_dict().items()}
    torch.save({entry: state, "optimizer": {"state": {}}, "steps": 10, "args": argparse.Namespace(lr=1e-4)}, path)
    return state


@pytest.mark.parametrize("entry,prefix", [("ema", ""), ("model", ""), ("state_dict", "module.")])
def test_from_pretrained_loads_an_official_layout_file(tmp_path, entry, prefix):
    tokenizer = tiny_tokenizer("siglip_384")
    path = os.fspath(tmp_path / "tokenflow_tiny.pt")
    state = official_style_file(tokenizer, path, entry, prefix)
    loaded = TokenFlowTokenizer.from_pretrained(path, config="siglip_384", **TINY_VARIANTS["siglip_384"])
    assert not loaded.training
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[prefix + key]), key
    assert loaded.quantize.embedding_vqkd.weight.requires_grad
    assert not loaded.quantize.codebook_used.requires_grad


def test_mismatch_report_lists_missing_unexpected_and_wrong_shapes(tmp_path):
    tokenizer = tiny_tokenizer("clipb_256")
    state = tokenizer.state_dict()
    del state["decoder_vqkd.blocks.1.attn.q_bias"]
    state["quantize.embedding_extra.weight"] = torch.zeros(3)
    state["quantize.embedding_vqgan.weight"] = torch.zeros(64, 4)
    path = os.fspath(tmp_path / "broken.pt")
    torch.save({"model": state}, path)
    with pytest.raises(StateDictMismatchError) as error:
        TokenFlowTokenizer.from_pretrained(path, config="clipb_256", **TINY_VARIANTS["clipb_256"])
    message = str(error.value)
    assert "1 missing, 1 unexpected, 1 wrongly shaped" in message
    assert "decoder_vqkd.blocks.1.attn.q_bias" in message and "quantize.embedding_extra.weight" in message
    assert "quantize.embedding_vqgan.weight: model (64, 8), checkpoint (64, 4)" in message
    with pytest.raises(StateDictMismatchError, match="wrongly shaped"):  # wrong shapes raise even when not strict
        TokenFlowTokenizer.from_pretrained(path, config="clipb_256", strict=False, **TINY_VARIANTS["clipb_256"])
    state["quantize.embedding_vqgan.weight"] = torch.zeros(64, 8)
    torch.save({"model": state}, path)
    loose = TokenFlowTokenizer.from_pretrained(path, config="clipb_256", strict=False, **TINY_VARIANTS["clipb_256"])
    assert torch.count_nonzero(loose.quantize.embedding_vqgan.weight) == 0


def test_official_size_file_on_the_wrong_config_is_reported(tmp_path):
    path = os.fspath(tmp_path / "tiny.pt")
    official_style_file(tiny_tokenizer("clipb_256"), path)
    with pytest.raises(StateDictMismatchError, match="wrongly shaped"):
        TokenFlowTokenizer.from_pretrained(path, config="clipb_256")  # full-size model, tiny weights


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_pretrained_round_trip_keeps_config_and_indices(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    tokenizer = tiny_tokenizer("clipb_256").eval()
    path = tokenizer.save_pretrained(tmp_path / f"tok{suffix}")
    loaded = TokenFlowTokenizer.from_pretrained(path)
    assert loaded.config == tokenizer.config
    images = tiny_images(tokenizer)
    assert torch.equal(loaded.tokenize(images), tokenizer.tokenize(images))
    assert torch.allclose(loaded.decode_indices(loaded.tokenize(images)),
                          tokenizer.decode_indices(tokenizer.tokenize(images)))


def test_from_pretrained_needs_a_config_for_official_files(tmp_path):
    path = os.fspath(tmp_path / "official.pt")
    official_style_file(tiny_tokenizer(), path)
    with pytest.raises(ValueError, match="config="):
        TokenFlowTokenizer.from_pretrained(path)
    with pytest.raises(FileNotFoundError):
        TokenFlowTokenizer.from_pretrained(tmp_path / "absent.pt", config="clipb_256")


def test_named_configs_are_consistent():
    tokens = {"clipb_224": 561, "clipb_256": 817, "siglip_384": 2227, "vitamin_256": 817}
    for name, config in CONFIGS.items():
        assert config.name == name and config.tokens_per_image == tokens[name]
        assert config.code_dim == 40 and config.codebook_size == 32768 and config.compression == 16
    assert CONFIGS["clipb_256"].replace(enhanced_decoder=True).decoder_channels == 256
    assert CONFIGS["clipb_256"].replace(enhanced_decoder=True).replace(enhanced_decoder=False).decoder_res_blocks == 2


# ------------------------------------------------------------------------------------- training under DDP


SIGLIP_FROZEN = 16 + 2 + 11  # the last encoder layer, post_layernorm, the pooling head (official: 29 tensors)


def test_siglip_parts_the_tokenizer_never_runs_are_frozen():
    tokenizer = tiny_tokenizer("siglip_384")
    frozen = [n for n, p in tokenizer.named_parameters() if not p.requires_grad]
    last = f"encoder_vqkd.vision_model.encoder.layers.{TINY_VARIANTS['siglip_384']['semantic_layers'] - 1}."
    assert len(frozen) == SIGLIP_FROZEN
    assert all(n.startswith((last, "encoder_vqkd.vision_model.post_layernorm.", "encoder_vqkd.vision_model.head."))
               for n in frozen)
    full = meta_tokenizer("siglip_384")
    assert sum(not p.requires_grad for p in full.parameters()) == 29
    assert not full.encoder_vqkd.vision_model.encoder.layers[26].mlp.fc1.weight.requires_grad
    assert full.encoder_vqkd.vision_model.encoder.layers[25].mlp.fc1.weight.requires_grad


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_ddp_training_steps_without_find_unused_parameters(tmp_path, monkeypatch, name):
    """Every trainable parameter gets a gradient, so DDP's default (find_unused_parameters=False) works:
    before the fix, siglip's step 2 failed with "Expected to have finished reduction in the prior iteration"."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        tokenizer = tiny_tokenizer(name).train()
        tokenizer.residual_quantizer.random_scale_drop = False
        model = DistributedDataParallel(tokenizer)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        images = tiny_images(tokenizer)
        for _ in range(2):
            (semantic, image), losses = model(images)
            loss = losses[0] + losses[1] + F.mse_loss(image, images) + semantic.square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------- inference


def test_from_pretrained_is_built_for_inference(tmp_path):
    tokenizer = tiny_tokenizer("siglip_384")
    path = os.fspath(tmp_path / "tok.pt")
    official_style_file(tokenizer, path)
    loaded = TokenFlowTokenizer.from_pretrained(path, config="siglip_384", **TINY_VARIANTS["siglip_384"])
    assert not loaded.training and not loaded.residual_quantizer.training
    assert sum(not p.requires_grad for p in loaded.parameters()) == SIGLIP_FROZEN  # kept through assign=True
    modes = []
    loaded.decoder.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    images = tiny_images(loaded)
    features, losses, indices = loaded.encode(images)
    assert features.grad_fn is None and not features.requires_grad
    image = loaded.decode_indices(indices)
    assert modes == [True] and image.grad_fn is None  # no graph: the decoder's activations are freed
    assert not image.is_inference() and not features.is_inference()  # normal tensors handed back
    assert loaded.decode(features).image.grad_fn is None and modes == [True, True]
    with torch.no_grad():  # the caller chose no_grad: runs as is
        loaded.decode(features)
    assert modes[-1] is False
    trainable = images.clone().requires_grad_()
    assert loaded.encode(trainable).features.grad_fn is not None  # an input with grad: a graph as usual
    loaded.train()
    assert loaded.decode_indices(indices).grad_fn is not None


def test_tokenize_never_drops_scales_and_leaves_training_state_alone():
    tokenizer = tiny_tokenizer("clipb_256").train()
    tokenizer.residual_quantizer.drop_probability = 1.0  # training mode would always drop one scale
    images = tiny_images(tokenizer)
    usage = tokenizer.quantize.codebook_used.clone()
    indices = tokenizer.tokenize(images)
    assert indices.shape == (2, tokenizer.tokens_per_image) and not indices.is_inference()
    assert tokenizer.training and tokenizer.residual_quantizer.training and tokenizer.quantize.training
    assert torch.equal(tokenizer.quantize.codebook_used, usage)
    assert tokenizer.decode_indices(indices).shape == images.shape
    assert tokenizer.encode(images).indices.shape[1] < tokenizer.tokens_per_image  # training still drops


# ------------------------------------------------------------------------------------- unreadable checkpoints


def test_unreadable_checkpoints_name_the_file_and_the_problem(tmp_path):
    from tokenflow_ext.models import CheckpointError

    kwargs = dict(config="clipb_256", **TINY_VARIANTS["clipb_256"])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt is empty \(0 bytes\)"):
        TokenFlowTokenizer.from_pretrained(empty, **kwargs)
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a readable checkpoint"):
        TokenFlowTokenizer.from_pretrained(text, **kwargs)
    good = tiny_tokenizer().save_pretrained(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(good, "rb").read()[:4000])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a readable checkpoint"):
        TokenFlowTokenizer.from_pretrained(truncated, **kwargs)
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: not a readable checkpoint"):
        TokenFlowTokenizer.from_pretrained(bad_safetensors, **kwargs)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        TokenFlowTokenizer.from_pretrained(tmp_path, **kwargs)
    with pytest.raises(FileNotFoundError, match=r"absent\.pt"):
        TokenFlowTokenizer.from_pretrained(tmp_path / "absent.pt", **kwargs)


@pytest.mark.parametrize("stored", ["{not json", '["a list"]', '{"codebook_sise": 8}', '{"scales": [0]}'])
def test_broken_stored_config_names_the_file(tmp_path, stored):
    from tokenflow_ext.models import CheckpointError

    path = tmp_path / "tok.pt"
    torch.save({"model": tiny_tokenizer().state_dict(), "tokenflow_ext": {"config": stored}}, path)
    with pytest.raises(CheckpointError, match=r"tok\.pt: its stored tokenflow_ext config is broken"):
        TokenFlowTokenizer.from_pretrained(path)
    loaded = TokenFlowTokenizer.from_pretrained(path, config="clipb_256", **TINY_VARIANTS["clipb_256"])
    assert loaded.tokenize(tiny_images(loaded)).shape == (2, 21)  # an explicit config ignores the stored one


def test_half_precision_codebook_is_cast_to_the_model_dtype(tmp_path):
    tokenizer = tiny_tokenizer().eval()
    state = tokenizer.state_dict()
    state["quantize.embedding_vqkd.weight"] = state["quantize.embedding_vqkd.weight"].half()
    state["quantize.embedding_vqgan.weight"] = state["quantize.embedding_vqgan.weight"].bfloat16()
    path = tmp_path / "half.pt"
    torch.save({"model": state}, path)
    loaded = TokenFlowTokenizer.from_pretrained(path, config="clipb_256", **TINY_VARIANTS["clipb_256"])
    assert loaded.quantize.embedding_vqkd.weight.dtype == torch.float32
    assert loaded.quantize.embedding_vqgan.weight.dtype == torch.float32
    images = tiny_images(loaded)
    indices = loaded.tokenize(images)  # failed before: mixed fp32 features / fp16 codebook at first use
    assert loaded.decode_indices(indices).shape == images.shape
