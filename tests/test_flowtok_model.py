"""FlowTok: official sizes and keys (meta device), tiny forward/backward, losses, checkpoints, and a toy
end-to-end run (training lowers the loss; text -> image and image -> text on held-out samples)."""

import os

import pytest
import torch
import torch.nn.functional as F

from tokenflow_ext.models import CheckpointError, FlowTiTok, FlowTok, FlowTransformer, StateDictMismatchError
from tokenflow_ext.models._checkpoint import write_checkpoint
from tokenflow_ext.models.flowtok import CLIPTextEncoder, TextDecoder, null_indicator_roll
from tokenflow_ext.models.flowtok.text_projector import LayerNorm, contrastive_alignment_loss, kl_divergence

TINY_FLOW = dict(clip_dim=24, text_layers=1, text_heads=2, text_hidden=32, text_dropout=0.0)


TINY_CLIP = dict(width=24, layers=1, heads=2, vocab_size=100, embed_dim=24)
TINY_TITOK = dict(patch_size=8, encoder_size=(32, 1, 2), decoder_size=(32, 1, 2), text_dim=24)


def tiny_parts(seed=0):
    torch.manual_seed(seed)
    text_encoder = CLIPTextEncoder(**TINY_CLIP)
    tokenizer = FlowTiTok(image_size=32, **TINY_TITOK)
    return text_encoder, tokenizer


def tiny_flowtok(seed=0, preset=(2, 32, 2), **kwargs):
    text_encoder, tokenizer = tiny_parts(seed)
    return FlowTok(preset, text_encoder=text_encoder, tokenizer=tokenizer, **TINY_FLOW, **kwargs)


def meta_params(module_factory):
    with torch.device("meta"):
        module = module_factory()
    return module, sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------- official sizes


@pytest.mark.parametrize("preset,millions", [("S", 56.8), ("B", 153.9), ("L", 481.2), ("XL", 698.08), ("H", 1092.1)])
def test_flow_presets_have_the_official_sizes(preset, millions):
    nnet, count = meta_params(lambda: FlowTransformer(preset))
    assert count / 1e6 == pytest.approx(millions, abs=0.05)
    state = nnet.state_dict()
    depth, width, heads = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
                           "H": (36, 1280, 20)}[preset]
    assert f"blocks.{depth - 1}.adaLN_modulation.1.weight" in state and f"blocks.{depth}.attn.qkv.weight" not in state
    assert tuple(state["blocks.0.attn.qkv.weight"].shape) == (3 * width, width)
    assert tuple(state["blocks.0.mlp.fc1.weight"].shape) == (4 * width, width)
    assert tuple(state["pos_embed"].shape) == (1, 77, width) and tuple(state["x_embedder.weight"].shape) == (width, 16)
    assert tuple(state["y_embedder.embedding_table.weight"].shape) == (2, width)
    assert tuple(state["final_layer.linear.weight"].shape) == (16, width)
    for key, shape in {"context_encoder.layers.5.attn.W_Q.weight": (768, 768),
                       "context_encoder.layers.5.feed_forward.ffn_1.weight": (1024, 768),
                       "context_encoder.layers.0.norm1.g": (768,), "context_encoder.linear.weight": (32, 768),
                       "context_projector.4.weight": (16, 512), "t2t_temperature": ()}.items():
        assert tuple(state[key].shape) == shape, key
    assert "context_encoder.norm.g" not in state  # last_norm=False


def test_full_flowtok_xl_on_meta_and_its_parts():
    with torch.device("meta"):
        model = FlowTok("XL")
    assert sum(p.numel() for p in model.nnet.parameters()) / 1e6 == pytest.approx(698.08, abs=0.01)
    assert sum(p.numel() for p in model.text_encoder.parameters()) / 1e6 == pytest.approx(123.65, abs=0.01)
    tokenizer_state = model.tokenizer.state_dict()
    for key, shape in {"latent_tokens": (77, 768), "encoder.patch_embed.weight": (768, 3, 16, 16),
                       "encoder.positional_embedding.freqs_cos": (256, 64),
                       "encoder.transformer.11.mlp.w12.weight": (4096, 768),
                       "encoder.transformer.0.attn.qkv.weight": (2304, 768), "encoder.conv_out.weight": (32, 768, 1, 1),
                       "decoder.transformer.23.mlp.w12.weight": (5460, 1024),
                       "decoder.positional_embedding.freqs_sin": (256, 64), "decoder.mask_token": (1, 1, 1024),
                       "decoder.text_guidance_proj.weight": (1024, 768),
                       "decoder.text_guidance_positional_embedding": (77, 1024),
                       "decoder.ffn.0.weight": (768, 1024, 1, 1), "decoder.conv_out.weight": (3, 3, 3, 3)}.items():
        assert tuple(tokenizer_state[key].shape) == shape, key
    assert not any(p.requires_grad for p in model.tokenizer.parameters())
    clip_state = model.text_encoder.state_dict()
    assert tuple(clip_state["token_embedding.weight"].shape) == (49408, 768)
    assert tuple(clip_state["transformer.resblocks.11.attn.in_proj_weight"].shape) == (2304, 768)
    assert "attn_mask" not in clip_state and "text_projection" in clip_state
    with torch.device("meta"):
        assert FlowTiTok(image_size=512).state_dict()["encoder.positional_embedding.freqs_cos"].shape == (1024, 64)


# ------------------------------------------------------------------------------------- pieces vs formulas


def test_official_layer_norm_uses_the_unbiased_std_outside_the_root():
    x = torch.randn(3, 10)
    norm = LayerNorm(10)
    expected = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5)
    assert torch.allclose(norm(x), expected, atol=1e-6)
    assert not torch.allclose(norm(x), F.layer_norm(x, (10,)), atol=1e-3)


def test_kl_forms_and_alignment_loss_by_hand():
    mu, log_var = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 0.5]])
    official = -0.5 * ((1 + 0 - 0.3 ** 6 - 1) + (1 + 0.5 - 0.6 ** 6 - torch.tensor(0.5).exp()))
    standard = -0.5 * ((1 + 0 - 1 - 1) + (1 + 0.5 - 4 - torch.tensor(0.5).exp()))
    assert torch.allclose(kl_divergence(mu, log_var), official)
    assert torch.allclose(kl_divergence(mu, log_var, "standard"), standard)
    with pytest.raises(ValueError):
        kl_divergence(mu, log_var, "other")
    a = torch.eye(2).reshape(2, 1, 2)
    scale = torch.tensor(0.0)  # exp(0) = 1: logits = cosine similarities = identity
    expected = F.cross_entropy(torch.eye(2), torch.arange(2))
    assert torch.allclose(contrastive_alignment_loss(a, a, scale), expected)


def test_null_indicator_roll_pairs_null_samples_with_other_images():
    x1 = torch.arange(8.0).reshape(8, 1, 1).expand(8, 77, 16)
    targets, null = null_indicator_roll(x1, 0.5, torch.Generator().manual_seed(3))
    assert null.sum() >= 2
    kept = ~null
    assert torch.equal(targets[kept], x1[kept])
    assert torch.equal(targets[null], torch.cat([x1[null][1:], x1[null][:1]]))
    assert torch.equal(x1[:, 0, 0], torch.arange(8.0))  # not modified in place
    none_targets, none = null_indicator_roll(x1, 0.0)
    assert not none.any() and none_targets is x1


def test_timestep_embedding_uses_raw_t():
    nnet = FlowTransformer((1, 32, 2), **TINY_FLOW)
    half = 128
    t = torch.tensor([0.25])
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)
    features = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1)
    assert torch.allclose(nnet.t_embedder(t), nnet.t_embedder.mlp(features), atol=1e-6)


def test_rope_table_matches_the_axial_layout():
    tokenizer = FlowTiTok(image_size=32, patch_size=8, encoder_size=(32, 1, 2), decoder_size=(32, 1, 2), text_dim=24)
    rope = tokenizer.encoder.positional_embedding  # head_dim 16: 8 channels by row, 8 by column
    grid = 4
    cos = rope.freqs_cos.reshape(grid, grid, 16)
    freqs = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    row = torch.arange(grid).float()[:, None] * freqs
    assert torch.allclose(cos[2, 3, :8], row[2].repeat_interleave(2).cos())
    assert torch.allclose(cos[2, 3, 8:], row[3].repeat_interleave(2).cos())
    x = torch.randn(1, 1, 16, 16)
    x_rotated = rope(x)
    assert torch.allclose(x_rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation


# ------------------------------------------------------------------------------------- tiny model


def test_training_loss_forward_backward_reaches_the_trainable_parts():
    model = tiny_flowtok().train()
    images = torch.rand(6, 3, 32, 32)
    token_ids = torch.randint(0, 100, (6, 77))
    loss, parts = model.training_loss(images, token_ids, generator=torch.Generator().manual_seed(0))
    assert set(parts) == {"flow", "kl", "align"} and torch.isfinite(loss)
    assert torch.allclose(loss, parts["flow"] + parts["kl"] + parts["align"])
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    for name in ["nnet.final_layer.linear.weight", "nnet.context_encoder.layers.0.attn.W_Q.weight",
                 "nnet.context_projector.0.weight", "nnet.t2t_temperature"]:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # adaLN-Zero: at init the zeroed final layer blocks the gradient to the DiT trunk
    assert grads["nnet.x_embedder.weight"].abs().sum() == 0
    assert all(p.grad is None for p in model.tokenizer.parameters())
    assert all(p.grad is None for p in model.text_encoder.parameters())


def test_training_loss_with_latents_and_features_and_bad_inputs():
    model = tiny_flowtok()
    latents, features = torch.randn(4, 77, 16), torch.randn(4, 77, 24)
    loss, parts = model.training_loss(latents, features)
    loss.backward()
    with pytest.raises(ValueError, match="4 images but 3 texts"):
        model.training_loss(latents, features[:3])
    with pytest.raises(ValueError, match="latents"):
        model.training_loss(torch.randn(4, 77, 8), features)
    with pytest.raises(ValueError, match="text must be"):
        model.training_loss(latents, torch.randn(4, 24))
    bare = FlowTok((1, 32, 2), text_encoder=False, tokenizer=False, **TINY_FLOW)
    with pytest.raises(ValueError, match="text_encoder"):
        bare.training_loss(latents, torch.randint(0, 100, (4, 77)))
    with pytest.raises(ValueError, match="tokenizer"):
        bare.training_loss(torch.rand(4, 3, 32, 32), features)
    with pytest.raises(ValueError, match="unknown preset"):
        FlowTransformer("XXL")


def test_flow_loss_is_the_fused_matching_loss():
    model = tiny_flowtok(kl_weight=0.0, align_weight=0.0).eval()
    latents, features = torch.randn(3, 77, 16), torch.randn(3, 77, 24)
    loss, parts = model.training_loss(latents, features, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    x0, _, _ = model.nnet.encode_text(features, generator=generator)
    torch.rand(3, generator=generator)  # the null-indicator draw
    t = torch.sigmoid(torch.randn(3, generator=generator))
    x_t = (1 - (1 - 1e-5) * t)[:, None, None] * x0 + t[:, None, None] * latents
    v_pred = model.nnet(x_t, t, torch.zeros(3, dtype=torch.bool))
    expected = ((v_pred - (latents - (1 - 1e-5) * x0)) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert parts["kl"] == 0 and parts["align"] == 0


def test_generate_decodes_images_and_matches_an_eager_cfg_euler_loop():
    model = tiny_flowtok().eval()
    for p in model.nnet.final_layer.parameters():  # zero-init output: make the velocity non-trivial
        torch.nn.init.normal_(p, std=0.1)
    token_ids = torch.randint(0, 100, (2, 77))
    images = model.generate(token_ids, num_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    latents = model.generate(token_ids, num_steps=4, guidance_scale=2.0, decode=False,
                             generator=torch.Generator().manual_seed(1))
    features = model.text_encoder(token_ids)
    x, _, _ = model.nnet.encode_text(features, generator=torch.Generator().manual_seed(1))
    times = torch.linspace(0, 1 - 1e-5, 4)
    with torch.no_grad():
        for t_value in times:
            t = t_value.repeat(2)
            v_c = model.nnet(x, t, torch.zeros(2, dtype=torch.bool))
            v_u = model.nnet(x, t, torch.ones(2, dtype=torch.bool))
            x = x + (1 - 1e-5) / 4 * (v_u + 2.0 * (v_c - v_u))
    assert torch.allclose(latents, x, atol=1e-5)
    assert torch.allclose(images, model.tokenizer.decode(latents, features))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = FlowTransformer((2, 32, 2), **TINY_FLOW)
    checkpointed = FlowTransformer((2, 32, 2), gradient_checkpointing=True, **TINY_FLOW)
    checkpointed.load_state_dict(plain.state_dict())
    for p in list(plain.final_layer.parameters()) + list(checkpointed.final_layer.parameters()):
        torch.nn.init.constant_(p, 0.1)
    x, t = torch.randn(2, 77, 16), torch.rand(2)
    plain(x, t).square().sum().backward()
    checkpointed(x, t).square().sum().backward()
    assert torch.allclose(plain.blocks[0].attn.qkv.weight.grad, checkpointed.blocks[0].attn.qkv.weight.grad, atol=1e-6)


def test_flowtitok_round_trip_shapes_and_scale_factor():
    _, tokenizer = tiny_parts()
    images = torch.rand(2, 3, 32, 32)
    posterior = tokenizer.posterior(images)
    assert posterior.mean.shape == (2, 16, 1, 77) and posterior.log_var.max() <= 20
    latents = tokenizer.encode(images, sample=False)
    assert torch.allclose(latents, posterior.mean.squeeze(2).transpose(1, 2) * 1.0143)
    assert tokenizer.decode(latents, torch.randn(2, 77, 24)).shape == (2, 3, 32, 32)
    assert posterior.kl().shape == (2,)
    with pytest.raises(ValueError, match="images"):
        tokenizer.encode(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="text"):
        tokenizer.decode(latents, torch.randn(2, 77, 10))


# ------------------------------------------------------------------------------------- checkpoints


def test_released_layouts_load_strictly_with_a_mismatch_report(tmp_path):
    text_encoder, tokenizer = tiny_parts()
    nnet = FlowTransformer((2, 32, 2), **TINY_FLOW)
    flow_path, titok_path, clip_path = (os.fspath(tmp_path / n) for n in ("FlowTok-XL.pth", "FlowTiTok_512.bin", "clip.pt"))
    torch.save(nnet.state_dict(), flow_path)                 # FlowTok-*.pth: a bare state dict
    torch.save(tokenizer.state_dict(), titok_path)           # FlowTiTok_512.bin: a bare state dict
    clip_state = {**text_encoder.state_dict(), "visual.conv1.weight": torch.zeros(1), "logit_scale": torch.ones(())}
    torch.save(clip_state, clip_path)                        # a full CLIP file: the visual tower is ignored
    model = FlowTok.from_pretrained(flow_path, (2, 32, 2), tokenizer_path=titok_path, text_encoder_path=clip_path,
                                    tokenizer_kwargs=TINY_TITOK, text_encoder_kwargs=TINY_CLIP, **TINY_FLOW)
    assert not model.training and model.tokenizer.image_size == 32
    for key, value in nnet.state_dict().items():
        assert torch.equal(model.nnet.state_dict()[key], value), key
    with pytest.raises(StateDictMismatchError, match="wrongly shaped"):  # official sizes vs tiny weights
        FlowTiTok.from_pretrained(titok_path)
    token_ids = torch.randint(0, 100, (1, 77))
    assert torch.allclose(model.text_encoder(token_ids), text_encoder(token_ids), atol=1e-6)
    state = nnet.state_dict()
    state.pop("t2t_temperature")
    state["blocks.9.attn.qkv.weight"] = torch.zeros(1)
    torch.save(state, flow_path)
    with pytest.raises(StateDictMismatchError) as error:
        FlowTok.from_pretrained(flow_path, (2, 32, 2), **TINY_FLOW)
    assert "t2t_temperature" in str(error.value) and "blocks.9.attn.qkv.weight" in str(error.value)


def trained_style_checkpoint(path, preset=(2, 32, 2), flow_kwargs=TINY_FLOW, seed=0, ema=True):
    """What ``train flowtok`` writes (write_checkpoint with FlowTokTrainer.metadata, the EMA beside "model")."""
    torch.manual_seed(seed)
    nnet = FlowTransformer(preset if isinstance(preset, tuple) else (2, 32, 2), **flow_kwargs)
    ema_state = {key: value + 1.0 if value.is_floating_point() else value for key, value in nnet.state_dict().items()}
    metadata = {} if preset is None else {"preset": preset, "flow_kwargs": flow_kwargs}
    write_checkpoint(path, nnet.state_dict(), metadata, extra={"ema": ema_state} if ema else None)
    return ema_state if ema else nnet.state_dict()


@pytest.mark.parametrize("stored", [(2, 32, 2), [2, 32, 2], "2,32,2"])
def test_from_pretrained_reads_the_preset_and_flow_kwargs_a_training_checkpoint_stores(tmp_path, stored):
    path = os.fspath(tmp_path / "last.pt")
    expected = trained_style_checkpoint(path, stored)
    model = FlowTok.from_pretrained(path)  # was: built XL (the default) and failed with a 260-key mismatch
    assert not model.training and len(model.nnet.blocks) == 2 and model.nnet.blocks[0].attn.heads == 2
    assert model.nnet.clip_dim == 24 and len(model.nnet.context_encoder.layers) == 1
    for key, value in expected.items():  # the EMA weights, as the training checkpoint's docs say
        assert torch.equal(model.nnet.state_dict()[key], value), key
    features = torch.randn(1, 77, 24)
    assert model.generate(features, num_steps=2).shape == (1, 77, 16)  # no tokenizer: latents


@pytest.mark.parametrize("preset", ["2,32,2", " 2, 32, 2 ", (2, 32, 2), [2, 32, 2], "(2, 32, 2)"])
def test_from_pretrained_and_the_constructor_accept_the_cli_preset_forms(tmp_path, preset):
    path = os.fspath(tmp_path / "bare.pt")
    expected = trained_style_checkpoint(path, None, ema=False)  # no metadata: the preset must be given
    model = FlowTok.from_pretrained(path, preset, **TINY_FLOW)
    assert all(torch.equal(model.nnet.state_dict()[key], value) for key, value in expected.items())
    assert len(FlowTok(preset, text_encoder=False, tokenizer=False, **TINY_FLOW).nnet.blocks) == 2


def test_from_pretrained_without_a_stored_preset_reads_official_sizes_or_says_what_to_pass(tmp_path):
    path = os.fspath(tmp_path / "bare.pt")
    trained_style_checkpoint(path, None, ema=False)
    with pytest.raises(ValueError, match=r"stores no FlowTok preset.*2 blocks of width 32.*preset=\(2, 32, heads\)"):
        FlowTok.from_pretrained(path, **TINY_FLOW)
    # a released-style file without metadata: the official preset of its depth and width (here S: 12 x 384)
    torch.save({"x_embedder.weight": torch.zeros(384, 16), "blocks.11.attn.qkv.weight": torch.zeros(1)}, path)
    with pytest.raises(StateDictMismatchError, match=r"built preset 'S'.*12 blocks of width 384"):
        FlowTok.from_pretrained(path)
    torch.save({"t2t_temperature": torch.zeros(())}, path)
    with pytest.raises(ValueError, match="stores no FlowTok preset"):
        FlowTok.from_pretrained(path)


def test_a_given_preset_wins_and_a_mismatch_names_the_stored_one(tmp_path):
    path = os.fspath(tmp_path / "last.pt")
    expected = trained_style_checkpoint(path, (2, 32, 2))
    model = FlowTok.from_pretrained(path, (2, 32, 4))  # the same shapes, other heads: the caller's preset wins
    assert model.nnet.blocks[0].attn.heads == 4 and model.nnet.clip_dim == 24  # stored flow kwargs still apply
    assert torch.equal(model.nnet.final_layer.linear.weight, expected["final_layer.linear.weight"])
    for preset in ("XL", "2,48,2"):
        with pytest.raises(StateDictMismatchError) as error:
            FlowTok.from_pretrained(path, preset)
        message = str(error.value)
        assert "the file stores preset [2, 32, 2]" in message and "preset=None" in message, message
        assert "2 blocks of width 32" in message
    with pytest.raises(StateDictMismatchError, match="wrongly shaped"):  # a given flow kwarg wins too
        FlowTok.from_pretrained(path, text_hidden=48)


def test_broken_or_unknown_presets_are_clear_errors(tmp_path):
    path = os.fspath(tmp_path / "last.pt")
    trained_style_checkpoint(path, None, ema=False)
    state = torch.load(path)["model"]
    write_checkpoint(path, state, {"preset": "XXL", "flow_kwargs": TINY_FLOW})
    with pytest.raises(CheckpointError, match=r"last\.pt: its stored FlowTok preset 'XXL' is broken"):
        FlowTok.from_pretrained(path)
    assert len(FlowTok.from_pretrained(path, "2,32,2").nnet.blocks) == 2  # a given preset overrides it
    write_checkpoint(path, state, {"preset": [2, 32, 2], "flow_kwargs": {"text_layerz": 1}})
    with pytest.raises(CheckpointError, match="text_layerz"):
        FlowTok.from_pretrained(path)
    for bad in ("XXL", "2,32", (2, 32), "2,x,2", (2, 30, 4)):
        with pytest.raises(ValueError, match="preset"):
            FlowTok.from_pretrained(path, bad)
    with pytest.raises(ValueError, match="trial size of the training CLI"):
        FlowTok("tiny")


def test_missing_parts_and_the_errors_name_the_flags():
    bare = FlowTok((1, 32, 2), text_encoder=False, tokenizer=False, **TINY_FLOW)
    ids, features = torch.randint(0, 100, (2, 77)), torch.randn(2, 77, 24)
    images, latents = torch.rand(2, 3, 32, 32), torch.randn(2, 77, 16)
    assert bare.missing_parts(latents, features) == []
    assert bare.missing_parts(images, ids) == ["tokenizer", "text_encoder"]
    assert bare.missing_parts(text=["a caption"]) == ["text_encoder"]
    assert tiny_flowtok().missing_parts(images, ids) == []
    with pytest.raises(ValueError, match="--clip-text"):
        bare.training_loss(latents, ids)
    with pytest.raises(ValueError, match="--flowtitok"):
        bare.training_loss(images, features)


# ------------------------------------------------------------------------------------- toy end to end


def toy_pairs(classes, per_class, generator, text_dim=24):
    """Class c: text features = T_c + noise, image latents = I_c + small noise, token ids = fixed row c."""
    text_means = torch.randn(classes, 77, text_dim, generator=generator)
    image_means = torch.randn(classes, 77, 16, generator=generator)
    token_rows = torch.randint(0, 100, (classes, 77), generator=generator)

    def draw(count):
        labels = torch.arange(classes).repeat_interleave(count)
        text = text_means[labels] + 0.05 * torch.randn(len(labels), 77, text_dim, generator=generator)
        image = image_means[labels] + 0.02 * torch.randn(len(labels), 77, 16, generator=generator)
        return labels, text, image

    return draw, image_means, token_rows


def test_toy_end_to_end_training_sampling_and_image_to_text():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    draw, image_means, token_rows = toy_pairs(4, 8, generator)
    model = FlowTok((2, 64, 4), text_encoder=False, tokenizer=False, text_decoder=TextDecoder(
        vocab_size=100, width=64, layers=1, heads=4), **TINY_FLOW)
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("text_decoder")], lr=2e-3)
    model.train()
    losses = []
    for step in range(300):
        _, text, image = draw(4)
        loss, parts = model.training_loss(image, text, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(parts["flow"].item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20

    model.eval()
    labels, text, _ = draw(2)  # held-out draws
    targets = image_means[labels]
    x0, _, _ = model.nnet.encode_text(text, generator=generator)
    samples = model.generate(text, num_steps=20, guidance_scale=1.5, generator=generator)
    source_error = (x0 - targets).square().mean()
    sample_error = (samples - targets).square().mean()
    assert sample_error < 0.25 * source_error

    decoder_optimizer = torch.optim.Adam(model.text_decoder.parameters(), lr=3e-3)
    for step in range(150):
        labels, text, _ = draw(4)
        with torch.no_grad():
            z, _, _ = model.nnet.encode_text(text, generator=generator)
        loss = model.text_decoder.loss(z, token_rows[labels])
        decoder_optimizer.zero_grad()
        loss.backward()
        decoder_optimizer.step()
    labels, _, image = draw(2)
    predicted = model.image_to_text(image, num_steps=20)
    assert predicted.shape == (8, 77)
    agreement = (predicted[:, None, :] == token_rows[None, :, :]).float().mean(dim=-1)  # (samples, classes)
    assert torch.equal(agreement.argmax(dim=1), labels)  # every caption decodes closest to its own class
    assert agreement[torch.arange(len(labels)), labels].mean() > 0.5  # chance: 1 / 100 per token


def test_empty_training_batch_gives_zero_losses_with_a_warning():
    model = tiny_flowtok().train()
    with pytest.warns(RuntimeWarning, match="empty batch"):
        loss, parts = model.training_loss(torch.zeros(0, 77, 16), torch.zeros(0, 77, 24))
    assert float(loss.detach()) == 0 and all(float(value.detach()) == 0 for value in parts.values())
    loss.backward()  # connected to the trainable tensors (zero gradients), as DDP expects
    assert all(p.grad is not None for p in model.nnet.parameters() if p.requires_grad)


def test_eval_generate_runs_as_inference_and_its_images_feed_a_training_tokenizer():
    model = tiny_flowtok().eval()
    modes = []
    model.nnet.register_forward_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    text = torch.randint(0, 100, (2, 77))
    images = model.generate(text, num_steps=2)
    assert modes and all(modes) and images.grad_fn is None and not images.is_inference()
    trainable = FlowTiTok(image_size=32, **TINY_TITOK).train()  # failed with inference tensors (README example)
    trainable.encode(images).sum().backward()


def test_generate_cuda_graph_needs_a_cuda_model():
    model = FlowTok((2, 32, 2), text_encoder=False, tokenizer=False, **TINY_FLOW).eval()
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        model.generate(torch.randn(2, 77, model.nnet.clip_dim), num_steps=2, cuda_graph=True)


def test_copies_and_pickles_leave_captured_graphs_behind(tmp_path):
    import copy
    import threading

    model = FlowTok((2, 32, 2), text_encoder=False, tokenizer=False, **TINY_FLOW)
    model.__dict__["_graphed_samplers"] = {"key": threading.Lock()}  # stands in for a CUDA graph: not copyable
    twin = copy.deepcopy(model)
    assert "_graphed_samplers" not in twin.__dict__ and "_graphed_samplers" in model.__dict__
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert "_graphed_samplers" not in loaded.__dict__
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_generate_with_a_cuda_graph_matches_the_eager_loop():
    model = FlowTok((2, 32, 2), text_encoder=False, tokenizer=False, **TINY_FLOW).cuda().eval()
    for p in model.nnet.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    features = torch.randn(4, 77, model.nnet.clip_dim, device="cuda")

    def run(**kwargs):
        return model.generate(features, num_steps=6, guidance_scale=2.0, decode=False,
                              generator=torch.Generator("cuda").manual_seed(1), **kwargs)

    eager = run()
    torch.testing.assert_close(run(cuda_graph=True), eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(cuda_graph=True), eager, rtol=1e-5, atol=1e-5)  # the replay of the capture
    with torch.autocast("cuda", torch.bfloat16):  # an enclosing autocast region gets its own capture, no cast cache
        eager_bf16 = run()
        torch.testing.assert_close(run(cuda_graph=True), eager_bf16, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(cuda_graph=True), eager, rtol=1e-5, atol=1e-5)
    model.clear_cuda_graphs()
    assert "_graphed_samplers" not in model.__dict__
