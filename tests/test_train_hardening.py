"""Training runs that must not lose or silently change a user's work (issue 24): exact resume with dropout
and loader workers, a final checkpoint whatever --ckpt-every, graceful SIGTERM / Ctrl-C, an all-unreadable
folder, checkpoints that recover from corruption and killed writes, --keep-last, the usage-window statistics
and the fp16 scheduler. The 2-process cases are in test_train_dist.py."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from tokenflow_ext.models._checkpoint import CheckpointError
from tokenflow_ext.train import run_checkpoints
from tokenflow_ext.train.data import DataError
from tokenflow_ext.train.flowtok import FlowTokTrainConfig, FlowTokTrainer
from tokenflow_ext.train.tokenizer import TokenizerTrainer
from test_train_flowtok import PRESET, TINY_FLOW, write_pairs
from tokenflow_tiny import TINY_CLIP
from train_helpers import make_image_folder, tiny_config

DROPOUT_FLOW = dict(TINY_FLOW, text_dropout=0.1)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return write_pairs(root / "train", 12, seed=0), write_pairs(root / "held_out", 6, seed=1)


def flow_config(out, train, held_out, **fields):
    base = dict(data=train, eval_data=held_out, out_dir=str(out), preset="custom", steps=4, batch_size=4,
                num_workers=0, log_every=1, eval_every=0, ckpt_every=0, progress=False, tensorboard=False,
                eval_count=6, flow_kwargs=DROPOUT_FLOW, lr=2e-3, warmup_steps=5, ema_decay=0.9)
    base.update(fields)
    cfg = FlowTokTrainConfig(**base)
    cfg.preset = PRESET
    return cfg


def assert_same_states(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


def optimizer_tensors(optimizer):
    return {f"{index}.{name}": value for index, state in optimizer.state_dict()["state"].items()
            for name, value in state.items()}


# ------------------------------------------------------------------------------------------ exact resume

@pytest.mark.parametrize("workers", [0, 2])
def test_flowtok_resume_with_dropout_is_exact(pairs, tmp_path, workers):
    """12 pairs, batch 4: 3 steps an epoch; stopped after step 2 (mid-epoch), resumed to 7 (two epoch
    boundaries). Before the fix the resumed loader drew its seed from the global RNG and dropout diverged."""
    straight = FlowTokTrainer(flow_config(tmp_path / "a", *pairs, steps=7, num_workers=workers))
    straight.run()
    FlowTokTrainer(flow_config(tmp_path / "b", *pairs, steps=2, ckpt_every=2, num_workers=workers)).run()
    resumed = FlowTokTrainer(flow_config(tmp_path / "c", *pairs, steps=7, num_workers=workers,
                                         resume=str(tmp_path / "b")))
    resumed.run()
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in straight.flowtok.modules())
    assert_same_states(straight.flowtok.nnet.state_dict(), resumed.flowtok.nnet.state_dict(), "weights")
    assert_same_states(straight.ema.module.state_dict(), resumed.ema.module.state_dict(), "EMA")
    assert_same_states(optimizer_tensors(straight.optimizer), optimizer_tensors(resumed.optimizer), "Adam")
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    c = torch.load(tmp_path / "c" / "checkpoints" / "last.pt", weights_only=True)
    assert torch.equal(a["ranks"][0]["rng"]["torch"], c["ranks"][0]["rng"]["torch"])  # no extra draws


def test_tokenizer_resume_with_dropout_and_workers_is_exact(tmp_path):
    data = make_image_folder(tmp_path / "data", generated=4)  # 8 images, batch 4: 2 steps an epoch
    overrides = dict(TINY_CLIP, dropout=0.1)
    common = dict(perceptual_weight=0, semantic_weight=0, num_workers=2, overrides=overrides)
    straight = TokenizerTrainer(tiny_config(tmp_path / "a", data, steps=5, **common))
    straight.run()
    TokenizerTrainer(tiny_config(tmp_path / "b", data, steps=3, ckpt_every=3, **common)).run()
    resumed = TokenizerTrainer(tiny_config(tmp_path / "c", data, steps=5, resume=str(tmp_path / "b" / "run"), **common))
    resumed.run()
    assert_same_states(straight.tokenizer.state_dict(), resumed.tokenizer.state_dict(), "tokenizer")
    assert_same_states(straight.discriminator.state_dict(), resumed.discriminator.state_dict(), "discriminator")
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.pt", weights_only=True)
    c = torch.load(tmp_path / "c" / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert torch.equal(a["ranks"][0]["rng"]["torch"], c["ranks"][0]["rng"]["torch"])


# ------------------------------------------------------------------------------------------ final checkpoints

def test_ckpt_every_zero_still_writes_the_final_checkpoint(pairs, tmp_path):
    FlowTokTrainer(flow_config(tmp_path, *pairs, steps=3, ckpt_every=0)).run()
    folder = tmp_path / "checkpoints"
    assert sorted(os.listdir(folder)) == ["last.pt", "step_0000003.pt"]
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 3
    assert os.path.samefile(folder / "last.pt", folder / "step_0000003.pt")  # one file, two names


def test_resume_at_or_past_the_steps_says_so(pairs, tmp_path, capsys):
    FlowTokTrainer(flow_config(tmp_path / "a", *pairs, steps=2)).run()
    trainer = FlowTokTrainer(flow_config(tmp_path / "b", *pairs, steps=2, resume=str(tmp_path / "a")))
    assert trainer.run() == {}
    assert "is at step 2, not below --steps 2" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "b")  # nothing to do: no folder made


def _cli(tmp_path, pairs, *extra):
    return [sys.executable, "-m", "tokenflow_ext", "train", "flowtok", "--data", pairs[0], "--eval-every", "0",
            "--out", str(tmp_path / "run"), "--preset", ",".join(map(str, PRESET)), "--flow-kwargs",
            json.dumps(DROPOUT_FLOW), "--batch-size", "4", "--num-workers", "0", "--log-every", "1",
            "--ckpt-every", "0", "--no-progress", "--device", "cpu", *extra]


def _wait_for_steps(log, process, count, limit=120):
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if os.path.exists(log) and sum(1 for _ in open(log)) >= count:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    raise AssertionError("the run made no progress")


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_say_how_to_resume(pairs, tmp_path, sig, status):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(_cli(tmp_path, pairs, "--steps", "100000"), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    _wait_for_steps(tmp_path / "run" / "log.jsonl", process, 2)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == status, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    logged = [json.loads(line)["step"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert state["step"] == logged[-1] >= 2
    assert f"stopped by {signal.Signals(sig).name}" in err and f"--resume {tmp_path / 'run'}" in err
    # and the run goes on from there
    done = subprocess.run(_cli(tmp_path, pairs, "--steps", str(state["step"] + 1), "--resume", str(tmp_path / "run")),
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == state["step"] + 1


# ------------------------------------------------------------------------------------------ unreadable data

def test_a_folder_of_unreadable_images_stops_with_a_clear_error(tmp_path):
    data = tmp_path / "broken"
    data.mkdir()
    for index in range(6):
        (data / f"image_{index}.png").write_bytes(b"not a png at all" * (index + 1))
    config = tiny_config(tmp_path, data, steps=3, perceptual_weight=0, semantic_weight=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="no usable batch in a whole epoch"):
            TokenizerTrainer(config).run()


def test_a_high_skip_rate_warns_once(tmp_path):
    data = make_image_folder(tmp_path / "data", generated=4)
    for name in ("generated_0.png", "generated_1.png"):
        (tmp_path / "data" / name).write_bytes(b"broken")
    config = tiny_config(tmp_path, data, steps=4, perceptual_weight=0, semantic_weight=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TokenizerTrainer(config).run()
    loud = [w for w in caught if "were unreadable and skipped so far" in str(w.message)]
    assert len(loud) == 1, [str(w.message) for w in caught]


# ------------------------------------------------------------------------------------------ checkpoints that recover

def _run_with_checkpoints(pairs, out, steps=3, **fields):
    trainer = FlowTokTrainer(flow_config(out, *pairs, steps=steps, ckpt_every=1, **fields))
    trainer.run()
    return out / "checkpoints"


def _resume(pairs, out, source, steps=4):
    trainer = FlowTokTrainer(flow_config(out, *pairs, steps=steps, resume=str(source)))
    trainer.run()
    return trainer


def test_a_truncated_last_checkpoint_falls_back_to_the_newest_step_that_loads(pairs, tmp_path):
    folder = _run_with_checkpoints(pairs, tmp_path / "a")
    size = os.path.getsize(folder / "last.pt")
    with open(folder / "last.pt", "r+b") as handle:  # last.pt and step 3 are one file: both are cut
        handle.truncate(size // 2)
    with pytest.warns(RuntimeWarning, match=r"last\.pt cannot be used .* resuming from .*step_0000002\.pt"):
        resumed = _resume(pairs, tmp_path / "b", tmp_path / "a")
    reference = _resume(pairs, tmp_path / "c", folder / "step_0000002.pt")
    assert_same_states(reference.flowtok.nnet.state_dict(), resumed.flowtok.nnet.state_dict(), "fallback")


def test_a_flipped_byte_is_caught_by_the_checksum(pairs, tmp_path):
    folder = _run_with_checkpoints(pairs, tmp_path / "a", steps=2)
    import zipfile

    with zipfile.ZipFile(folder / "last.pt") as archive:  # a byte inside the largest tensor record
        record = max(archive.infolist(), key=lambda info: info.file_size)
        offset = record.header_offset + 30 + len(record.filename) + len(record.extra) + record.file_size // 2
    data = bytearray((folder / "last.pt").read_bytes())
    data[offset] ^= 0x01
    os.remove(folder / "last.pt")  # a fresh file: the step file keeps its bytes
    (folder / "last.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC-32"):
        run_checkpoints._read(str(folder / "last.pt"))
    with pytest.warns(RuntimeWarning, match="CRC-32"):
        state, used = run_checkpoints.load_for_resume(str(tmp_path / "a"))  # the step file holds the same step
    assert used.endswith("step_0000002.pt") and state["step"] == 2


def test_nothing_loadable_is_a_clear_error(pairs, tmp_path):
    folder = tmp_path / "a" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError, match=r"no checkpoint loads:\n.*last\.pt"):
        run_checkpoints.load_for_resume(str(tmp_path / "a"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in it"):
        run_checkpoints.load_for_resume(str(empty))


def test_a_kill_during_the_first_save_leaves_a_resumable_step_file_and_temporaries_are_cleaned(pairs, tmp_path):
    folder = _run_with_checkpoints(pairs, tmp_path / "a", steps=1)
    os.remove(folder / "last.pt")  # killed between the step file and last.pt
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that is gone
    stale = folder / f"step_0000002.pt.tmp-{dead.pid}"
    stale.write_bytes(b"\0" * 1000)
    live = folder / f"step_0000002.pt.tmp-{os.getppid()}"  # a live process's file stays
    live.write_bytes(b"\0")
    resumed = _resume(pairs, tmp_path / "a", tmp_path / "a", steps=2)
    assert resumed.step == 2 and not stale.exists() and live.exists()


def test_keep_last_prunes_old_step_files(pairs, tmp_path):
    folder = _run_with_checkpoints(pairs, tmp_path, steps=4, keep_last=2)
    assert sorted(os.listdir(folder)) == ["last.pt", "step_0000003.pt", "step_0000004.pt"]


def test_checkpoint_writes_are_flushed_before_the_rename(pairs, tmp_path, monkeypatch):
    from tokenflow_ext.models import _checkpoint

    events = []
    real_replace, real_fsync = os.replace, _checkpoint._fsync
    monkeypatch.setattr(_checkpoint, "_fsync", lambda path: (events.append(("fsync", os.path.basename(path))),
                                                             real_fsync(path)))
    monkeypatch.setattr(_checkpoint.os, "replace", lambda a, b: (events.append(("rename", os.path.basename(b))),
                                                                  real_replace(a, b)))
    _checkpoint.write_checkpoint(str(tmp_path / "x.pt"), {"w": torch.zeros(2)}, {})
    assert events == [("fsync", f"x.pt.tmp-{os.getpid()}"), ("rename", "x.pt"), ("fsync", tmp_path.name)]


# ------------------------------------------------------------------------------------------ smaller items

def test_perplexity_counts_only_the_filled_usage_window():
    from tokenflow_ext.nn import DualCodebookQuantizer
    from tokenflow_ext.train.metrics import codebook_stats

    quantizer = DualCodebookQuantizer(64, 4, 2, usage_window=64).train()
    quantizer._update_usage(torch.arange(1, 33))  # 32 distinct codes, none of them code 0
    stats = codebook_stats(quantizer.codebook_used, 64, quantizer.usage_filled)
    assert quantizer.usage_filled == 32
    assert stats["codes_used"] == 32 and stats["perplexity"] == pytest.approx(32.0)
    quantizer._update_usage(torch.arange(0, 64))
    assert quantizer.usage_filled == 64
    assert codebook_stats(quantizer.codebook_used, 64, 64)["perplexity"] == pytest.approx(64.0)
    restored = DualCodebookQuantizer(64, 4, 2, usage_window=64)
    restored.load_state_dict(quantizer.state_dict())
    assert restored.usage_filled == 64  # a loaded window counts as full


def test_fp16_steps_skipped_by_the_loss_scaler_do_not_advance_the_schedule(pairs, tmp_path):
    trainer = FlowTokTrainer(flow_config(tmp_path, *pairs, steps=1, precision="fp16", max_grad_norm=0))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # the first scaled backward overflows
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
        trainer.run()
    assert trainer.scaler.get_scale() < 2.0 ** 120  # the step was skipped ...
    assert trainer.scheduler.last_epoch == 0  # ... and the warm-up did not advance
