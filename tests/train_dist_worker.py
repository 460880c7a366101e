"""Launched by torchrun (or run alone): tiny tokenizer and FlowTok training runs; each saves its final
weights per rank. One launch runs several runs in one process group (``phase`` picks them), so the 2-process
tests share launches:

- ``first``: ``plain`` (2 steps, dropout 0, compared with a 1-process run), ``dropout`` (tokenizer with
  dropout 0.1, 2 loader workers, a random teacher and one image per rank, 5 steps, a checkpoint every step), ``flow`` (FlowTok, its default text
  dropout 0.1, 2 loader workers, 5 steps) and ``broken`` (a folder whose unreadable images fill a whole batch
  of rank 1 only, 5 steps);
- ``resume``: ``plain`` resumed to 3 steps, and each other run resumed from its step-2 checkpoint into
  ``NAME_resumed`` (what a kill after step 2 and a ``--resume`` give);
- ``forever``: tokenizer training with no end, a checkpoint every 5 steps, each rank writing its pid (the
  launcher is killed by the test).
"""

import os
import pathlib
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def _tokenizer_run(out_dir, data, steps, setup=None, teacher=False, batch_size=4, **fields):
    from tokenflow_ext.train.tokenizer import TokenizerTrainer
    from train_helpers import random_teacher, tiny_config

    config = tiny_config(pathlib.Path(out_dir), data, steps=steps, batch_size=batch_size, perceptual_weight=0,
                         semantic_weight=1.0 if teacher else 0.0, device="cpu", **fields)
    trainer = TokenizerTrainer(config, setup=setup, teacher=random_teacher() if teacher else None)
    trainer.run()
    state = {f"model.{k}": v for k, v in trainer.tokenizer.state_dict().items() if k != "quantize.codebook_used"}
    state.update({f"disc.{k}": v for k, v in trainer.discriminator.named_parameters()})
    state["reconstruction"] = trainer.reconstruct(trainer.eval_images())
    torch.save(state, os.path.join(out_dir, f"rank{trainer.setup.rank}_of_{trainer.setup.world_size}.pt"))
    return trainer


def _flow_run(out_dir, pairs, steps, setup, **fields):
    from tokenflow_ext.train.flowtok import FlowTokTrainConfig, FlowTokTrainer

    config = FlowTokTrainConfig(data=pairs, out_dir=str(out_dir), preset="custom", steps=steps, batch_size=4,
                                num_workers=2, log_every=1, eval_every=0, ckpt_every=1, progress=False,
                                tensorboard=False, lr=2e-3, warmup_steps=5, ema_decay=0.9, device="cpu",
                                flow_kwargs=dict(clip_dim=24, text_layers=1, text_heads=2, text_hidden=32,
                                                 text_dropout=0.1), **fields)
    config.preset = (2, 32, 2)
    trainer = FlowTokTrainer(config, setup=setup)
    trainer.run()
    state = {f"model.{k}": v for k, v in trainer.flowtok.nnet.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in trainer.ema.module.state_dict().items()})
    torch.save(state, os.path.join(out_dir, f"rank{trainer.setup.rank}_of_{trainer.setup.world_size}.pt"))


def main(data, out_dir, steps, resume=None):
    """One tokenizer run (dropout 0) in its own process group; the 1-process reference calls it directly."""
    torch.set_num_threads(1)
    trainer = _tokenizer_run(out_dir, data, int(steps), ckpt_every=int(steps), resume=resume)
    trainer.setup.close()


def phases(phase, data, broken, pairs, out):
    torch.set_num_threads(1)
    from tokenflow_ext.train.loop import DistributedSetup

    setup = DistributedSetup.from_environment("cpu")
    out = pathlib.Path(out)
    # the dropout run distils a random teacher: every parameter gets a gradient (DDP's bucket views included)
    # and one image per rank, where DDP once warned about gradient strides of the (1, 1, C) class token
    tokenizer_runs = {"dropout": (data, dict(num_workers=2, dropout=0.1, teacher=True, batch_size=2)),
                      "broken": (broken, {})}
    if phase == "forever":
        (out / "forever").mkdir(exist_ok=True)
        (out / "forever" / f"pid{setup.rank}").write_text(str(os.getpid()))
        _tokenizer_run(out / "forever", data, 10 ** 9, setup, ckpt_every=5)
    elif phase == "first":
        _tokenizer_run(out / "plain", data, 2, setup, ckpt_every=2)
        for name, (folder, fields) in tokenizer_runs.items():
            _tokenizer_run(out / name, folder, 5, setup, ckpt_every=1, **_tokenizer_fields(fields))
        _flow_run(out / "flow", pairs, 5, setup)
    else:
        _tokenizer_run(out / "plain", data, 3, setup, ckpt_every=3, resume=str(out / "plain" / "run"))
        for name, (folder, fields) in tokenizer_runs.items():
            source = out / name / "run" / "checkpoints" / "step_0000002.pt"
            _tokenizer_run(out / f"{name}_resumed", folder, 5, setup, ckpt_every=1, resume=str(source),
                           **_tokenizer_fields(fields))
        _flow_run(out / "flow_resumed", pairs, 5, setup, resume=str(out / "flow" / "checkpoints" / "step_0000002.pt"))
    setup.close()


def _tokenizer_fields(fields):
    from tokenflow_tiny import TINY_CLIP

    fields = dict(fields)
    if "dropout" in fields:
        fields["overrides"] = dict(TINY_CLIP, dropout=fields.pop("dropout"))
    return fields


if __name__ == "__main__":
    if sys.argv[1] in ("first", "resume", "forever"):
        phases(*sys.argv[1:])
    else:
        main(*sys.argv[1:])
