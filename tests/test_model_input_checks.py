"""Issue 25: the image entry points reject images in a clearly wrong range (0-255 floats, [-1, 1] images given to a
[0, 1] model) with an error naming the argument, the expected range and the values seen; the tokenize command
says where it writes and labels a custom config as such."""

import argparse
import os

import numpy as np
import pytest
import torch

from tokenflow_ext.models import FlowTiTok, FlowTok, TokenFlowTokenizer
from tokenflow_ext.models.flowtok import CLIPTextEncoder
from tokenflow_ext.models.flowtok import flowtitok as flowtitok_module
from tokenflow_ext.models.tokenflow import CONFIGS, TokenFlowConfig
from tokenflow_ext.models.tokenflow import cli as tokenize_cli
from tokenflow_ext.models.tokenflow import tokenizer as tokenizer_module

from tokenflow_tiny import tiny_images, tiny_tokenizer

TINY_FLOW = dict(clip_dim=24, text_layers=1, text_heads=2, text_hidden=32, text_dropout=0.0)
TINY_TITOK = dict(patch_size=8, encoder_size=(32, 1, 2), decoder_size=(32, 1, 2), text_dim=24)


@pytest.fixture(autouse=True)
def _one_thread():  # tiny models: a second thread only waits on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_flowtok():
    torch.manual_seed(0)
    text_encoder = CLIPTextEncoder(width=24, layers=1, heads=2, vocab_size=100, embed_dim=24)
    return FlowTok((1, 32, 2), text_encoder=text_encoder, tokenizer=FlowTiTok(image_size=32, **TINY_TITOK),
                   **TINY_FLOW).eval()


def count_checks(monkeypatch, module):
    calls = []
    original = module.check_image_range

    def counting(*args, **kwargs):
        calls.append(args[1:4])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "check_image_range", counting)
    return calls


# ------------------------------------------------------------------------------------- TokenFlow: [-1, 1]


@pytest.mark.parametrize("entry", ["encode", "tokenize", "understanding_features", "forward"])
def test_tokenflow_entry_points_reject_0_255_floats(entry):
    tokenizer = tiny_tokenizer().eval()
    images = (tiny_images(tokenizer) + 1) * 127.5  # 0-255 floats: were silently clamped to white
    with pytest.raises(ValueError) as error:
        getattr(tokenizer, entry)(images)
    message = str(error.value)
    assert "images must be in [-1, 1]" in message and "images / 127.5 - 1" in message, message
    low, high = float(images.min()), float(images.max())
    assert f"{low:.4g}" in message and f"{high:.4g}" in message


def test_tokenflow_accepts_overshoot_and_names_uint8():
    tokenizer = tiny_tokenizer().eval()
    images = tiny_images(tokenizer)
    overshoot = images * 1.3  # bicubic resampling overshoots [-1, 1] a little
    assert torch.equal(tokenizer.tokenize(overshoot), tokenizer.tokenize(overshoot.clone()))
    with pytest.raises(ValueError, match="mean/std-normalised"):
        tokenizer.encode(images * 3)
    with pytest.raises(TypeError, match=r"floating point.*uint8 images are not accepted.*127\.5 - 1"):
        tokenizer.encode(((images + 1) * 127.5).to(torch.uint8))


def test_tokenflow_checks_once_per_call(monkeypatch):
    tokenizer = tiny_tokenizer().eval()
    calls = count_checks(monkeypatch, tokenizer_module)
    images = tiny_images(tokenizer)
    tokenizer.tokenize(images)
    tokenizer(images)
    assert calls == [("TokenFlowTokenizer", -1.0, 1.0)] * 2  # tokenize -> encode, forward -> encode: one each


# ------------------------------------------------------------------------------------- FlowTok: [0, 1]


def test_flowtitok_rejects_0_255_and_minus_one_to_one_images():
    tokenizer = FlowTiTok(image_size=32, **TINY_TITOK).eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for entry in (tokenizer.encode, tokenizer.posterior):
        with pytest.raises(ValueError, match=r"FlowTiTok: images must be in \[0, 1\].*images / 255"):
            entry(images * 255)
        with pytest.raises(ValueError, match=r"images must be in \[0, 1\].*\(images \+ 1\) / 2"):
            entry(images * 2 - 1)
    tokenizer.encode(images * 1.2 - 0.1)  # slight overshoot passes
    with pytest.raises(TypeError, match=r"uint8 images are not accepted.*images.float\(\) / 255"):
        tokenizer.encode((images * 255).to(torch.uint8))


def test_flowtok_image_paths_reject_0_255_images_once_per_call(monkeypatch):
    model = tiny_flowtok()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 100, (2, 77))
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\]"):
        model.image_to_text(images * 255, num_steps=1)
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\]"):
        model.training_loss(images * 255, ids)
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\]"):
        model.image_latents(images * 2 - 1)
    calls = count_checks(monkeypatch, flowtitok_module)
    model.image_to_text(images, num_steps=1)
    model.training_loss(images, ids)
    assert calls == [("FlowTiTok", 0.0, 1.0)] * 2
    model.training_loss(torch.randn(2, 77, 16) * 50, ids)  # latents are not images: no range check
    assert len(calls) == 2


def test_empty_and_meta_images_are_not_read():
    tokenizer_module.check_image_range(torch.zeros(0, 3, 4, 4), "X", 0.0, 1.0)
    tokenizer_module.check_image_range(torch.empty(1, 3, 4, 4, device="meta"), "X", 0.0, 1.0)
    with pytest.raises(ValueError, match="pixels must be in"):
        tokenizer_module.check_image_range(torch.full((1, 3, 4, 4), 9.0), "X", 0.0, 1.0, argument="pixels")


# ------------------------------------------------------------------------------------- tokenize command


def test_tokenize_help_states_the_default_output_folder():
    parser = argparse.ArgumentParser()
    tokenize_cli.add_arguments(parser)
    assert "default: the current folder" in " ".join(parser.format_help().split())


def test_config_label_names_official_and_custom_configs():
    assert tokenize_cli.config_label(CONFIGS["clipb_256"]) == "clipb_256"
    enhanced = CONFIGS["clipb_256"].replace(enhanced_decoder=True)
    assert tokenize_cli.config_label(enhanced) == "clipb_256, enhanced decoder"
    overridden = CONFIGS["clipb_256"].replace(codebook_size=1024, scales=(1, 2, 4, 16))
    label = tokenize_cli.config_label(overridden)
    assert label.startswith("custom config based on clipb_256") and "scales" in label and "codebook_size" in label
    from_json = TokenFlowConfig(**{**vars(overridden), "name": "my_run"})
    assert tokenize_cli.config_label(from_json) == "custom config 'my_run'"


def test_tokenize_cli_labels_a_custom_config_by_what_it_is(tmp_path, capsys):
    image_module = pytest.importorskip("PIL.Image")
    from tokenflow_ext.__main__ import main

    checkpoint = tiny_tokenizer("clipb_256").eval().save_pretrained(tmp_path / "tiny.pt")  # named clipb_256
    picture = os.fspath(tmp_path / "photo.png")
    image_module.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(picture)
    assert main(["tokenize", picture, "--checkpoint", checkpoint, "--out-dir", os.fspath(tmp_path / "out"),
                 "--no-reconstruction"]) == 0
    loaded = capsys.readouterr().out.splitlines()[0]
    assert "(clipb_256," not in loaded and "custom config based on clipb_256, changed: image_size" in loaded, loaded
