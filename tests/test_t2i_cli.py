"""``python -m tokenflow_ext generate`` (issue 13, part 5) on tiny random-weight checkpoints written to disk."""

import os

import pytest
import torch
from PIL import Image

from tokenflow_ext.__main__ import main
from tokenflow_ext.models import TokenFlowT2I
from tokenflow_ext.models.tokenflow import t2i_cli

from tokenflow_tiny import tiny_tokenizer

WORDS = {"<img>": [7, 8], "a": [3], "red": [4], "bus": [5], "no": [6]}


def word_tokenizer(text):
    return [i for word in text.split() for i in WORDS[word]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tokenizer = tiny_tokenizer("clipb_256")  # scales (1, 2, 4), 64 codes, 32 px images
    tokenizer_file = tokenizer.save_pretrained(str(folder / "tokenizer.pt"))
    torch.manual_seed(0)
    model = TokenFlowT2I("tiny", scales=(1, 2, 4), image_vocab_size=64, vocab_size=76, pad_token_id=75)
    t2i_dir = model.save_pretrained(str(folder / "t2i"))
    return t2i_dir, tokenizer_file


@pytest.fixture
def text_tokenizer(monkeypatch):
    monkeypatch.setattr(t2i_cli, "load_text_tokenizer", lambda path: word_tokenizer)


@pytest.mark.parametrize("sampler", ["fused", "python"])
def test_generate_writes_pngs(checkpoints, text_tokenizer, tmp_path, capsys, sampler):
    t2i_dir, tokenizer_file = checkpoints
    out = tmp_path / "out"
    argv = ["generate", "a red bus", "bus", "--t2i-checkpoint", t2i_dir, "--tokenizer-checkpoint", tokenizer_file,
            "--out", str(out), "--negative-prompt", "no", "--refinement", "loop3", "--top-k", "20",
            "--sampler", sampler, "--seed", "3"]
    assert main(argv) == 0
    names = sorted(os.listdir(out))
    assert names == ["000_a_red_bus.png", "001_bus.png"]
    with Image.open(out / names[0]) as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    captured = capsys.readouterr()
    assert "2 image(s)" in captured.out and "scales" in captured.err  # the progress bar over the 3 scales
    first = (out / names[0]).read_bytes()
    assert main(argv) == 0 and (out / names[0]).read_bytes() == first  # reproducible per seed


def test_generate_reports_missing_files(checkpoints, text_tokenizer, tmp_path, capsys):
    t2i_dir, tokenizer_file = checkpoints
    base = ["generate", "a", "--out", str(tmp_path / "o")]
    assert main(base + ["--t2i-checkpoint", str(tmp_path / "nope"), "--tokenizer-checkpoint", tokenizer_file]) == 2
    assert "--t2i-checkpoint" in capsys.readouterr().err
    assert main(base + ["--t2i-checkpoint", str(tmp_path), "--tokenizer-checkpoint", tokenizer_file]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(base + ["--t2i-checkpoint", t2i_dir, "--tokenizer-checkpoint", str(tmp_path / "tok.pt")]) == 2
    assert "--tokenizer-checkpoint" in capsys.readouterr().err
    assert main(base + ["--t2i-checkpoint", t2i_dir, "--tokenizer-checkpoint", tokenizer_file,
                        "--text-tokenizer", str(tmp_path / "none")]) == 2
    assert "--text-tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_transformers_is_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError("no transformers here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(t2i_cli.CliError, match="pip install transformers"):
        t2i_cli.load_text_tokenizer(".")
