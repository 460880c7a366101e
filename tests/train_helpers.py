"""Shared pieces of the training tests: real photographs from scikit-image's package data plus generated
images, tiny tokenizer configs and random (test-only) LPIPS / teacher modules."""

import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch

from tokenflow_tiny import TINY_CLIP

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png")  # camera.png is greyscale


def photo_folder() -> str:
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("the training tests' real photographs ship with scikit-image (pip install scikit-image)")
    return os.path.join(os.path.dirname(spec.origin), "data")


def make_image_folder(root, photos=PHOTOS[:4], generated=0, nested=True) -> str:
    """Real photographs (in a nested subfolder when ``nested``) plus ``generated`` random-gradient images."""
    from PIL import Image

    source = photo_folder()
    root = str(root)
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    for i, name in enumerate(photos):
        shutil.copy(os.path.join(source, name), os.path.join(root, "sub" if nested and i % 2 else "", name))
    rng = np.random.default_rng(0)
    for i in range(generated):
        ramp = np.linspace(0, 255, 48)[None, :, None] * rng.random(3)[None, None, :]
        array = (ramp + rng.integers(0, 40, (40, 48, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(array).save(os.path.join(root, f"generated_{i}.png"))
    return root


def tiny_config(tmp_path, data, **fields):
    from tokenflow_ext.train.tokenizer import TokenizerTrainConfig

    base = dict(data=str(data), out_dir=str(tmp_path / "run"), steps=4, batch_size=4, overrides=dict(TINY_CLIP),
                num_workers=0, log_every=1, eval_every=0, ckpt_every=0, disc_dim=8, lr=1e-3, progress=False,
                tensorboard=False, eval_count=4)
    base.update(fields)
    return TokenizerTrainConfig(**base)


def random_lpips(seed=0):
    from tokenflow_ext.train.losses import LPIPS

    torch.manual_seed(seed)
    lpips = LPIPS()
    for k in range(5):  # LPIPS heads are non-negative in the released weights
        head = getattr(lpips, f"lin{k}").model[1].weight
        head.data.abs_()
    return lpips


def random_teacher(config_overrides=TINY_CLIP, seed=1):
    """A frozen random CLIP-like tower with a random ``proj`` (test-only teacher)."""
    from tokenflow_ext.models import TokenFlowTokenizer
    from tokenflow_ext.train.losses import SemanticTeacher

    torch.manual_seed(seed)
    model = TokenFlowTokenizer("clipb_256", **config_overrides)
    proj = torch.randn(model.config.semantic_width, model.config.decoder_out_dim) * 0.1
    return SemanticTeacher(model.encoder_vqkd, proj)
