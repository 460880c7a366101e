"""FID building blocks: the Fréchet distance, Inception statistics and the FID Inception network.

- :func:`frechet_distance` -- ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` in float64. The trace of
  the matrix square root is taken from the eigenvalues of the symmetric PSD matrix ``sqrt(S1) S2 sqrt(S1)``
  (similar to ``S1 S2``, so it has the same eigenvalues), with ``numpy.linalg.eigh``: stable for rank-deficient
  covariances (fewer images than the 2048 feature dimensions), where ``scipy.linalg.sqrtm(S1 @ S2)`` (pytorch-fid's
  ``calculate_frechet_distance``) works on a non-normal, nearly singular product.
- :func:`activation_statistics`, :func:`save_statistics`, :func:`load_statistics` -- ``(mu, sigma)`` of
  ``(N, D)`` features (``numpy.cov(rowvar=False)``, ``ddof=1``) and ``.npz`` files with keys ``mu`` / ``sigma``
  (pytorch-fid's and the ADM/OpenAI reference batches' form).
- :class:`FIDInceptionV3` -- the ``pt_inception-2015-12-05`` network (TensorFlow's FID Inception as ported by
  pytorch-fid: torchvision's Inception3 layout with the FID variants of the InceptionA/C/E blocks), the 2048-d
  pool3 features, for the weights file ``pt_inception-2015-12-05-6726825d.pth`` (:data:`FID_WEIGHTS_URL`).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FID_WEIGHTS_FILE", "FID_WEIGHTS_URL", "FIDInceptionV3", "activation_statistics", "frechet_distance",
           "load_statistics", "save_statistics"]

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_FILE}"

# A covariance's eigenvalues below -PSD_RTOL * (its largest |eigenvalue|) are not rounding: the matrix is not a
# covariance (sqrtm(S1 S2) would have a large imaginary part). Covariances stored in float32 show about -1e-7.
PSD_RTOL = 1e-5
# |S - S^T| above SYMMETRY_RTOL * max |S| is not rounding either.
SYMMETRY_RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


def _to_float64(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise ValueError(f"{name} is complex ({value.dtype}); expected real values")
        return value.detach().to(device="cpu", dtype=torch.float64).numpy()
    array = np.asarray(value)
    if np.iscomplexobj(array):
        raise ValueError(f"{name} is complex ({array.dtype}); expected real values")
    try:
        return array.astype(np.float64, copy=False)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name}: expected a numpy array or torch tensor of numbers, got {type(value).__name__} "
                        f"({error})") from None


def _check_finite(array: np.ndarray, name: str) -> None:
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has {int((~np.isfinite(array)).sum())} non-finite entries (NaN or inf)")


def _symmetric(sigma: np.ndarray, name: str) -> np.ndarray:
    scale = float(np.abs(sigma).max()) if sigma.size else 0.0
    asymmetry = float(np.abs(sigma - sigma.T).max()) if sigma.size else 0.0
    if asymmetry > SYMMETRY_RTOL * scale:
        raise ValueError(f"{name} is not symmetric (max |{name} - {name}^T| = {asymmetry:.3g} against "
                         f"max |{name}| = {scale:.3g}): not a covariance matrix")
    return (sigma + sigma.T) / 2


def _check_psd(eigenvalues: np.ndarray, name: str) -> None:
    largest = float(np.abs(eigenvalues).max()) if eigenvalues.size else 0.0
    smallest = float(eigenvalues.min()) if eigenvalues.size else 0.0
    if smallest < -PSD_RTOL * largest:
        raise ValueError(f"{name} is not positive semi-definite (eigenvalue {smallest:.6g} against the largest "
                         f"{largest:.6g}): sqrtm(sigma1 @ sigma2) would have a large imaginary component; "
                         "is it a covariance matrix?")


def _drop_rounding(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those at rounding level (below ``n * eps * max``, numpy's matrix-rank
    tolerance) set to zero."""
    if not eigenvalues.size:
        return eigenvalues
    tolerance = eigenvalues.size * np.finfo(np.float64).eps * float(np.abs(eigenvalues).max())
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr(sqrtm(sigma1 @ sigma2))`` of two symmetric PSD matrices: ``sum(sqrt(eig(sqrt(S1) S2 sqrt(S1))))``."""
    w1, v1 = np.linalg.eigh(sigma1)
    _check_psd(w1, "sigma1")
    _check_psd(np.linalg.eigvalsh(sigma2), "sigma2")
    root1 = (v1 * np.sqrt(_drop_rounding(w1))) @ v1.T   # sqrt(S1) of the PSD part of S1
    inner = root1 @ sigma2 @ root1
    # PSD up to rounding (S1, S2 checked above): the rounding below zero is the "negligible imaginary part" of
    # sqrtm(S1 S2); the rounding above zero of a singular product would add sqrt(rounding) per null direction
    return float(np.sqrt(_drop_rounding(np.linalg.eigvalsh((inner + inner.T) / 2))).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``:
    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))``.

    Inputs: numpy arrays or torch tensors (any device, any real dtype), ``mu`` of shape ``(D,)`` and ``sigma`` of
    shape ``(D, D)``; everything is computed in float64 on the CPU. ``tr(sqrtm(S1 S2))`` is the sum of the square
    roots of the eigenvalues of ``sqrt(S1) S2 sqrt(S1)`` (symmetric PSD; ``numpy.linalg.eigh``), which equals
    ``scipy.linalg.sqrtm(S1 @ S2)``'s trace for PSD covariances and stays accurate when they are singular.

    Eigenvalues of ``S1`` and of that product below numpy's matrix-rank tolerance (``n * eps * max``) count as
    zero, so identical rank-deficient statistics give 0 rather than a sum of square roots of rounding errors.
    As pytorch-fid's ``calculate_frechet_distance``: rounding-level negative eigenvalues (the "negligible imaginary
    part" of ``sqrtm``) are dropped; a covariance with a clearly negative eigenvalue (below ``-1e-5`` times its
    largest: ``sqrtm`` would have a large imaginary part) or an asymmetric one raises ``ValueError``; if the
    eigendecomposition fails or gives a non-finite result, ``eps`` is added to both diagonals and it is retried
    (with a warning). Shape mismatches and non-finite inputs raise ``ValueError`` naming the argument.
    """
    mu1 = np.atleast_1d(_to_float64(mu1, "mu1"))
    mu2 = np.atleast_1d(_to_float64(mu2, "mu2"))
    sigma1 = np.atleast_2d(_to_float64(sigma1, "sigma1"))
    sigma2 = np.atleast_2d(_to_float64(sigma2, "sigma2"))
    if mu1.ndim != 1:
        raise ValueError(f"mu1 must be a vector of shape (D,), got shape {tuple(mu1.shape)}")
    dim = mu1.shape[0]
    if mu2.shape != (dim,):
        raise ValueError(f"mu2 has shape {tuple(mu2.shape)}; expected ({dim},) to match mu1")
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} has shape {tuple(sigma.shape)}; expected ({dim}, {dim}) to match mu1 of "
                             f"shape ({dim},)")
    for name, array in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        _check_finite(array, name)
    sigma1 = _symmetric(sigma1, "sigma1")
    sigma2 = _symmetric(sigma2, "sigma2")

    diff = mu1 - mu2
    try:
        trace_sqrt = _trace_sqrt_product(sigma1, sigma2)
        failed = not np.isfinite(trace_sqrt)
    except np.linalg.LinAlgError:
        failed = True
    if failed:
        warnings.warn(f"frechet_distance: the eigendecomposition of the covariance product failed; adding {eps} to "
                      "the diagonal of both covariances", RuntimeWarning, stacklevel=2)
        offset = np.eye(dim) * eps
        trace_sqrt = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


# ----------------------------------------------------------------------------------------------------------------
# statistics


def activation_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """``(mu (D,), sigma (D, D))`` in float64 of ``(N, D)`` features (numpy or torch): the mean and
    ``numpy.cov(features, rowvar=False)`` (``ddof=1``, as pytorch-fid). Needs ``N >= 2`` finite rows."""
    features = _to_float64(features, "features")
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"features: a covariance needs at least 2 samples, got {features.shape[0]}")
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        raise ValueError(f"features: {int(bad.sum())} of {features.shape[0]} rows have non-finite values")
    mu = features.mean(axis=0)
    sigma = np.atleast_2d(np.cov(features, rowvar=False))
    return mu, sigma


def _check_statistics(mu: np.ndarray, sigma: np.ndarray, where: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{where}: mu must have shape (D,) and sigma (D, D), got {tuple(mu.shape)} and "
                         f"{tuple(sigma.shape)}")


def save_statistics(path: str | os.PathLike, mu, sigma) -> None:
    """Write ``mu`` ``(D,)`` and ``sigma`` ``(D, D)`` as float64 to the ``.npz`` file ``path`` (exactly that name;
    keys ``mu`` and ``sigma``, readable by pytorch-fid and :func:`load_statistics`). The write is atomic."""
    mu = _to_float64(mu, "mu")
    sigma = _to_float64(sigma, "sigma")
    _check_statistics(mu, sigma, "save_statistics")
    path = os.fspath(path)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            np.savez(handle, mu=mu, sigma=sigma)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` float64 from an ``.npz`` file: keys ``mu`` and ``sigma`` (ours, pytorch-fid's, and the
    ADM/OpenAI reference batches, which also hold images in ``arr_0``); or, when only ``arr_0`` is there and it
    is ``(N, D)`` activations, the statistics computed from them (:func:`activation_statistics`). A file whose
    ``arr_0`` holds images ``(N, H, W, C)`` and no ``mu``/``sigma`` needs the Inception network first
    (:class:`FIDInceptionV3`). Errors: ``FileNotFoundError`` for a missing file, ``ValueError`` for an unreadable
    one, missing keys or wrong shapes."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID statistics file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable .npz statistics file ({error})") from None
    if not hasattr(data, "files"):  # a plain .npy array
        raise ValueError(f"{path}: a single array, not an .npz file with keys 'mu' and 'sigma'")
    with data:
        keys = set(data.files)
        if {"mu", "sigma"} <= keys:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            _check_statistics(mu, sigma, path)
            return mu, sigma
        if keys & {"mu", "sigma"}:
            missing = ({"mu", "sigma"} - keys).pop()
            raise ValueError(f"{path}: has {sorted(keys & {'mu', 'sigma'})} but no '{missing}' key")
        if "arr_0" in keys:
            activations = data["arr_0"]
            if activations.ndim != 2:
                raise ValueError(f"{path}: no 'mu'/'sigma', and 'arr_0' has shape {activations.shape}, not (N, D) "
                                 "activations (images must go through the Inception network first: "
                                 "FIDInceptionV3.features, then activation_statistics)")
            return activation_statistics(activations)
        raise ValueError(f"{path}: no FID statistics: expected keys 'mu' and 'sigma' (or activations 'arr_0'), "
                       f"found {sorted(keys)}")


# ----------------------------------------------------------------------------------------------------------------
# the FID Inception network


class _ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (eps 0.001) + ReLU; parameter names as torchvision's ``BasicConv2d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool_branch(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The 3x3 stride-1 pooling before a block's ``branch_pool`` conv. ``"avg"``: TensorFlow's average pool,
    which leaves the zero padding out of the mean (``count_include_pad=False``; torchvision's blocks count it);
    ``"max"``: the last block of the FID network max-pools (a quirk of the 2015 graph, kept by pytorch-fid)."""
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):  # Mixed_5b/5c/5d, 35x35
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = _ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_pool_branch(x, "avg")),
        ], 1)


class _BlockB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = _ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class _BlockC(nn.Module):  # Mixed_6b..6e, 17x17, factorised 7x7
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = _ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            double,
            self.branch_pool(_pool_branch(x, "avg")),
        ], 1)


class _BlockD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = _ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = _ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            seven,
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class _BlockE(nn.Module):  # Mixed_7b (avg pool branch), Mixed_7c (max pool branch), 8x8, split 1x3 / 3x1
    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = _ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = _ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(_pool_branch(x, self.pool)),
        ], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception network (``pt_inception-2015-12-05``, TensorFlow's 2015 Inception v3 as ported by
    pytorch-fid), up to the 2048-d pool3 features.

    Layout and parameter names are torchvision's ``Inception3`` without the auxiliary classifier, with the FID
    blocks: the average-pool branches of Mixed_5b..5d, 6b..6e and 7b exclude the zero padding from the mean,
    Mixed_7c's pool branch max-pools. ``fc`` (2048 -> 1008, the 2015 graph's classes) is kept only so the weights
    file loads strictly; the features do not use it. The network is always in inference mode (BatchNorm uses its
    running statistics; ``train()`` keeps it in eval mode) and its parameters do not require gradients.

    Input protocol (pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)``): images ``(B, 3, H, W)``,
    float in [0, 1] or uint8 in [0, 255] (divided by 255); resized to 299 x 299 with
    ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing) on the [0, 1] values, then mapped to
    [-1, 1] as ``2 x - 1``. (torch-fidelity and the TensorFlow reference resize uint8 values TF1-style and map
    with ``(x - 128) / 128``; at 299 x 299 inputs the resizes agree, elsewhere features differ slightly.)
    """

    INPUT_SIZE = 299
    FEATURE_DIM = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b = _BlockA(192, pool_features=32)
        self.Mixed_5c = _BlockA(256, pool_features=64)
        self.Mixed_5d = _BlockA(288, pool_features=64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, channels_7x7=128)
        self.Mixed_6c = _BlockC(768, channels_7x7=160)
        self.Mixed_6d = _BlockC(768, channels_7x7=160)
        self.Mixed_6e = _BlockC(768, channels_7x7=192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, pool="avg")
        self.Mixed_7c = _BlockE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        """Stays in eval mode: the FID features are defined with the BatchNorm running statistics."""
        return super().train(False)

    @classmethod
    def from_file(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "FIDInceptionV3":
        """The network with the weights of ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's file, from
        :data:`FID_WEIGHTS_URL`), loaded strictly. ``FileNotFoundError`` (saying where to get it) for a missing
        file, ``ValueError`` for an unreadable one or other keys / shapes."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FID Inception weights not found: {path}. Download {FID_WEIGHTS_FILE} "
                                    f"(pytorch-fid's weights, about 91 MiB) from {FID_WEIGHTS_URL}")
        try:
            state_dict = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:  # pickle / zip errors come in many types
            raise ValueError(f"{path}: not a readable PyTorch weights file ({type(error).__name__}: {error})") from None
        if not isinstance(state_dict, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state_dict).__name__}")
        model = cls()
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{path}: not the {FID_WEIGHTS_FILE} FID Inception weights: {error}") from None
        return model

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` [0, 1] float or uint8 -> ``(B, 3, 299, 299)`` in [-1, 1], the parameters' dtype."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"FIDInceptionV3 expects images of shape (B, 3, H, W), got {shape}")
        dtype = self.Conv2d_1a_3x3.conv.weight.dtype
        if images.dtype == torch.uint8:
            x = images.to(dtype) / 255.0
        elif images.is_floating_point():
            x = images.to(dtype)
            if x.numel() and not bool(torch.isfinite(x).all()):
                raise ValueError("FIDInceptionV3: images have non-finite values")
            if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
                raise ValueError(f"FIDInceptionV3 expects float images in [0, 1] (got values in "
                                 f"[{float(x.min()):.4g}, {float(x.max()):.4g}]); map [-1, 1] images with "
                                 "(x + 1) / 2 and clamp")
        else:
            raise ValueError(f"FIDInceptionV3 expects float images in [0, 1] or uint8, got {images.dtype}")
        x = F.interpolate(x, size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """The network on preprocessed ``(B, 3, 299, 299)`` inputs in [-1, 1]: ``(B, 2048)`` pool3 features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 2048)`` pool3 features of ``images`` (see the class docstring); differentiable w.r.t. images."""
        return self.pool3(self.preprocess(images))

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 2048)`` pool3 features, no autograd, in the parameters' dtype: float32 as loaded (call
        ``.double()`` on the module for float64 throughout); callers take ``.double()`` for the statistics."""
        return self.forward(images)
