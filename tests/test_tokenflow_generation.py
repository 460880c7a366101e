"""TokenFlow scale-wise sampling utilities against small hand-computed cases, and the tokenize CLI."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenflow_ext.__main__ import main
from tokenflow_ext.models.tokenflow import generation as gen

from tokenflow_tiny import tiny_tokenizer

NEG = float("-inf")


def test_top_k_drops_strictly_below_the_kth_and_keeps_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.5]])
    # k = 2: the second largest is 2.0, tied: both 2.0 stay, so three logits survive
    assert torch.equal(gen.top_k_top_p_filter(logits, top_k=2), torch.tensor([[NEG, 3.0, 2.0, 2.0, NEG]]))
    assert torch.equal(gen.top_k_top_p_filter(logits, top_k=3), torch.tensor([[NEG, 3.0, 2.0, 2.0, NEG]]))
    assert torch.equal(gen.top_k_top_p_filter(logits, top_k=4), torch.tensor([[1.0, 3.0, 2.0, 2.0, NEG]]))
    assert torch.equal(gen.top_k_top_p_filter(logits, top_k=1), torch.tensor([[NEG, 3.0, NEG, NEG, NEG]]))
    assert torch.equal(gen.top_k_top_p_filter(logits, top_k=99), logits)  # k > V keeps everything
    assert torch.equal(gen.top_k_top_p_filter(logits), logits)


def test_top_p_drops_the_low_tail_and_keeps_the_top_one():
    probabilities = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probabilities.log()
    # ascending cumsum: 0.05, 0.20, 0.50, 1.0; drop entries <= 1 - p
    kept = lambda p: torch.isfinite(gen.top_k_top_p_filter(logits, top_p=p))  # noqa: E731
    assert kept(0.8).tolist() == [[True, True, False, False]]   # 1 - p = 0.2: drops 0.05 and 0.15 (cum 0.20)
    assert kept(0.9).tolist() == [[True, True, True, False]]    # 0.1: drops 0.05 only
    assert kept(0.01).tolist() == [[True, False, False, False]]  # only the top-1 survives
    shuffled = logits[:, [2, 0, 3, 1]]
    assert kept(0.8)[:, [2, 0, 3, 1]].tolist() == torch.isfinite(gen.top_k_top_p_filter(shuffled, top_p=0.8)).tolist()


def test_filter_is_out_of_place_and_combined_order():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    copy = logits.clone()
    out = gen.top_k_top_p_filter(logits, top_k=3, top_p=0.5)
    assert torch.equal(logits, copy)
    assert torch.isfinite(out).tolist() == [[True, False, False, False]]


def test_guidance_ramp_values():
    assert [gen.guidance_ramp(7.5, si, 9) for si in (0, 4, 8)] == [0.0, 3.75, 7.5]
    assert gen.guidance_ramp(2.0, 0, 1) == 0.0
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert gen.guided_logits(cond, uncond, 3.0).item() == 4.0 * 2 - 3.0


def test_scale_attention_mask_pattern():
    blocked = torch.finfo(torch.float32).min
    mask = gen.scale_attention_mask((1, 2), text_length=2, total_length=8)
    assert mask.shape == (8, 8)
    allowed = mask == 0
    # positions: 0 text, 1 last text (scale 0), 2..5 inputs of scale 1, 6..7 after (causal)
    expected = torch.tril(torch.ones(8, 8, dtype=torch.bool))
    expected[2:6, 2:6] = True           # scale 1 sees itself both ways
    expected[1, 1] = True
    assert torch.equal(allowed, expected)
    assert mask[1, 2] == blocked and mask[2, 5] == 0 and mask[5, 1] == 0
    assert gen.input_level_ids((1, 2, 3)).tolist() == [2] * 4 + [3] * 9
    with pytest.raises(ValueError):
        gen.scale_attention_mask((1, 2), text_length=0)


def test_progressive_inputs_by_hand():
    scales = (1, 2)
    codes = torch.arange(5 * 2, dtype=torch.float32).reshape(1, 5, 2)  # C = 2
    inputs = gen.progressive_inputs(codes, scales)
    upsampled = F.interpolate(codes[:, :1].transpose(1, 2).reshape(1, 2, 1, 1), size=(2, 2), mode="bicubic")
    assert torch.allclose(inputs, upsampled.flatten(2).transpose(1, 2))
    assert torch.allclose(inputs[0, :, 0], torch.zeros(4)) and torch.allclose(inputs[0, :, 1], torch.ones(4))
    refined = gen.progressive_inputs(codes, scales, refine_scale=1)  # f includes scale 1's own codes
    assert torch.allclose(refined, inputs + codes[:, 1:])
    three = gen.progressive_inputs(torch.randn(2, 1 + 4 + 9, 3), (1, 2, 3))
    assert three.shape == (2, 13, 3)
    with pytest.raises(ValueError):
        gen.progressive_inputs(codes, (1, 2, 3))
    with pytest.raises(ValueError):
        gen.progressive_inputs(codes, scales, refine_scale=0)


def test_image_vocabulary_excludes_text_and_pad():
    logits = torch.zeros(1, 1, 10)
    logits[..., 9] = 100.0  # a [PAD] after the image vocabulary: the official sampler could draw it
    logits[..., 0] = 100.0  # a text token
    image = gen.image_vocabulary_logits(logits, image_token_start=2, image_vocab_size=7)
    assert image.shape == (1, 1, 7)
    draws = gen.sample_logits(image.expand(1, 500, 7), generator=torch.Generator().manual_seed(0))
    assert draws.min() >= 0 and draws.max() < 7
    with pytest.raises(ValueError):
        gen.image_vocabulary_logits(logits, image_token_start=5, image_vocab_size=7)


def test_sample_logits_follows_the_distribution():
    probabilities = torch.tensor([0.7, 0.2, 0.1])
    draws = gen.sample_logits(probabilities.log().expand(20000, 3), generator=torch.Generator().manual_seed(1))
    frequencies = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(frequencies, probabilities, atol=0.02)


def test_sample_scalewise_with_a_toy_model_and_refinement():
    scales, vocab, start = (1, 2, 3), 16, 3
    codebook = torch.randn(vocab, 4)
    calls = []

    def logits_fn(inputs, step):
        calls.append((step.scale_index, step.pass_index, inputs.shape))
        count = step.scale * step.scale
        logits = torch.full((4, count, start + vocab + 1), -50.0)
        target = (torch.arange(count) + step.scale_index + 3 * step.pass_index) % vocab
        logits[:2, torch.arange(count), start + target] = 50.0                  # conditional rows
        logits[2:, torch.arange(count), start + (target + 1) % vocab] = 50.0   # unconditional rows
        logits[..., -1] = 1e4  # [PAD]: never drawn because the image vocabulary is sliced
        return logits

    codes = gen.sample_scalewise(logits_fn, lambda idx: codebook[idx], scales, batch_size=2, guidance_scale=2.0,
                                 refinement=3, image_token_start=start, image_vocab_size=vocab,
                                 generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 14)
    assert [(c[0], c[1]) for c in calls] == [(0, 0), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert all(shape == (2, 13, 4) for _, _, shape in calls)
    # The last pass (k = 1, greedy) decides: target of pass 2. At scale 0, t = 0: the cond logits alone decide.
    assert codes[:, 0].tolist() == [0, 0]
    assert codes[0, 1:5].tolist() == [(i + 1 + 6) % vocab for i in range(4)]
    assert codes[0, 5:].tolist() == [(i + 2 + 6) % vocab for i in range(9)]
    with pytest.raises(ValueError, match="2B"):
        gen.sample_scalewise(lambda inputs, step: torch.zeros(2, 1, vocab), lambda idx: codebook[idx], scales, 2)


def test_tokenize_cli_writes_indices_and_reconstruction(tmp_path, capsys):
    image_module = pytest.importorskip("PIL.Image")
    tokenizer = tiny_tokenizer("clipb_256").eval()
    checkpoint = tokenizer.save_pretrained(tmp_path / "tiny.pt")
    picture = os.fspath(tmp_path / "photo.png")
    image_module.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(picture)
    out = tmp_path / "out"
    assert main(["tokenize", picture, "--checkpoint", checkpoint, "--out-dir", os.fspath(out)]) == 0
    printed = capsys.readouterr().out
    assert "21 tokens" in printed and "encode" in printed and "decode" in printed
    indices = np.load(out / "photo.tokens.npy")
    assert indices.shape == (21,) and indices.dtype == np.int64 and indices.max() < 64
    with image_module.open(out / "photo.recon.png") as reconstruction:
        assert reconstruction.size == (32, 32)
    from tokenflow_ext.models.tokenflow.cli import load_image
    expected = tokenizer.tokenize(load_image(picture, 32))[0].numpy()
    assert np.array_equal(indices, expected)
    assert main(["tokenize", os.fspath(tmp_path / "absent.png"), "--checkpoint", checkpoint,
                 "--out-dir", os.fspath(out)]) == 1  # a per-file error: exit status 1 at the end


# ------------------------------------------------------------------------------------- tokenize CLI robustness


def test_load_image_scales_16_bit_and_float_and_composites_alpha_on_white(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    from tokenflow_ext.models.tokenflow.cli import load_image

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    path16 = os.fspath(tmp_path / "ramp16.png")
    image_module.fromarray((ramp * 65535).astype(np.uint16)).save(path16)
    path8 = os.fspath(tmp_path / "ramp8.png")
    image_module.fromarray((ramp * 255).round().astype(np.uint8)).save(path8)
    deep, shallow = load_image(path16, 32), load_image(path8, 32)
    assert (deep > 0.99).float().mean() < 0.05  # was 91 %+ white: convert("RGB") clipped the 16-bit values
    assert torch.allclose(deep, shallow, atol=0.02)
    path_f = os.fspath(tmp_path / "ramp.tiff")
    image_module.fromarray(ramp.astype(np.float32), mode="F").save(path_f)
    assert torch.allclose(load_image(path_f, 32), shallow, atol=0.02)
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)  # fully transparent black
    path_rgba = os.fspath(tmp_path / "clear.png")
    image_module.fromarray(rgba, mode="RGBA").save(path_rgba)
    assert torch.equal(load_image(path_rgba, 32), torch.ones(1, 3, 32, 32))


def _cli_setup(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    checkpoint = tiny_tokenizer("clipb_256").eval().save_pretrained(tmp_path / "tiny.pt")
    pictures = []
    for folder in ("one", "two"):
        os.makedirs(tmp_path / folder)
        pictures.append(os.fspath(tmp_path / folder / "photo.png"))
        pixels = np.random.default_rng(len(pictures)).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        image_module.fromarray(pixels).save(pictures[-1])
    return checkpoint, pictures


def test_tokenize_cli_reports_bad_files_one_line_each_and_keeps_going(tmp_path, capsys):
    checkpoint, (first, second) = _cli_setup(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(open(first, "rb").read()[:200])
    out = tmp_path / "out"
    arguments = ["tokenize", first, os.fspath(text), os.fspath(truncated), os.fspath(tmp_path / "absent.png"),
                 second, "--checkpoint", checkpoint, "--out-dir", os.fspath(out)]
    assert main(arguments) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 4 and errors[-1] == "tokenize: 3 of 5 file(s) failed"
    for bad, line in zip(["notes.png", "cut.png", "absent.png"], errors):
        assert line.startswith("tokenize: ") and bad in line
    # the same file name twice: two outputs, neither overwritten
    assert (out / "photo.tokens.npy").exists() and (out / "photo-2.tokens.npy").exists()
    assert (out / "photo.recon.png").exists() and (out / "photo-2.recon.png").exists()
    assert not np.array_equal(np.load(out / "photo.tokens.npy"), np.load(out / "photo-2.tokens.npy"))


def test_tokenize_cli_setup_errors_are_one_line_and_exit_2(tmp_path, capsys):
    checkpoint, (picture, _) = _cli_setup(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    text = tmp_path / "text.pt"
    text.write_text("hello")
    cases = [
        (["--checkpoint", checkpoint, "--out-dir", os.fspath(blocker / "sub")], "--out-dir"),
        (["--checkpoint", checkpoint, "--out-dir", os.fspath(blocker)], "--out-dir"),
        (["--checkpoint", os.fspath(tmp_path / "absent.pt")], "absent.pt"),
        (["--checkpoint", os.fspath(empty)], "empty"),
        (["--checkpoint", os.fspath(text)], "not a readable checkpoint"),
        (["--checkpoint", os.fspath(tmp_path)], "directory"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--checkpoint", checkpoint, "--device", "cuda"], "CUDA is not available"))
    for extra, expected in cases:
        arguments = ["tokenize", picture] + ([] if "--out-dir" in extra else ["--out-dir", os.fspath(tmp_path / "o")])
        assert main(arguments + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (extra, err)


def test_output_stems_never_collide():
    from tokenflow_ext.models.tokenflow.cli import output_stems

    stems = output_stems(["a/x.png", "b/x.jpg", "x-2.png", "c/x.png", "y.png"], "out")
    assert len(set(stems)) == 5 and stems[0] == os.path.join("out", "x") and stems[4] == os.path.join("out", "y")
