"""The ``train`` family: one whole TokenFlow tokenizer training step (generator forward + loss + backward +
Adam step, then the discriminator's) with our quantizer vs the same trainer whose multi-scale quantizer is
the official eager one (N x K distances, one-hot, N x K d_norm logging). Random weights; the LPIPS network
and the semantic teacher are random too (same cost as real ones); the discriminator is on (``disc_start``
0). Reports steps/s and peak memory of the whole step, so the ratio is what a training run would see."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .models import compare_models_one_at_a_time
from .rows import Row


@dataclass
class TrainStepProblem:
    """``config`` (named, with ``overrides`` applied) and ``batch`` images per step."""

    config: str = "clipb_256"
    batch: int = 2
    overrides: dict = field(default_factory=dict)

    @property
    def shape(self) -> str:
        extra = " (shrunk)" if self.overrides else ""
        return f"{self.config}{extra} B={self.batch} train step"


class _EagerMultiScale(torch.nn.Module):
    """The official ``TokenFlow.encode`` residual loop and quantizer formulas, in training mode."""

    def __init__(self, quantize, scales):
        super().__init__()
        self.__dict__["quantize"] = quantize
        self.scales = tuple(scales)

    def forward(self, h):
        from ..reference import official_multiscale_encode  # noqa: PLC0415

        features, losses, indices = official_multiscale_encode(
            h, self.quantize.embedding_vqkd.weight, self.quantize.embedding_vqgan.weight, self.scales,
            training=self.training, beta=self.quantize.beta)
        vq, commit, entropy, d_s, d_p = losses
        return features, (vq, commit, entropy, 0.0, d_s, d_p), indices


def _trainer(problem: TrainStepProblem, device: str, data: str, eager: bool):
    from ..train.losses import LPIPS, SemanticTeacher  # noqa: PLC0415
    from ..train.tokenizer import TokenizerTrainConfig, TokenizerTrainer  # noqa: PLC0415
    from ..train.loop import DistributedSetup  # noqa: PLC0415
    import copy  # noqa: PLC0415

    overrides = dict(problem.overrides, random_scale_drop=False)
    config = TokenizerTrainConfig(data=data, out_dir=os.path.join(data, "run"), batch_size=problem.batch,
                                  config=problem.config, overrides=overrides, disc_start=0, semantic_weight=1.0,
                                  perceptual_weight=1.0, num_workers=0, progress=False, tensorboard=False,
                                  device=device)
    torch.manual_seed(0)
    lpips = LPIPS()
    from ..models import TokenFlowTokenizer  # noqa: PLC0415

    torch.manual_seed(1)
    tower_source = TokenFlowTokenizer(problem.config, **overrides)
    proj = torch.randn(tower_source.config.semantic_width, tower_source.config.decoder_out_dim) * 0.02
    teacher = SemanticTeacher(copy.deepcopy(tower_source.encoder_vqkd), proj if tower_source.config.teacher == "clip"
                              else None)
    del tower_source
    trainer = TokenizerTrainer(config, lpips=lpips, teacher=teacher,
                               setup=DistributedSetup(device=torch.device(device)))
    if eager:
        model = trainer.tokenizer
        model.__dict__["residual_quantizer"] = _EagerMultiScale(model.quantize, model.config.scales).train()
    return trainer


def train_step_factories(problem: TrainStepProblem, device: str) -> dict[str, Callable[[], Callable]]:
    """``"fused"`` and ``"official-eager"``: each a factory that builds its trainer (both start from the same
    seeded weights and see the same images) and returns one training step, which returns the step's generator
    loss. Built one at a time: a siglip_384 trainer alone peaks near 16 GiB on the CPU."""
    from PIL import Image  # noqa: PLC0415

    folder = tempfile.mkdtemp(prefix="tokenflow_bench_train_")
    for i in range(problem.batch):  # the trainer wants a data folder; the timed steps use fixed tensors
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(os.path.join(folder, f"{i}.png"))

    def factory(eager: bool):
        def build():
            trainer = _trainer(problem, device, folder, eager=eager)
            size = trainer.tokenizer.config.image_size
            images = torch.rand(problem.batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
            return lambda: trainer.train_step([images])["loss"]
        return build

    return {"fused": factory(False), "official-eager": factory(True)}


def run_train_case(problem: TrainStepProblem, device: str, *, repeats: int = 1) -> list[Row]:
    def same_loss(ours, theirs, variant=None):
        ok = bool(np.isfinite(ours) and abs(ours - theirs) <= 1e-3 * max(1.0, abs(theirs)))
        return ok, f"first-step losses {ours:.5g} vs {theirs:.5g}" + ("" if ok else " FAIL")

    rows = compare_models_one_at_a_time("tokenizer train step", problem.shape, problem.batch,
                                        train_step_factories(problem, device), device, same_loss, repeats=repeats)
    for row in rows:
        row.extra["steps_per_s"] = row.extra["images_per_s"] / problem.batch
        row.extra["baseline_steps_per_s"] = row.extra["baseline_images_per_s"] / problem.batch
    return rows
