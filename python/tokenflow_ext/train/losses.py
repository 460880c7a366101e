"""TokenFlow's training losses (official ``tokenizer/vq_loss.py``, ``lpips.py``, ``discriminator_patchgan.py``).

- :class:`LPIPS`: VGG16 features (layer names ``features.N`` as torchvision's, so ``vgg16-397923af.pth``
  loads) and the learned 1x1 linear heads ``lin{k}.model.1.weight`` (the LPIPS ``vgg.pth``); no download.
- :class:`PatchGANDiscriminator`: the 3-layer PatchGAN (ndf 64, BatchNorm, N(0, 0.02) init).
- hinge / vanilla / non-saturating discriminator losses, hinge / non-saturating generator losses,
  ``adopt_weight`` (the ``disc_start`` schedule), the adaptive GAN weight, ``semantic_loss``
  (official ``calculate_clip_rec_loss``).
- :class:`SemanticTeacher`: the frozen teacher whose features the semantic decoder regresses.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"

# torchvision's vgg16 "D" layout: numbers are conv widths, "M" max-pools.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# LPIPS reads relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the outputs of features[3], [8], [15], [22], [29].
_LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def vgg16_features(up_to: int = 30) -> nn.Sequential:
    """torchvision's ``vgg16().features`` (the first ``up_to`` modules), same indices and names."""
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers[:up_to])


class NetLinLayer(nn.Module):
    """LPIPS's 1x1 head (``model.0`` a dropout, ``model.1`` the conv, as in the released weight files)."""

    def __init__(self, channels: int, use_dropout: bool = True):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout() if use_dropout else nn.Identity(),
                                   nn.Conv2d(channels, 1, 1, bias=False))


def _normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Learned perceptual distance (VGG16 variant), frozen and always in eval mode.

    ``forward(x, y)`` with images in [-1, 1] returns ``(B, 1, 1, 1)``: for each tap ``k``, the features of
    both images are unit-normalised over channels, their squared difference goes through the head
    ``lin{k}`` and is averaged over space; the five values are summed. Inputs are first shifted/scaled by
    LPIPS's constants. Build with random weights for tests, or :meth:`from_files` for real use."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([.458, .448, .450]).reshape(1, 3, 1, 1))
        self.features = vgg16_features()
        for k, channels in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{k}", NetLinLayer(channels))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always eval: the heads' dropout must stay off, as officially
        return super().train(False)

    @classmethod
    def from_files(cls, vgg_path: str | os.PathLike | None, lpips_path: str | os.PathLike | None = None) -> "LPIPS":
        """VGG16 weights (torchvision's ``vgg16-397923af.pth``: keys ``features.N.*``; ``classifier.*`` is
        ignored) and the LPIPS heads (``vgg.pth``: keys ``lin{k}.model.1.weight``). One file holding both
        (e.g. the ``state_dict`` of this module) may be given as ``vgg_path`` alone."""
        model = cls()
        if vgg_path is None or not os.path.isfile(os.fspath(vgg_path)):
            raise FileNotFoundError(
                f"LPIPS needs VGG16 weights (torchvision's vgg16-397923af.pth, from {VGG16_URL}) "
                f"and the LPIPS linear heads (vgg.pth, from {LPIPS_URL}); got --vgg-weights {vgg_path!r}. "
                "Download both and pass --vgg-weights and --lpips-weights, or train with --perceptual-weight 0")
        state = dict(torch.load(os.fspath(vgg_path), map_location="cpu", weights_only=True))
        if lpips_path is not None:
            if not os.path.isfile(os.fspath(lpips_path)):
                raise FileNotFoundError(f"LPIPS heads not found: {lpips_path} (download vgg.pth from {LPIPS_URL})")
            state.update(torch.load(os.fspath(lpips_path), map_location="cpu", weights_only=True))
        # taming/official files name the VGG net "net.slice{i}.{N}"; the LPIPS package "net.slice{i}.{N}" too
        renamed = {}
        for key, value in state.items():
            if key.startswith("net.slice"):
                key = "features." + key.split(".", 2)[2]
            renamed[key] = value
        wanted = model.state_dict()
        missing = [key for key in wanted if key not in renamed and key not in ("shift", "scale")]
        if missing:
            raise ValueError(f"LPIPS: the weight files lack {len(missing)} tensors, e.g. {missing[:4]} "
                             f"(VGG16 from {VGG16_URL}, heads from {LPIPS_URL})")
        model.load_state_dict({key: renamed.get(key, wanted[key]) for key in wanted})
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = 0.0
        tap = 0
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index == _LPIPS_TAPS[tap]:
                a, b = _normalize_channels(h[:batch]), _normalize_channels(h[batch:])
                head = getattr(self, f"lin{tap}").model
                total = total + head((a - b) ** 2).mean(dim=(2, 3), keepdim=True)
                tap += 1
                if tap == len(_LPIPS_TAPS):
                    break
        return total


class PatchGANDiscriminator(nn.Module):
    """Pix2Pix PatchGAN (official ``NLayerDiscriminator``): ``main`` = conv(4, s2) LeakyReLU, then
    ``n_layers - 1`` conv(4, s2, no bias) BatchNorm LeakyReLU with widths ``ndf * min(2^n, 8)``, one at
    stride 1, and a 1-channel conv(4, s1) patch map. Convs N(0, 0.02), BatchNorm weights N(1, 0.02)."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            previous, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * previous, ndf * mult, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        previous, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * previous, ndf * mult, 4, 1, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                   nn.LeakyReLU(0.2, True), nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


# ------------------------------------------------------------------------------------------- GAN losses

def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with real = 1, fake = 0. The official function passes the arguments of
    ``binary_cross_entropy_with_logits`` swapped (labels as logits); this is the intended loss, which
    equals :func:`vanilla_d_loss`."""
    return 0.5 * (F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
                  + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake)))


def hinge_gen_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def non_saturating_gen_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """BCE against 1 (the intended loss; the official call swaps the arguments, see above)."""
    return F.binary_cross_entropy_with_logits(logits_fake, torch.ones_like(logits_fake))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss, "non-saturating": non_saturating_d_loss}
G_LOSSES = {"hinge": hinge_gen_loss, "non-saturating": non_saturating_gen_loss}


def adopt_weight(weight: float, step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before ``threshold`` (``disc_start``), ``weight`` from then on (official ``adopt_weight``)."""
    return value if step < threshold else weight


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """``||d nll / d W|| / (||d g / d W|| + 1e-4)`` clamped to [0, 1e4], detached (W: the decoder's last conv)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach()


def semantic_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(rec, target))`` over tokens (official ``calculate_clip_rec_loss``)."""
    target = target / target.norm(dim=-1, keepdim=True)
    reconstruction = reconstruction / reconstruction.norm(dim=-1, keepdim=True)
    return (1 - (target * reconstruction).sum(-1)).mean()


class SemanticTeacher(nn.Module):
    """The frozen teacher the semantic decoder regresses (official ``get_regress_target``), on the
    tokenizer's scaled input: clip ``ln_post(tokens) @ proj`` (``proj``: ``(width, 512)``); siglip
    ``hidden_states[-2]`` (``forward_features(x, layer=-2)``); any other tower: its ``forward_features``."""

    def __init__(self, tower: nn.Module, proj: torch.Tensor | None = None):
        super().__init__()
        self.tower = tower
        if proj is not None:
            self.register_buffer("proj", proj.detach().clone())
        else:
            self.proj = None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, scaled_images: torch.Tensor) -> torch.Tensor:
        from ..models.tokenflow.siglip_vision import SiglipVisionTower  # noqa: PLC0415

        if isinstance(self.tower, SiglipVisionTower):
            return self.tower.forward_features(scaled_images, layer=-2)
        if hasattr(self.tower, "forward_features"):
            return self.tower.forward_features(scaled_images)
        tokens = self.tower(scaled_images)
        return tokens if self.proj is None else tokens @ self.proj.to(tokens.dtype)
