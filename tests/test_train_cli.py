"""``python -m tokenflow_ext train ...``: a tiny run end to end, its outputs, resuming, and the error paths."""

import json
import os

import pytest
import torch

from tokenflow_ext.__main__ import main
from tokenflow_ext.models import FlowTok, TokenFlowTokenizer
from tokenflow_tiny import TINY_CLIP
from train_helpers import make_image_folder, random_teacher


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    config = root / "tiny.json"
    config.write_text(json.dumps(dict(TINY_CLIP, base="clipb_256")))
    teacher = random_teacher()
    state = {f"visual.{k}": v for k, v in teacher.tower.state_dict().items()}  # as in an OpenAI CLIP file
    state["visual.proj"] = teacher.proj
    state["token_embedding.weight"] = torch.zeros(3, 2)  # the text tower's entries are ignored
    torch.save(state, root / "teacher.pt")
    return str(config), str(root / "teacher.pt")


def _tokenizer_args(photos, files, out, *extra):
    config, teacher = files
    return ["train", "tokenizer", "--config", config, "--data", photos, "--out", str(out), "--teacher", teacher,
            "--perceptual-weight", "0", "--batch-size", "2", "--num-workers", "0", "--log-every", "1",
            "--eval-every", "2", "--ckpt-every", "2", "--eval-count", "2", "--disc-dim", "8", "--no-progress", *extra]


def test_train_tokenizer_command_outputs_and_resume(photos, tiny_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_tokenizer_args(photos, tiny_files, out, "--steps", "2", "--num-workers", "1")) == 0
    assert "last: loss=" in capsys.readouterr().out
    for name in ("log.csv", "eval.csv", "log.jsonl", "samples/step_0000002.png", "checkpoints/last.pt",
                 "checkpoints/step_0000002.pt"):
        assert os.path.exists(out / name), name
    model = TokenFlowTokenizer.from_pretrained(out / "checkpoints" / "last.pt")
    assert model.config.codebook_size == TINY_CLIP["codebook_size"]
    assert main(_tokenizer_args(photos, tiny_files, out, "--steps", "3", "--resume", str(out))) == 0
    rows = [json.loads(line) for line in open(out / "log.jsonl") if '"train"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3]
    import csv

    train_rows = list(csv.DictReader(open(out / "log.csv")))
    assert [r["step"] for r in train_rows] == ["1", "2", "3"] and float(train_rows[-1]["rec_loss"]) > 0
    eval_rows = list(csv.DictReader(open(out / "eval.csv")))
    assert [r["step"] for r in eval_rows] == ["2", "3"] and float(eval_rows[0]["psnr"]) > 0


def test_train_flowtok_command(tmp_path):
    from test_train_flowtok import write_pairs

    data = write_pairs(tmp_path / "pairs", 4, seed=0)
    args = ["train", "flowtok", "--data", data, "--out", str(tmp_path / "run"), "--preset", "2,32,2",
            "--flow-kwargs", json.dumps(dict(clip_dim=24, text_layers=1, text_heads=2, text_hidden=32)),
            "--steps", "2", "--batch-size", "2", "--num-workers", "0", "--no-progress", "--eval-count", "2"]
    assert main(args) == 0
    FlowTok.from_pretrained(tmp_path / "run" / "checkpoints" / "last.pt", (2, 32, 2), clip_dim=24, text_layers=1,
                            text_heads=2, text_hidden=32)


@pytest.mark.parametrize("case, message", [
    ("missing", "data folder not found"),
    ("empty", "no files ending in"),
    ("no_teacher", "needs --teacher"),
    ("bad_config", "unknown config"),
    ("bad_resume", "--resume checkpoint not found"),
    ("batch", "must split evenly"),
])
def test_train_tokenizer_error_paths(case, message, photos, tiny_files, tmp_path, capsys):
    config, teacher = tiny_files
    (tmp_path / "empty").mkdir()
    data = {"missing": str(tmp_path / "absent"), "empty": str(tmp_path / "empty")}.get(case, photos)
    args = ["train", "tokenizer", "--config", "nope" if case == "bad_config" else config, "--data", data,
            "--out", str(tmp_path / "run"), "--perceptual-weight", "0", "--num-workers", "0", "--no-progress",
            "--batch-size", "3" if case == "batch" else "2", "--steps", "1"]
    if case != "no_teacher":
        args += ["--teacher", teacher]
    if case == "bad_resume":
        args += ["--resume", str(tmp_path / "nothing.pt")]
    if case == "batch":
        args += ["--grad-accum", "2"]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_train_flowtok_on_images_needs_the_frozen_parts(photos, tmp_path, capsys):
    assert main(["train", "flowtok", "--data", photos, "--out", str(tmp_path), "--preset", "2,32,2",
                 "--no-progress"]) == 2
    assert "--flowtitok" in capsys.readouterr().err


def test_train_bench_family_runs_at_tiny_size():
    from tokenflow_ext.bench import cases
    from tokenflow_ext.bench.train import TrainStepProblem, run_train_case

    assert "train" in cases.FAMILIES and "train" in cases.MODEL_FAMILIES
    assert [p.config for f, p in cases.grid("full") if f == "train"] == ["clipb_256", "siglip_384"]
    (row,) = run_train_case(TrainStepProblem("clipb_256", 2, dict(TINY_CLIP)), "cpu", repeats=1)
    assert row.ok, row.agreement  # same first-step loss with either quantizer
    assert row.extra["steps_per_s"] > 0 and row.baseline == "official-eager"


def test_a_teacher_file_that_does_not_fit_is_an_error(photos, tiny_files, tmp_path, capsys):
    config, teacher = tiny_files
    torch.save({"proj": torch.zeros(2, 2), "conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    args = ["train", "tokenizer", "--config", config, "--data", photos, "--out", str(tmp_path / "run"),
            "--perceptual-weight", "0", "--teacher", str(tmp_path / "wrong.pt"), "--no-progress", "--steps", "1"]
    assert main(args) == 2
    assert "teacher" in capsys.readouterr().err


def test_tiny_trial_presets_train_and_load_without_guesswork(photos, tmp_path, capsys):
    out = tmp_path / "tok"
    assert main(["train", "tokenizer", "--config", "tiny", "--data", photos, "--out", str(out), "--steps", "1",
                 "--batch-size", "2", "--semantic-weight", "0", "--perceptual-weight", "0", "--num-workers", "0",
                 "--eval-every", "0", "--no-progress"]) == 0
    assert "1 intra-op thread(s) per process" in capsys.readouterr().err  # a small model: one thread
    model = TokenFlowTokenizer.from_pretrained(out / "checkpoints" / "last.pt")
    assert (model.config.name, model.config.image_size, model.config.codebook_size) == ("tiny", 64, 1024)
    pairs = tmp_path / "pairs"
    for sub in ("latents", "text"):
        (pairs / sub).mkdir(parents=True)
    import numpy as np

    for index in range(2):  # the tiny FlowTok reads real 768-wide CLIP features
        np.save(pairs / "latents" / f"{index}.npy", np.random.default_rng(index).standard_normal((77, 16), np.float32))
        np.save(pairs / "text" / f"{index}.npy", np.random.default_rng(9 + index).standard_normal((77, 768), np.float32))
    out = tmp_path / "flow"
    assert main(["train", "flowtok", "--preset", "tiny", "--data", str(pairs), "--out", str(out), "--steps", "1",
                 "--batch-size", "2", "--num-workers", "0", "--eval-every", "0", "--no-progress"]) == 0
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    args = json.loads(state["args"])
    assert (args["preset"], args["warmup_steps"], args["ema_decay"]) == ([2, 64, 2], 100, 0.99)
    assert json.loads(state["tokenflow_ext"]["flow_kwargs"]) == {"text_layers": 1, "text_heads": 2, "text_hidden": 64}


@pytest.mark.parametrize("content, message", [
    ('{"image_size": 32,', "not valid JSON (line 1, column"),
    ('{"image_sise": 32}', "unknown field(s) ['image_sise']"),
    ('[1, 2]', "expected a JSON object"),
])
def test_config_file_errors_name_the_file(photos, tmp_path, capsys, content, message):
    path = tmp_path / "mine.json"
    path.write_text(content)
    assert main(["train", "tokenizer", "--config", str(path), "--data", photos, "--out", str(tmp_path / "run"),
                 "--semantic-weight", "0", "--perceptual-weight", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--config {path}" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # a rejected run leaves no folder


@pytest.mark.parametrize("argv, message", [
    (["--flow-kwargs", "{text_layers: 1}"], "--flow-kwargs: not valid JSON"),
    (["--flow-kwargs", '{"text_layer": 1}'], "unknown field(s) ['text_layer']"),
    (["--step", "3"], "unrecognized arguments: --step"),  # no abbreviations of --steps
])
def test_flag_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "flowtok", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_pillow_is_one_clear_error(photos, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now raises ImportError
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    assert main(["train", "tokenizer", "--config", "tiny", "--data", photos, "--out", str(tmp_path / "run"),
                 "--semantic-weight", "0", "--perceptual-weight", "0", "--no-progress"]) == 2
    assert "reading images needs Pillow" in capsys.readouterr().err
