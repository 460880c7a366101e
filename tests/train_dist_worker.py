"""Launched by torchrun (or run alone): tiny tokenizer training; each rank saves its final weights."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))


def main(data, out_dir, steps, resume=None):
    torch.set_num_threads(1)
    from tokenflow_ext.train.tokenizer import TokenizerTrainer
    from train_helpers import tiny_config
    import pathlib

    config = tiny_config(pathlib.Path(out_dir), data, steps=steps, batch_size=4, perceptual_weight=0,
                         semantic_weight=0, device="cpu", ckpt_every=steps, resume=resume)
    trainer = TokenizerTrainer(config)
    trainer.run()
    state = {f"model.{k}": v for k, v in trainer.tokenizer.state_dict().items() if k != "quantize.codebook_used"}
    state.update({f"disc.{k}": v for k, v in trainer.discriminator.named_parameters()})
    state["reconstruction"] = trainer.reconstruct(trainer.eval_images())
    torch.save(state, os.path.join(out_dir, f"rank{trainer.setup.rank}_of_{trainer.setup.world_size}.pt"))
    trainer.setup.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:])
