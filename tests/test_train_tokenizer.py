"""TokenFlow tokenizer training on real photographs: it learns, logs, checkpoints, resumes exactly."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from tokenflow_ext.models import TokenFlowTokenizer
from tokenflow_ext.train import metrics
from tokenflow_ext.train.data import DataError
from tokenflow_ext.train.tokenizer import TokenizerTrainer
from train_helpers import make_image_folder, random_lpips, random_teacher, tiny_config

PSNR_MARGIN_DB = 5.0  # the overfit test's required rise in reconstruction PSNR within OVERFIT_STEPS
OVERFIT_STEPS = 30


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("photos"))


def test_tiny_tokenizer_overfits_real_photographs(photos, tmp_path):
    config = tiny_config(tmp_path, photos, steps=OVERFIT_STEPS, log_every=10, eval_every=OVERFIT_STEPS,
                         ckpt_every=OVERFIT_STEPS, random_crop=False, flip=False, semantic_weight=1.0,
                         perceptual_weight=0.0, ema_decay=0.9)  # LPIPS is checked in test_train_losses
    trainer = TokenizerTrainer(config, lpips=random_lpips(), teacher=random_teacher())
    before = trainer.evaluate()
    last = trainer.run()
    after = trainer.evaluate()
    assert after["psnr"] > before["psnr"] + PSNR_MARGIN_DB, (before, after)
    assert after["ssim"] > before["ssim"]
    assert after["codes_used"] > 1 and last["codebook_usage"] > 1 / 64
    run = config.out_dir
    rows = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [10, 20, 30]
    assert {"rec_loss", "p_loss", "vq_loss", "commit_loss", "vqkd_loss", "codebook_usage"} <= set(rows[0])
    assert open(os.path.join(run, "log.csv")).readline().startswith("step,kind,")
    assert os.path.exists(os.path.join(run, "samples", f"step_{OVERFIT_STEPS:07d}.png"))
    # the checkpoint loads with from_pretrained (the EMA weights, as official loaders prefer "ema")
    loaded = TokenFlowTokenizer.from_pretrained(os.path.join(run, "checkpoints", "last.pt"))
    images = trainer.eval_images()
    torch.testing.assert_close(trainer.reconstruct(images, loaded), trainer.reconstruct(images, trainer.ema.module))
    print(f"PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB in {OVERFIT_STEPS} steps")


def test_generator_loss_is_the_official_sum(photos, tmp_path):
    config = tiny_config(tmp_path, photos, disc_start=0, disc_adaptive_weight=True, perceptual_weight=0.7,
                         reconstruction_weight=1.3, random_crop=False, flip=False)
    lpips, teacher = random_lpips(), random_teacher()
    trainer = TokenizerTrainer(config, lpips=lpips, teacher=teacher)
    images = trainer.eval_images()
    (semantic, reconstruction), q = trainer.model(images)
    loss, parts = trainer.generator_loss(images, semantic, reconstruction, q, step=1)
    rec = F.mse_loss(images, reconstruction)
    p = lpips(images, reconstruction).mean()
    target = teacher.tower(trainer.teacher_scaling(images)) @ teacher.proj
    vqkd = (1 - F.cosine_similarity(semantic, target, dim=-1)).mean()
    g = -trainer.discriminator(reconstruction).mean()
    last = trainer.tokenizer.decoder.last_layer
    nll = 1.3 * rec + 0.7 * p
    adaptive = (torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
                / (torch.autograd.grad(g, last, retain_graph=True)[0].norm() + 1e-4)).clamp(0, 1e4)
    expected = nll + adaptive * 0.5 * g + q[0] + q[1] + q[2] + vqkd
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["vqkd_loss"], vqkd)
    torch.testing.assert_close(parts["disc_adaptive_weight"], adaptive)
    d_loss, _ = trainer.discriminator_loss(images, reconstruction, step=1)
    torch.testing.assert_close(d_loss, 0.5 * 0.5 * (F.relu(1 - trainer.discriminator(images)).mean()
                                                      + F.relu(1 + trainer.discriminator(reconstruction)).mean()))


def _all_state(trainer):
    state = {f"model.{k}": v for k, v in trainer.tokenizer.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in trainer.ema.module.state_dict().items()})
    state.update({f"disc.{k}": v for k, v in trainer.discriminator.state_dict().items()})
    for name, optimizer in (("opt", trainer.optimizer), ("opt_d", trainer.optimizer_disc)):
        for i, s in optimizer.state_dict()["state"].items():
            state.update({f"{name}.{i}.{k}": v for k, v in s.items()})
    return state


def test_resume_equals_uninterrupted(photos, tmp_path):
    # augmentation on, scale drop on, EMA on, the discriminator switching on at step 2, accumulation 2
    fields = dict(ema_decay=0.8, disc_start=2, grad_accum=2, perceptual_weight=0.5, ckpt_every=2,
                  overrides=dict(tiny_config(tmp_path, photos).overrides, random_scale_drop=True))
    straight = TokenizerTrainer(tiny_config(tmp_path / "a", photos, steps=4, **fields),
                                lpips=random_lpips(), teacher=random_teacher())
    straight.tokenizer.residual_quantizer.drop_probability = 0.5  # make drops happen in 4 steps
    straight.run()
    first = TokenizerTrainer(tiny_config(tmp_path / "b", photos, steps=2, **fields),
                             lpips=random_lpips(), teacher=random_teacher())
    first.tokenizer.residual_quantizer.drop_probability = 0.5
    first.run()
    resumed = TokenizerTrainer(tiny_config(tmp_path / "c", photos, steps=4,
                                           resume=str(tmp_path / "b" / "run"), **fields),
                               lpips=random_lpips(), teacher=random_teacher())
    resumed.tokenizer.residual_quantizer.drop_probability = 0.5
    resumed.run()
    a, c = _all_state(straight), _all_state(resumed)
    assert a.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], c[key]), key
    assert resumed.step == 4


def test_interrupted_checkpoint_write_keeps_the_previous_one(photos, tmp_path, monkeypatch):
    trainer = TokenizerTrainer(tiny_config(tmp_path, photos, steps=1, ckpt_every=1, perceptual_weight=0,
                                           semantic_weight=0))
    trainer.run()
    last = os.path.join(trainer.config.out_dir, "checkpoints", "last.pt")
    before = open(last, "rb").read()
    real_save = torch.save

    def dying_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as handle:  # a half-written file, then the process "dies"
            handle.truncate(100)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    trainer.step = 2
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert open(last, "rb").read() == before
    assert not [n for n in os.listdir(os.path.dirname(last)) if ".tmp-" in n]
    assert not os.path.exists(os.path.join(os.path.dirname(last), "step_0000002.pt"))
    TokenFlowTokenizer.from_pretrained(last)


def test_bad_images_are_skipped_and_counted(tmp_path):
    data = make_image_folder(tmp_path / "data", generated=3)
    with open(os.path.join(data, "broken.jpg"), "wb") as handle:
        handle.write(b"not a jpeg at all")
    config = tiny_config(tmp_path, data, steps=3, batch_size=8, perceptual_weight=0, semantic_weight=0)
    trainer = TokenizerTrainer(config)
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        last = trainer.run()
    assert last["skipped"] >= 1 and trainer.step == 3


def test_missing_or_empty_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        TokenizerTrainer(tiny_config(tmp_path, tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="no files ending in"):
        TokenizerTrainer(tiny_config(tmp_path, tmp_path / "empty"))


def test_missing_teacher_and_lpips_weights_say_where_to_get_them(photos, tmp_path):
    with pytest.raises(ValueError, match="--teacher"):
        TokenizerTrainer(tiny_config(tmp_path, photos, perceptual_weight=0))
    with pytest.raises(FileNotFoundError, match="download.pytorch.org"):
        TokenizerTrainer(tiny_config(tmp_path, photos, semantic_weight=0))


def test_finetune_decoder_trains_only_the_decoder(photos, tmp_path):
    trainer = TokenizerTrainer(tiny_config(tmp_path, photos, steps=2, finetune_decoder=True, perceptual_weight=0,
                                           semantic_weight=0))
    before = {k: v.clone() for k, v in trainer.tokenizer.state_dict().items()}
    trainer.run()
    after = trainer.tokenizer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k]) and k != "quantize.codebook_used"}
    assert changed and all(k.startswith("decoder.") for k in changed)


def test_metrics():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    mse = (((x + 1) / 2 - (noisy + 1) / 2) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(metrics.psnr(x, noisy), -10 * torch.log10(mse))
    torch.testing.assert_close(metrics.ssim(x, x), torch.ones(2))
    assert float(metrics.ssim(x, noisy).max()) < 1
    stats = metrics.codebook_stats(torch.tensor([0.0, 1, 1, 2]), 8)
    assert stats["codes_used"] == 3 and stats["usage"] == 3 / 8
    assert stats["perplexity"] == pytest.approx(2 ** 1.5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_with_gan_and_adaptive_weight(photos, tmp_path, precision):
    # LPIPS off: VGG16 convolutions in half precision are slow on the CPU (seconds for one tiny step)
    config = tiny_config(tmp_path, photos, steps=1, precision=precision, disc_start=0, disc_adaptive_weight=True,
                         perceptual_weight=0.0)
    trainer = TokenizerTrainer(config, teacher=random_teacher())
    last = trainer.run()
    assert torch.isfinite(torch.tensor(last["loss"])) and last["disc_weight"] == 0.5
    assert trainer.scaler.is_enabled() == (precision == "fp16")  # a loss scaler only for fp16
    assert all(p.dtype == torch.float32 for p in trainer.tokenizer.parameters())  # fp32 master weights


def test_enhanced_decoder_finetuning_from_a_plain_checkpoint(photos, tmp_path):
    """Official --finetune_decoder --enhanced_decoder: start from a tokenizer with the plain decoder, keep
    everything but the decoder (which no longer fits), train only the new 2x decoder."""
    from tokenflow_tiny import tiny_tokenizer

    plain = tiny_tokenizer("clipb_256", seed=3)
    plain.save_pretrained(tmp_path / "plain.pt")
    config = tiny_config(tmp_path, photos, steps=1, init=str(tmp_path / "plain.pt"), enhanced_decoder=True,
                         finetune_decoder=True, perceptual_weight=0, semantic_weight=0)
    trainer = TokenizerTrainer(config)
    model = trainer.tokenizer
    assert model.config.decoder_channels == 256 and model.config.decoder_res_blocks == 4
    assert torch.equal(model.encoder.conv_in.weight, plain.encoder.conv_in.weight)  # kept from the checkpoint
    # (a step of the 2x decoder takes seconds on the CPU; decoder-only steps are tested above)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("decoder.")}
