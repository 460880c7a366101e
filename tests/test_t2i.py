"""TokenFlowT2I (issue 13, parts 1-3): key layout, teacher-forced forward/backward against the official-style
reference, masks, exact-mode token equality of the KV-cached sampler with the no-cache reference loop,
checkpoints and their error paths. Tiny random-weight models only."""

import dataclasses
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

from tokenflow_ext.models import StateDictMismatchError, T2IConfig, TokenFlowT2I
from tokenflow_ext.models.tokenflow import generation as gen
from tokenflow_ext.models.tokenflow.t2i import CONFIGS, IGNORE_INDEX, images_to_uint8, refinement_lists, sample_scale
from tokenflow_ext.reference.t2i import (official_attention_bias, official_embeddings, official_features,
                                         official_t2i_generate, official_t2i_logits)

PAD = CONFIGS["tiny"].pad_token_id          # 27, after the image ids 10..25
START = CONFIGS["tiny"].image_token_start   # 10
K = CONFIGS["tiny"].image_vocab_size        # 16


def tiny_model(dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    codebook = torch.randn(K if "image_vocab_size" not in overrides else overrides["image_vocab_size"], 40)
    return TokenFlowT2I("tiny", codebook=codebook.to(dtype), **overrides).to(dtype).eval()


# (2B, P) prefixes: two prompts with [PAD] left padding, then two negative-prompt rows.
PREFIX = torch.tensor([[PAD, PAD, 1, 3, 4, 5, 7, 8],
                       [PAD, 1, 2, 3, 4, 5, 7, 8],
                       [PAD, PAD, PAD, 1, 9, 9, 7, 8],
                       [PAD, PAD, PAD, 1, 9, 9, 7, 8]])


# ------------------------------------------------------------------------------------------------ layout


def released_parameter_count(config: T2IConfig) -> tuple[int, int, int]:
    """(Llama-2-7B with its own 32000 ids, the larger vocabulary's extra rows, the added modules)."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    llama = 2 * 32000 * h + n * (4 * h * h + 3 * h * i + 2 * h) + h
    extra_vocab = 2 * (config.vocab_size - 32000) * h
    added = (config.code_dim * h + h + h * h + h) + (len(config.scales) + 1) * h + config.tokens_per_image * h \
        + n * 2 * (h // config.num_attention_heads)
    return llama, extra_vocab, added


def test_7b_key_layout_on_the_meta_device():
    with torch.device("meta"):
        model = TokenFlowT2I("7b")
    state = model.state_dict()
    config = model.config
    llama, extra_vocab, added = released_parameter_count(config)
    total = sum(t.numel() for t in state.values())
    print(f"\nTokenFlowT2I 7b: {total:,} parameters = Llama-2-7B {llama:,} + {extra_vocab:,} for the "
          f"{config.vocab_size - 32000} added ids + {added:,} in mm_projector/lvl_embed/pos_1LC/QKNorm")
    assert llama == 6_738_415_616 and total == llama + extra_vocab + added == 7_027_204_096
    assert len(state) == 3 + 32 * 11 + 4 + 2
    shapes = {"model.embed_tokens.weight": (64769, 4096), "lm_head.weight": (64769, 4096),
              "model.norm.weight": (4096,), "model.mm_projector.0.weight": (4096, 40),
              "model.mm_projector.0.bias": (4096,), "model.mm_projector.2.weight": (4096, 4096),
              "model.lvl_embed.weight": (10, 4096), "model.pos_1LC": (817, 4096),
              "model.layers.31.self_attn.qknorm.query_norm.weight": (128,),
              "model.layers.0.self_attn.qknorm.key_norm.weight": (128,),
              "model.layers.0.mlp.gate_proj.weight": (11008, 4096),
              "model.layers.5.mlp.down_proj.weight": (4096, 11008),
              "model.layers.7.self_attn.o_proj.weight": (4096, 4096), "model.layers.7.input_layernorm.weight": (4096,),
              "model.layers.7.post_attention_layernorm.weight": (4096,)}
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    pattern = re.compile(r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|self_attn\.qknorm\.(query|key)_norm|"
                         r"mlp\.(gate|up|down)_proj|input_layernorm|post_attention_layernorm)\.weight")
    layer_keys = [k for k in state if k.startswith("model.layers.")]
    assert len(layer_keys) == 32 * 11 and all(pattern.fullmatch(k) for k in layer_keys)
    assert config.image_token_end == 64768 and config.tokens_per_image == 817
    # an official config.json (no tokenflow_ext section) gives the same model: image ids are the last 32768
    official = config.to_hf_config()
    del official["tokenflow_ext"]
    official["pad_token_id"] = None  # [PAD] comes from the text tokenizer, not from config.json
    assert T2IConfig.from_hf_config(official) == dataclasses.replace(config, name="hf")


# ------------------------------------------------------------------------------------------------ training


def training_batch(model, batch=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, K, (batch, model.config.tokens_per_image), generator=generator)
    prefix = PREFIX[:batch]
    return model.training_inputs(prefix, codes, suffix_ids=torch.tensor([26, 2]))


def test_training_inputs_follow_the_official_labels():
    model = tiny_model()
    input_ids, labels = training_batch(model)
    assert input_ids.shape == (2, 8 + 14 + 2)
    assert (labels[:, :8] == IGNORE_INDEX).all()
    assert torch.equal(labels[:, 8:], input_ids[:, 8:]) and (input_ids[:, 8:22] >= START).all()
    assert model.image_start(input_ids).tolist() == [8, 8]
    with pytest.raises(ValueError, match="codes"):
        model.training_inputs(PREFIX[:1], torch.full((1, 14), K))
    broken = input_ids.clone()
    broken[0, 12] = 3
    with pytest.raises(ValueError, match="image ids"):
        model(broken)


def test_forward_matches_the_official_reference_and_backward_reaches_every_part():
    model = tiny_model()
    input_ids, labels = training_batch(model)
    out = model(input_ids, labels, return_logits=True)
    expected = official_t2i_logits(model, input_ids, 8)
    assert out.logits.dtype == torch.float32 and out.logits.shape == (2, 24, 28)
    real = input_ids != PAD  # [PAD] positions: outputs never used, see test_attention_mask_equals_...
    torch.testing.assert_close(out.logits[real], expected[real], rtol=1e-6, atol=1e-6)
    reference_loss = F.cross_entropy(expected[:, :-1].reshape(-1, 28), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, reference_loss)
    # the loss-only path (lm_head on the labelled positions only) gives the same loss
    assert model(input_ids, labels).logits is None
    torch.testing.assert_close(model(input_ids, labels).loss, out.loss)

    model = tiny_model(torch.float32).train()
    loss = model(*training_batch(model)).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name in ("model.mm_projector.0.weight", "model.lvl_embed.weight", "model.pos_1LC", "model.embed_tokens.weight",
                 "model.layers.0.self_attn.qknorm.query_norm.weight", "model.layers.1.mlp.up_proj.weight",
                 "lm_head.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # lvl_embed row 1 (scale 0 has no input rows) gets no gradient; text rows (index 0) and scale rows do
    lvl_grad = model.model.lvl_embed.weight.grad
    assert lvl_grad[1].abs().sum() == 0 and lvl_grad[0].abs().sum() > 0 and lvl_grad[3].abs().sum() > 0


def test_gradient_checkpointing_and_batch_padding():
    model = tiny_model(torch.float32).train()
    input_ids, labels = training_batch(model)
    plain = model(input_ids, labels).loss
    model.gradient_checkpointing = True
    torch.testing.assert_close(model(input_ids, labels).loss, plain)
    # a padded batch (padding at the end, masked keys, ignored labels) leaves the real positions unchanged
    padded_ids = torch.cat([input_ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    padded_labels = torch.cat([labels, torch.full((2, 3), IGNORE_INDEX)], dim=1)
    mask = torch.ones_like(padded_ids)
    mask[:, -3:] = 0
    model.eval()
    with torch.no_grad():
        a = model(input_ids, return_logits=True).logits
        b = model(padded_ids, padded_labels, mask, return_logits=True).logits
    torch.testing.assert_close(b[:, :-3], a, rtol=1e-5, atol=1e-5)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="end"):
        model(padded_ids, attention_mask=mask)


# ------------------------------------------------------------------------------------------------ masks and inputs


def test_attention_mask_equals_the_official_additive_mask():
    model = tiny_model()
    input_ids, _ = training_batch(model)
    ours = model.attention_mask(input_ids, model.image_start(input_ids))[:, 0]
    official = official_attention_bias(input_ids, 8, model.config.scales, PAD, torch.float32)[:, 0] == 0
    real = input_ids != PAD
    # identical for every real query; [PAD] queries (outputs never used) see themselves instead of nothing
    assert torch.equal(ours[real], official[real])
    assert torch.equal(ours[~real], torch.eye(24, dtype=torch.bool).expand(2, -1, -1)[~real])
    # without [PAD]s it is generation.scale_attention_mask, block-causal by scale from the last text id on
    plain = torch.where(input_ids == PAD, 5, input_ids)
    scale_mask = gen.scale_attention_mask(model.config.scales, text_length=8, total_length=24) == 0
    assert torch.equal(model.attention_mask(plain, model.image_start(plain))[0, 0], scale_mask)
    # hand-checked: 7 = last text id (scale 0), 8..11 scale 1's inputs, 12..20 scale 2's, 21 the placeholder
    allowed = ours[1]
    assert allowed[12, 20] and allowed[20, 12] and allowed[8, 11] and not allowed[11, 12] and allowed[12, 11]
    assert not allowed[12, 21] and allowed[21, 12] and not allowed[7, 8] and not allowed[5, 0]  # key 0 is [PAD]


def test_progressive_features_and_embeddings_match_the_official_tower():
    vectors = torch.randn(2, 14, 40, dtype=torch.float64)
    for refine in (None, 1, 2):
        official = official_features(vectors, (1, 2, 3), None if refine is None else refine - 1)
        assert torch.equal(gen.progressive_inputs(vectors, (1, 2, 3), refine), official)
    model = tiny_model()
    input_ids, _ = training_batch(model)
    for refine in (None, 2):
        ours, start = model.sequence_embeddings(input_ids, refine_scale=refine)
        official = official_embeddings(model, input_ids, 8, pred_for_curr_shape=None if refine is None else refine - 1)
        assert start.tolist() == [8, 8]
        torch.testing.assert_close(ours, official, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("refinement", ["loop1", "loop2", "loop3"])
def test_exact_mode_equals_the_no_cache_official_loop(refinement, dtype):
    model = tiny_model(dtype)
    top_k, top_p = refinement_lists(refinement, None, None)
    seeds = range(10) if dtype == torch.float64 else range(4)
    distinct = set()
    for seed in seeds:
        ours = model.generate(PREFIX[:2], negative_prompt=PREFIX[2:], refinement=refinement, seed=seed).codes
        official = official_t2i_generate(model, PREFIX, cfg=7.5, top_k=top_k, top_p=top_p,
                                         generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ours, official), (refinement, seed)
        assert ours.shape == (2, 14) and ours.min() >= 0 and ours.max() < K
        distinct.add(tuple(ours.flatten().tolist()))
    assert len(distinct) == len(seeds)  # the draws are random: every seed gives other codes


def test_exact_mode_with_tight_top_k_top_p_and_low_guidance():
    model = tiny_model(seed=3)
    for seed in range(8):
        ours = model.generate(PREFIX[:2], negative_prompt=PREFIX[2:], top_k=[5, 3, 1], top_p=[0.9, 0.5, 0.0],
                              refinement="loop3", cfg=1.5, seed=seed).codes
        official = official_t2i_generate(model, PREFIX, cfg=1.5, top_k=[5, 3, 1], top_p=[0.9, 0.5, 0.0],
                                         generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ours, official), seed


def test_ids_after_the_image_vocabulary_are_masked():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[PAD] = model.lm_head.weight[PAD] * 0 + 5.0  # [PAD] (after the image ids) dominates
    quirk = official_t2i_generate(model, PREFIX, cfg=1.0, top_k=[600], top_p=[0.6], mask_past_image_vocab=False,
                                  generator=torch.Generator().manual_seed(0))
    assert (quirk >= K).any()  # the official sampler draws [PAD]: code 17 is out of range
    for exact in (True, False):
        codes = model.generate(PREFIX[:2], negative_prompt=PREFIX[2:], cfg=1.0, seed=0, exact=exact).codes
        assert codes.min() >= 0 and codes.max() < K


def test_kv_cache_runs_the_prefix_once_and_only_the_current_block_per_pass():
    model = tiny_model()
    seen = []
    layer = model.model.layers[0]
    original = layer.forward

    def recording(x, cos, sin, mask=None, past=None):
        seen.append((x.shape[1], 0 if past is None else past[0].shape[2]))
        return original(x, cos, sin, mask, past)

    layer.forward = recording
    model.generate(PREFIX[:2], negative_prompt=PREFIX[2:], refinement="loop2", seed=0)
    # (queries, cached keys): the 8 prefix ids once; scale 1's 4 rows twice against the same 8 cached keys
    # (the refinement pass does not extend the cache); scale 2's 9 rows twice against 8 + 4 keys
    assert seen == [(8, 0), (4, 8), (4, 8), (9, 12), (9, 12)]


def test_sampler_hook_and_inexact_mode():
    model = tiny_model()
    calls = []

    def sampler(logits, **kwargs):
        calls.append((tuple(logits.shape), kwargs["guidance"], kwargs["top_k"], kwargs["top_p"]))
        return sample_scale(logits, **kwargs)

    out = model.generate(PREFIX[:2], negative_prompt=PREFIX[2:], refinement="loop2", cfg=4.0, seed=1, sampler=sampler)
    reference = model.generate(PREFIX[:2], negative_prompt=PREFIX[2:], refinement="loop2", cfg=4.0, seed=1)
    assert torch.equal(out.codes, reference.codes) and out.images is None
    assert calls == [((4, 1, 28), 0.0, 1200, 0.8), ((4, 4, 28), 2.0, 1200, 0.8), ((4, 4, 28), 2.0, 1, 0.0),
                     ((4, 9, 28), 4.0, 1200, 0.8), ((4, 9, 28), 4.0, 1, 0.0)]
    # id lists of different lengths are left-padded with [PAD]: the same codes as the padded tensor (RoPE is
    # relative and [PAD] keys are masked, so one pad less changes the logits by rounding only, in float64)
    ragged = model.generate([PREFIX[0, 2:].tolist(), PREFIX[1, 1:]], negative_prompt=PREFIX[2, 3:], seed=3).codes
    assert torch.equal(ragged, model.generate(PREFIX[:2], negative_prompt=PREFIX[2:], seed=3).codes)
    fast = model.generate(PREFIX[:2], negative_prompt=PREFIX[2:], exact=False, seed=1).codes
    assert fast.shape == (2, 14) and fast.min() >= 0 and fast.max() < K
    with pytest.raises(ValueError, match="refinement"):
        model.generate(PREFIX[:2], negative_prompt=PREFIX[2:], refinement="loop4")


def test_string_prompts_use_the_official_padding_and_decode_to_images():
    from tokenflow_tiny import tiny_tokenizer
    tokenizer = tiny_tokenizer("clipb_256")  # scales (1, 2, 4), 64 codes of 40 channels, 32 px images
    torch.manual_seed(0)
    model = TokenFlowT2I("tiny", image_tokenizer=tokenizer, scales=(1, 2, 4), image_vocab_size=64,
                         vocab_size=76, pad_token_id=75).eval()
    words = {"<img>": [7, 8], "a": [3], "red": [4], "bus": [5], "no": [6]}
    text_tokenizer = lambda text: [i for word in text.split() for i in words[word]]  # noqa: E731
    rows = model.encode_prompts(["a red bus", "a red bus a red bus a"], text_tokenizer)
    assert rows.tolist() == [[75, 75, 1, 3, 4, 5, 7, 8], [1, 3, 4, 5, 3, 4, 7, 8]]  # BOS, left pad / cut to 6, <img>

    class HFLike:  # encode(text) adds BOS, as a Hugging Face Llama tokenizer
        def encode(self, text, add_special_tokens=True):
            return ([1] if add_special_tokens else []) + text_tokenizer(text)

    assert torch.equal(model.encode_prompts(["a red bus", "a red bus a red bus a"], HFLike()), rows)
    out = model.generate(["a red bus", "bus"], negative_prompt="no", tokenizer=text_tokenizer, seed=0)
    assert out.codes.shape == (2, 21) and out.codes.max() < 64
    assert out.images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out.images, tokenizer.decode_indices(out.codes))
    ids = model.generate(torch.cat([rows[:1], model.encode_prompts(["bus"], text_tokenizer)]),
                         negative_prompt=model.encode_prompts(["no"], text_tokenizer), seed=0, decode=False)
    assert torch.equal(ids.codes, out.codes) and ids.images is None
    with pytest.raises(TypeError, match="tokenizer"):
        model.generate(["a red bus"], negative_prompt=rows[:1])
    with pytest.raises(TypeError, match="negative_prompt"):
        model.generate(rows)
    HFLike.pad_token_id = 3
    with pytest.raises(ValueError, match="pad_token_id"):
        model.encode_prompts(["a"], HFLike())
    pixels = images_to_uint8(out.images)
    assert pixels.shape == (2, 32, 32, 3) and pixels.dtype == torch.uint8


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip_safetensors_and_bin_shards(tmp_path):
    pytest.importorskip("safetensors")
    model = tiny_model(torch.float32)
    folder = model.save_pretrained(tmp_path / "saved")
    loaded = TokenFlowT2I.from_pretrained(folder, codebook=model.codebook)
    assert loaded.config == model.config and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    a = model.generate(PREFIX[:2], negative_prompt=PREFIX[2:], seed=5).codes
    assert torch.equal(loaded.generate(PREFIX[:2], negative_prompt=PREFIX[2:], seed=5).codes, a)
    half = TokenFlowT2I.from_pretrained(folder, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16 and half.codebook is None

    # an official-style folder: config.json without our section, two .bin shards, the official id buffers
    shards = tmp_path / "official"
    shards.mkdir()
    hf = model.config.to_hf_config()
    del hf["tokenflow_ext"]
    (shards / "config.json").write_text(json.dumps(hf))
    state = dict(model.state_dict())
    keys = sorted(state)
    first = {k: state[k] for k in keys[: len(keys) // 2]}
    second = {k: state[k] for k in keys[len(keys) // 2:]}
    second["image_token_start"], second["image_token_end"] = torch.tensor(START), torch.tensor(START + K - 1)
    torch.save(first, shards / "pytorch_model-00001-of-00002.bin")
    torch.save(second, shards / "pytorch_model-00002-of-00002.bin")
    tiny = CONFIGS["tiny"]
    official = TokenFlowT2I.from_pretrained(shards, scales=tiny.scales, image_token_start=START,
                                            pad_token_id=PAD, max_text_tokens=tiny.max_text_tokens)
    assert official.config.vocab_size == 28 and official.config.num_key_value_heads == 2
    for key, value in model.state_dict().items():
        assert torch.equal(official.state_dict()[key], value), key


def test_checkpoint_error_paths(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    model = tiny_model(torch.float32)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}

    def write(tensors):
        os.remove(folder / "model.safetensors")
        save_file(tensors, str(folder / "model.safetensors"))

    broken = dict(state)
    del broken["model.pos_1LC"]
    broken["model.extra.weight"] = torch.zeros(1)
    broken["model.lvl_embed.weight"] = torch.zeros(3, 32)
    write(broken)
    with pytest.raises(StateDictMismatchError) as error:
        TokenFlowT2I.from_pretrained(folder)
    message = str(error.value)
    assert "model.pos_1LC" in message and "model.extra.weight" in message and "model.lvl_embed.weight" in message
    assert error.value.missing == ["model.pos_1LC"] and error.value.unexpected == ["model.extra.weight"]
    with pytest.raises(StateDictMismatchError):  # a wrong shape raises even when not strict
        TokenFlowT2I.from_pretrained(folder, strict=False)
    loose = dict(state)
    del loose["model.pos_1LC"]
    write(loose)
    partial = TokenFlowT2I.from_pretrained(folder, strict=False)  # the missing tensor keeps its initialisation
    assert torch.isfinite(partial.model.pos_1LC).all() and not partial.model.pos_1LC.is_meta
    wrong_ids = dict(state, image_token_start=torch.tensor(3))
    write(wrong_ids)
    with pytest.raises(ValueError, match="image_token_start"):
        TokenFlowT2I.from_pretrained(folder)
    (tmp_path / "no_config").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        TokenFlowT2I.from_pretrained(tmp_path / "no_config")
    with pytest.raises(FileNotFoundError):
        TokenFlowT2I.from_pretrained(tmp_path / "absent", config="tiny")
    with pytest.raises(ValueError, match="unknown config"):
        TokenFlowT2I("13b")
    with pytest.raises(ValueError, match="scales"):
        T2IConfig(scales=(2, 4))
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        T2IConfig.from_hf_config({"mm_projector_type": "linear"})


# The config.* fields official t2i training sets before trainer.save_model, with the t2i recipe's values
# (TF:t2i/llava_t2i/train/train.py train(), TF:t2i/llava_t2i/model/llava_arch.py initialize_vision_modules,
# TF:t2i/scripts/train_t2i.sh). The official loader (run_llava_samples.py) passes mm_vision_tower= to
# LlavaLlamaForCausalLM.from_pretrained: transformers applies that keyword to the config only when config.json
# already has the key, else hands it to the model's __init__, which raises TypeError.
OFFICIAL_TRAINING_FIELDS = {
    "mm_vision_tower": "../pretrained_ckpts/tokenflow_clipb_32k_enhanced.pt", "mm_vision_vq_type": "TOKEN_FLOW",
    "use_mm_proj": True, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -1,
    "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat", "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False, "mm_use_vq_token": True, "tune_mm_mlp_adapter": False,
    "tune_mm_mlp_adapter_and_logits": False, "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad",
    "tokenizer_padding_side": "right", "use_cache": False, "output_hidden_states": True,
    "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
}


def test_saved_config_json_has_the_official_training_fields(tmp_path):
    pytest.importorskip("safetensors")
    model = tiny_model(torch.float32)
    folder = model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    expected = dict(OFFICIAL_TRAINING_FIELDS, mm_hidden_size=40, vq_codebook_size=K, vocab_size=28,
                    tokenizer_model_max_length=CONFIGS["tiny"].tokenizer_model_max_length, torch_dtype="float32")
    missing = sorted(set(expected) - set(saved))
    assert not missing, f"config.json lacks {missing}"
    for key, value in expected.items():
        assert saved[key] == value, key

    # our loader reads the folder back (the official fields are kept, not needed) and re-saves the tower path
    loaded = TokenFlowT2I.from_pretrained(folder, codebook=model.codebook)
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.mm_vision_tower == OFFICIAL_TRAINING_FIELDS["mm_vision_tower"]
    custom = model.save_pretrained(tmp_path / "custom", vision_tower="/ckpt/tokenflow_clipb_32k_enhanced.pt")
    again = TokenFlowT2I.from_pretrained(custom).save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["mm_vision_tower"] == \
        "/ckpt/tokenflow_clipb_32k_enhanced.pt"
    half = TokenFlowT2I.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(tmp_path / "half")
    assert json.loads((tmp_path / "half" / "config.json").read_text())["torch_dtype"] == "bfloat16"

    # an official config.json (no tokenflow_ext section) with these fields, and an old one without them, load
    tiny = CONFIGS["tiny"]
    for name, drop in (("official", ["tokenflow_ext"]), ("old", ["tokenflow_ext", *OFFICIAL_TRAINING_FIELDS])):
        hf = {key: value for key, value in saved.items() if key not in drop or key in ("model_type", "architectures")}
        if name == "official":  # run_llava_samples.py turns the enum into str(VQType.TOKEN_FLOW) before any re-save
            hf["mm_vision_vq_type"] = "VQType.TOKEN_FLOW"
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(hf))
        save_file_from(model, tmp_path / name)
        other = TokenFlowT2I.from_pretrained(tmp_path / name, scales=tiny.scales, image_token_start=START,
                                             pad_token_id=PAD, max_text_tokens=tiny.max_text_tokens)
        assert dataclasses.replace(other.config, name="tiny") == tiny, name
    hf["mm_vision_vq_type"] = "CLIP"  # a multimodal-understanding (CLIP tower) folder is not a TokenFlow t2i model
    with pytest.raises(ValueError, match="mm_vision_vq_type"):
        T2IConfig.from_hf_config(hf)


def save_file_from(model, folder):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


def test_sharded_save_and_hub_id_load(tmp_path, monkeypatch):
    """A folder above the shard limit is written as shards plus the standard index; the same folder, placed in
    a Hub cache built here in the real layout, loads offline by its Hub id with the same tensors."""
    import shutil

    model = tiny_model(dtype=torch.float32)
    folder = model.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    names = sorted(os.listdir(folder))
    shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
    assert "model.safetensors.index.json" in names and len(shards) > 1 and "model.safetensors" not in names
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    by_path = TokenFlowT2I.from_pretrained(folder)
    snapshot = tmp_path / "hub" / "models--org--t2i" / "snapshots" / ("c" * 40)
    shutil.copytree(folder, snapshot)
    (tmp_path / "hub" / "models--org--t2i" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--t2i" / "refs" / "main").write_text("c" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_id = TokenFlowT2I.from_pretrained("org/t2i", cache_dir=tmp_path / "hub")
    for key, value in by_path.state_dict().items():
        assert torch.equal(value, by_id.state_dict()[key]), key
        assert torch.equal(value, model.state_dict()[key].to(value.dtype)), key
