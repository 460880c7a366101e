"""``eval reconstruction``: the official protocol's PSNR/SSIM equal scikit-image's on real photographs; a tiny
tokenizer's report over a folder of photographs is recomputed here from its saved reconstructions; an
interrupted evaluation resumes to the same report; the command runs end to end."""

import json
import os

import numpy as np
import pytest
import torch

from tokenflow_ext.eval import protocol
from tokenflow_ext.eval.reconstruction import ReconstructionEval, evaluate_reconstruction
from tokenflow_tiny import tiny_tokenizer
from train_helpers import PHOTOS, make_image_folder, photo_folder

skimage_metrics = pytest.importorskip("skimage.metrics")


def _photo(name, size):
    from PIL import Image

    with Image.open(os.path.join(photo_folder(), name)) as image:
        return protocol.center_crop_arr(image, size)


@pytest.mark.parametrize("name", PHOTOS)
def test_psnr_and_ssim_equal_scikit_image_on_photographs(name):
    truth = _photo(name, 64).astype(np.float32) / 255.0
    rng = np.random.default_rng(0)
    restored = np.clip(truth + rng.normal(0, 0.05, truth.shape), 0, 1)
    restored = (np.round(restored * 255) / 255).astype(np.float32)  # a uint8 reconstruction, as officially
    ours_psnr = protocol.psnr(torch.from_numpy(restored)[None], torch.from_numpy(truth)[None])
    ours_ssim = protocol.ssim(torch.from_numpy(restored)[None], torch.from_numpy(truth)[None])
    assert float(ours_psnr) == pytest.approx(skimage_metrics.peak_signal_noise_ratio(restored, truth), rel=1e-6)
    official = skimage_metrics.structural_similarity(restored, truth, data_range=2.0, channel_axis=-1)
    assert float(ours_ssim) == pytest.approx(official, abs=2e-6)
    unit = skimage_metrics.structural_similarity(restored, truth, data_range=1.0, channel_axis=-1)
    assert float(protocol.ssim(torch.from_numpy(restored)[None], torch.from_numpy(truth)[None], 1.0)) == \
        pytest.approx(unit, abs=2e-6)


def test_center_crop_matches_the_adm_steps():
    from PIL import Image

    with Image.open(os.path.join(photo_folder(), "astronaut.png")) as image:  # 512 x 512: halved twice for 100
        crop = protocol.center_crop_arr(image, 100)
        step = image.convert("RGB").resize((256, 256), Image.BOX).resize((128, 128), Image.BOX)
        expected = np.asarray(step.resize((100, 100), Image.BICUBIC))
    assert crop.shape == (100, 100, 3) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, expected)


class PixelStatistics(torch.nn.Module):
    """A stand-in for the Inception network in plumbing tests: 6 features per image."""

    def features(self, images):
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1).double()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("photos"), photos=PHOTOS, generated=2)
    with open(os.path.join(root, "broken.png"), "wb") as handle:
        handle.write(b"not an image")
    return root


def _settings(folder, out, **fields):
    return ReconstructionEval(data=folder, out_dir=str(out), batch_size=3, shard_size=3, progress=False,
                              save_reconstructions=True, **fields)


def test_report_numbers_recomputed_from_the_saved_reconstructions(folder, tmp_path):
    tokenizer = tiny_tokenizer()
    with pytest.warns(RuntimeWarning, match="broken.png"):
        report = evaluate_reconstruction(tokenizer, _settings(folder, tmp_path), inception=PixelStatistics())
    from PIL import Image
    from scipy import linalg

    from tokenflow_ext.train.data import IMAGE_EXTENSIONS, list_files

    files = [f for f in list_files(folder, IMAGE_EXTENSIONS) if not f.endswith("broken.png")]
    assert report["images"] == len(files) == 7 and report["skipped"] == ["broken.png"]
    psnr, ssim, real, fake, indices = [], [], [], [], []
    for path in files:
        truth_uint8 = _photo_from(path, 32)
        name = os.path.splitext(os.path.relpath(path, folder))[0] + ".png"
        restored = np.asarray(Image.open(tmp_path / "reconstructions" / name))
        truth = ((truth_uint8.astype(np.float32) / 255.0 - 0.5) / 0.5 + 1.0) / 2.0
        psnr.append(skimage_metrics.peak_signal_noise_ratio(restored.astype(np.float32) / 255.0, truth))
        ssim.append(skimage_metrics.structural_similarity(restored.astype(np.float32) / 255.0, truth,
                                                          data_range=2.0, channel_axis=-1))
        real.append(PixelStatistics().features(torch.from_numpy(np.clip(truth * 255, 0, 255).astype(np.uint8))
                                               .permute(2, 0, 1)[None].float() / 255)[0].numpy())
        fake.append(PixelStatistics().features(torch.from_numpy(restored).permute(2, 0, 1)[None].float() / 255)[0]
                    .numpy())
        indices.append(tokenizer.tokenize(protocol.to_model_input(truth_uint8[None]))[0])
    assert report["psnr"] == pytest.approx(np.mean(psnr), rel=1e-5)
    assert report["ssim"] == pytest.approx(np.mean(ssim), abs=1e-5)
    mu1, mu2 = np.mean(real, 0), np.mean(fake, 0)
    s1, s2 = np.cov(np.array(real), rowvar=False), np.cov(np.array(fake), rowvar=False)
    expected_fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert report["rfid"] == pytest.approx(expected_fid, rel=1e-4, abs=1e-6)
    last_scale = torch.stack(indices)[:, -16:].reshape(-1)  # the 4x4 scale of the tiny config
    counts = torch.bincount(last_scale, minlength=64)
    assert report["scales"][-1]["codes_used"] == int((counts > 0).sum())
    assert report["lpips"] is None and os.path.exists(tmp_path / "grid.png")
    assert json.load(open(tmp_path / "report.json"))["psnr"] == report["psnr"]
    assert "| PSNR (dB) | SSIM | LPIPS | rFID |" in open(tmp_path / "report.md").read()


def _photo_from(path, size):
    from PIL import Image

    with Image.open(path) as image:
        return protocol.center_crop_arr(image, size)


def test_an_interrupted_evaluation_resumes_to_the_same_report(folder, tmp_path, monkeypatch):
    from tokenflow_ext.eval import reconstruction

    tokenizer = tiny_tokenizer()
    straight = evaluate_reconstruction(tokenizer, _settings(folder, tmp_path / "a"), inception=PixelStatistics())
    real_shard, calls = reconstruction._evaluate_shard, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_shard(*args, **kwargs)

    monkeypatch.setattr(reconstruction, "_evaluate_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        evaluate_reconstruction(tokenizer, _settings(folder, tmp_path / "b"), inception=PixelStatistics())
    assert sorted(os.listdir(tmp_path / "b" / "shards")) == ["shard_00000.npz"]
    monkeypatch.setattr(reconstruction, "_evaluate_shard", real_shard)
    resumed = evaluate_reconstruction(tokenizer, _settings(folder, tmp_path / "b"), inception=PixelStatistics())
    assert resumed == straight
    with pytest.raises(ValueError, match="other settings"):  # another image size: the shards do not fit
        evaluate_reconstruction(tokenizer, _settings(folder, tmp_path / "b", image_size=48), inception=None)


def test_eval_command_end_to_end(folder, tmp_path, capsys):
    from tokenflow_ext.__main__ import main

    checkpoint = tmp_path / "tiny.pt"
    tiny_tokenizer().save_pretrained(checkpoint)
    out = tmp_path / "report"
    assert main(["eval", "reconstruction", "--checkpoint", str(checkpoint), "--data", folder, "--out", str(out),
                 "--no-progress", "--limit", "4", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "no --inception-weights" in captured.err and "| PSNR (dB) |" in captured.out
    written = json.load(open(out / "report.json"))
    assert (written["listed"], written["images"], written["skipped"]) == (4, 3, ["broken.png"])
    assert main(["eval", "reconstruction", "--checkpoint", str(tmp_path / "missing.pt"), "--data", folder]) == 2
    assert "not found" in capsys.readouterr().err


def test_clip_score_is_the_clipped_scaled_cosine():
    from tokenflow_ext.eval.clip_score import clip_score

    image_features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    text_features = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 0.0]), "c": torch.tensor([-1.0, -1.0])}
    score = clip_score(torch.arange(3), ["a", "b", "c"], lambda index: image_features[index],
                       lambda prompts: torch.stack([text_features[p] for p in prompts]))
    assert score == pytest.approx((100 * 1.0 + 100 * 0.0 + 0.0) / 3)  # cosines 1, 0 and -1 (clipped to 0)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        clip_score(torch.arange(3), ["a", "b"], None, None)


def test_generation_fid_against_a_folder_and_saved_statistics(folder, tmp_path):
    from scipy import linalg

    from tokenflow_ext.eval.generation import fid_between, folder_features

    generated = make_image_folder(tmp_path / "generated", photos=PHOTOS[:2], generated=3, nested=False)
    with pytest.warns(RuntimeWarning, match="broken.png"):
        result = fid_between(generated, folder, PixelStatistics(), save_stats=str(tmp_path / "g.npz"), batch_size=2,
                             progress=False)
    features = {}
    for name, root in (("g", generated), ("r", folder)):
        rows = []
        from PIL import Image
        from tokenflow_ext.train.data import IMAGE_EXTENSIONS, list_files

        for path in list_files(root, IMAGE_EXTENSIONS):
            if path.endswith("broken.png"):
                continue
            array = np.asarray(Image.open(path).convert("RGB"))
            rows.append(PixelStatistics().features(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255)[0])
        features[name] = torch.stack(rows).numpy()
    mu_g, mu_r = features["g"].mean(0), features["r"].mean(0)
    s_g, s_r = np.cov(features["g"], rowvar=False), np.cov(features["r"], rowvar=False)
    expected = ((mu_g - mu_r) ** 2).sum() + np.trace(s_g + s_r) - 2 * np.trace(linalg.sqrtm(s_g @ s_r).real)
    assert result["fid"] == pytest.approx(expected, rel=1e-5)
    assert (result["generated_images"], result["reference_images"]) == (5, 7)
    again = fid_between(str(tmp_path / "g.npz"), folder, PixelStatistics(), progress=False)  # statistics reused
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-9) and again["generated_images"] == -1
    batched, _ = folder_features(generated, PixelStatistics(), batch_size=2, progress=False)
    np.testing.assert_allclose(batched, features["g"], rtol=1e-6)


def test_eval_generation_command_says_where_the_inception_weights_are(folder, tmp_path, capsys):
    from tokenflow_ext.__main__ import main

    assert main(["eval", "generation", "--generated", folder, "--reference", folder, "--inception-weights",
                 str(tmp_path / "pt_inception.pth"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "pt_inception.pth" in err and "pytorch-fid/releases" in err
