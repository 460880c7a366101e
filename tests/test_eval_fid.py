"""FID building blocks (``tokenflow_ext.eval.fid``): the Fréchet distance against an independent
``scipy.linalg.sqrtm`` computation (and pytorch-fid's, when importable), the statistics files, and the FID
Inception network against an independent functional implementation of pytorch-fid's blocks on the same weights
(and torch-fidelity's extractor, when importable). CPU only, no network."""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenflow_ext.eval.fid import (FID_WEIGHTS_URL, FIDInceptionV3, activation_statistics, frechet_distance,
                                    load_statistics, save_statistics)

linalg = pytest.importorskip("scipy.linalg")


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


def sqrtm_fid(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook computation, independent of ours: ``scipy.linalg.sqrtm`` of the (non-symmetric) product."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def gaussian_stats(rng, n: int, d: int, shift: float = 0.0):
    features = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.2 + shift
    return features.mean(0), np.cov(features, rowvar=False)


@pytest.mark.parametrize("d,n", [(16, 200), (64, 1000), (200, 2000)])
def test_frechet_matches_sqrtm_on_well_conditioned_covariances(d, n):
    rng = np.random.default_rng(d)
    mu1, s1 = gaussian_stats(rng, n, d)
    mu2, s2 = gaussian_stats(rng, n, d, shift=0.3)
    assert min(np.linalg.eigvalsh(s1).min(), np.linalg.eigvalsh(s2).min()) > 0  # full rank
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(ours, float)
    assert ours == pytest.approx(sqrtm_fid(mu1, s1, mu2, s2), rel=1e-10)


def test_frechet_random_spd_matrices():
    rng = np.random.default_rng(7)
    d = 50
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T + np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(sqrtm_fid(mu1, s1, mu2, s2), rel=1e-10)


@pytest.mark.parametrize("d,n", [(64, 20), (128, 40), (256, 100)])
def test_frechet_rank_deficient_covariances_fewer_samples_than_dims(d, n):
    rng = np.random.default_rng(n)
    mu1, s1 = gaussian_stats(rng, n, d)
    mu2, s2 = gaussian_stats(rng, n, d, shift=0.1)
    assert np.linalg.matrix_rank(s1) < d
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(ours)
    # sqrtm of the singular product is itself only good to ~1e-8 relative here (see the mpmath test below)
    assert ours == pytest.approx(sqrtm_fid(mu1, s1, mu2, s2), rel=1e-6)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9 * np.trace(s1)  # identical: 0, not sqrt(rounding)


def test_frechet_rank_deficient_against_40_digit_arithmetic():
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(3)
    mu1, s1 = gaussian_stats(rng, 15, 40)
    mu2, s2 = gaussian_stats(rng, 15, 40, shift=0.1)
    with mpmath.workdps(40):
        eigenvalues = mpmath.eig(mpmath.matrix(s1.tolist()) * mpmath.matrix(s2.tolist()), left=False, right=False)
        trace_sqrt = float(mpmath.re(sum(mpmath.sqrt(e) for e in eigenvalues)))
    exact = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-12)


def test_frechet_singular_commuting_covariances_exact():
    """Covariances with a common eigenbasis and many zero eigenvalues: tr sqrtm(S1 S2) = sum sqrt(a_i b_i)."""
    rng = np.random.default_rng(11)
    d = 96
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.5, 3.0, d), rng.uniform(0.5, 3.0, d)
    a[::2] = 0.0  # rank d/2
    b[::3] = 0.0  # rank 2d/3
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    exact = float((mu1 - mu2) @ (mu1 - mu2) + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum())
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(exact, rel=1e-12)
    assert sqrtm_fid(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-5)  # the textbook way: finite, close


def test_frechet_identical_distributions_give_zero():
    rng = np.random.default_rng(5)
    mu, s = gaussian_stats(rng, 500, 32)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-10 * np.trace(s)
    assert frechet_distance(mu, s, mu + 1.0, s) == pytest.approx(32.0, rel=1e-9)  # only the mean term


def test_frechet_torch_inputs_match_numpy():
    rng = np.random.default_rng(6)
    mu1, s1 = gaussian_stats(rng, 300, 24)
    mu2, s2 = gaussian_stats(rng, 300, 24, shift=0.2)
    expected = frechet_distance(mu1, s1, mu2, s2)
    tensors = [torch.from_numpy(x) for x in (mu1, s1, mu2, s2)]
    assert frechet_distance(*tensors) == expected
    assert frechet_distance(tensors[0], s1, mu2, tensors[3]) == expected  # mixed
    single = [t.float() for t in tensors]  # float32 tensors: computed in float64 from the float32 values
    as_numpy = [t.numpy().astype(np.float64) for t in single]
    assert frechet_distance(*single) == frechet_distance(*as_numpy)
    assert frechet_distance(*single) == pytest.approx(expected, rel=1e-5)
    assert frechet_distance(*(t.requires_grad_() for t in (x.clone() for x in tensors))) == expected


def test_frechet_scalar_dimension():
    assert frechet_distance(0.0, 4.0, 1.0, 1.0) == pytest.approx(1.0 + 4.0 + 1.0 - 2 * 2.0)


def test_frechet_shape_and_value_errors():
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="mu2"):
        frechet_distance(mu, s, np.zeros(5), s)
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(mu, np.eye(5), mu, s)
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu, s, mu, np.ones((4, 3)))
    with pytest.raises(ValueError, match="mu1"):
        frechet_distance(np.zeros((2, 4)), s, mu, s)
    bad = s.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="sigma2.*non-finite"):
        frechet_distance(mu, s, mu, bad)
    with pytest.raises(ValueError, match="sigma1 is not symmetric"):
        frechet_distance(mu, np.triu(np.ones((4, 4))), mu, s)
    with pytest.raises(ValueError, match="sigma2 is not positive semi-definite.*imaginary"):
        frechet_distance(mu, s, mu, np.diag([1.0, 1.0, 1.0, -0.5]))
    with pytest.raises(ValueError, match="complex"):
        frechet_distance(mu.astype(complex), s, mu, s)


def test_frechet_tolerates_rounding_level_negative_eigenvalues():
    """A rank-deficient covariance stored in float32 has eigenvalues slightly below zero: not an error."""
    rng = np.random.default_rng(9)
    mu1, s1 = gaussian_stats(rng, 30, 128)
    mu2, s2 = gaussian_stats(rng, 30, 128, shift=0.1)
    s1_32 = s1.astype(np.float32)
    assert np.linalg.eigvalsh(s1_32.astype(np.float64)).min() < 0
    value = frechet_distance(mu1, s1_32, mu2, s2)
    assert value == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-5)


def test_frechet_eps_fallback_when_the_eigendecomposition_fails(monkeypatch):
    rng = np.random.default_rng(2)
    mu1, s1 = gaussian_stats(rng, 200, 8)
    mu2, s2 = gaussian_stats(rng, 200, 8, shift=0.1)
    real_eigh, calls = np.linalg.eigh, []

    def flaky_eigh(a, *args, **kwargs):
        calls.append(a.copy())
        if len(calls) == 1:
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(np.linalg, "eigh", flaky_eigh)
    with pytest.warns(RuntimeWarning, match="adding 0.001 to the diagonal"):
        value = frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    np.testing.assert_allclose(calls[1], s1 + 1e-3 * np.eye(8), rtol=0, atol=1e-15)
    offset = 1e-3 * np.eye(8)
    covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert value == pytest.approx(expected, rel=1e-10)


def import_peer_or_skip(package: str, module: str, install: str):
    """``module`` of an optional peer package, or a skip saying why: not installed, or installed but failing to
    import (both peers import torchvision, which must be a build for this exact torch)."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed ({install}); comparison skipped")
    try:
        return importlib.import_module(module)
    except Exception as error:  # a missing or mismatched torchvision raises ImportError or RuntimeError
        pytest.skip(f"{package} is installed but {module} does not import ({type(error).__name__}: {error}); "
                    "it needs a torchvision built for this torch; comparison skipped")


def test_frechet_matches_pytorch_fid():
    calculate_frechet_distance = import_peer_or_skip("pytorch_fid", "pytorch_fid.fid_score",
                                                     "pip install --no-deps pytorch-fid").calculate_frechet_distance
    rng = np.random.default_rng(12)
    for n, d in ((1000, 64), (40, 128)):  # full rank, then rank-deficient
        mu1, s1 = gaussian_stats(rng, n, d)
        mu2, s2 = gaussian_stats(rng, n, d, shift=0.2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its scipy.linalg.sqrtm(disp=False) call is deprecated
            theirs = float(calculate_frechet_distance(mu1, s1, mu2, s2))
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs, rel=1e-10 if n > d else 1e-6)


# ----------------------------------------------------------------------------------------------------------------
# statistics


def test_activation_statistics_matches_numpy():
    rng = np.random.default_rng(4)
    features = rng.standard_normal((50, 7)).astype(np.float32)
    mu, sigma = activation_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-14)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-13)
    mu_t, sigma_t = activation_statistics(torch.from_numpy(features))
    np.testing.assert_array_equal(mu_t, mu)
    np.testing.assert_array_equal(sigma_t, sigma)
    assert activation_statistics(features[:, :1])[1].shape == (1, 1)


def test_activation_statistics_errors():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        activation_statistics(np.zeros(5))
    with pytest.raises(ValueError, match="at least 2 samples"):
        activation_statistics(np.zeros((1, 5)))
    features = np.zeros((4, 3))
    features[2, 1] = np.inf
    with pytest.raises(ValueError, match="1 of 4 rows"):
        activation_statistics(features)


def test_save_load_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    mu, sigma = activation_statistics(rng.standard_normal((20, 6)))
    path = tmp_path / "stats.npz"
    save_statistics(path, mu, sigma)
    with np.load(path) as data:  # pytorch-fid's form: keys mu and sigma
        assert sorted(data.files) == ["mu", "sigma"]
    loaded_mu, loaded_sigma = load_statistics(str(path))
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    # torch / float32 inputs are stored as float64; the name is kept as given (no ".npz" appended)
    save_statistics(tmp_path / "plain", torch.from_numpy(mu).float(), sigma.astype(np.float32))
    plain_mu, plain_sigma = load_statistics(tmp_path / "plain")
    assert plain_mu.dtype == plain_sigma.dtype == np.float64
    np.testing.assert_array_equal(plain_mu, mu.astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "stats.npz"]  # no temporary left behind
    with pytest.raises(ValueError, match="mu must have shape"):
        save_statistics(tmp_path / "bad.npz", mu, sigma[:3])


def test_load_statistics_reference_batch_forms(tmp_path):
    rng = np.random.default_rng(10)
    activations = rng.standard_normal((30, 5))
    mu, sigma = activation_statistics(activations)
    # ADM / OpenAI reference batch: images in arr_0, precomputed mu / sigma (and the spatial mu_s / sigma_s)
    adm = tmp_path / "VIRTUAL_ref.npz"
    np.savez(adm, arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), mu=mu, sigma=sigma,
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    loaded = load_statistics(adm)
    np.testing.assert_array_equal(loaded[0], mu)
    np.testing.assert_array_equal(loaded[1], sigma)
    # only activations in arr_0: the statistics are computed from them
    only = tmp_path / "activations.npz"
    np.savez(only, activations)
    loaded = load_statistics(only)
    np.testing.assert_allclose(loaded[0], mu, rtol=1e-15)
    np.testing.assert_allclose(loaded[1], sigma, rtol=1e-15)
    # only images in arr_0: needs the network first
    images = tmp_path / "images.npz"
    np.savez(images, rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"arr_0.*\(4, 8, 8, 3\).*Inception"):
        load_statistics(images)


def test_load_statistics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_statistics(tmp_path / "missing.npz")
    np.savez(tmp_path / "mu_only.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="no 'sigma' key"):
        load_statistics(tmp_path / "mu_only.npz")
    np.savez(tmp_path / "other.npz", features=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"expected keys 'mu' and 'sigma'.*\['features'\]"):
        load_statistics(tmp_path / "other.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match="sigma"):
        load_statistics(tmp_path / "shapes.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="garbage.npz"):
        load_statistics(tmp_path / "garbage.npz")
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        load_statistics(tmp_path / "array.npy")


# ----------------------------------------------------------------------------------------------------------------
# the FID Inception network

# torchvision's inception_v3 has 27,161,264 parameters; without the auxiliary classifier (3,326,696) and with the
# 2015 graph's 1008 classes (+8 x 2049) the pt_inception-2015-12-05 layout has 23,850,960.
FID_INCEPTION_PARAMETERS = 27_161_264 - 3_326_696 + 8 * 2049


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict of our module's keys and shapes with random values: He-scaled convolutions and random
    BatchNorm affine parameters and running statistics, so the features stay O(1) and differ per channel."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(0, 1000, (), generator=generator)
        elif key.endswith("conv.weight"):
            state[key] = torch.randn(value.shape, generator=generator) * math.sqrt(2.0 / value[0].numel())
        elif key.endswith("bn.weight") or key.endswith("running_var"):
            state[key] = torch.empty(value.shape).uniform_(0.5, 1.5, generator=generator)
        elif key.endswith("bn.bias") or key.endswith("running_mean"):
            state[key] = torch.empty(value.shape).uniform_(-0.2, 0.2, generator=generator)
        else:  # fc
            state[key] = torch.randn(value.shape, generator=generator) * 0.01
    return state


@pytest.fixture(scope="module")
def weights():
    return random_state_dict(0)


@pytest.fixture(scope="module")
def inception(weights):
    model = FIDInceptionV3()
    model.load_state_dict(weights, strict=True)
    return model


def reference_features(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Independent functional implementation of pytorch-fid's network (``fid_inception_v3``: torchvision's
    Inception3 with FIDInceptionA / C / E_1 / E_2) and its input handling (``InceptionV3(resize_input=True,
    normalize_input=True)``), written block by block from those definitions, reading the state dict directly."""

    def conv(name, x, stride=1, padding=0):
        x = F.conv2d(x, state[f"{name}.conv.weight"], stride=stride, padding=padding)
        x = F.batch_norm(x, state[f"{name}.bn.running_mean"], state[f"{name}.bn.running_var"],
                         state[f"{name}.bn.weight"], state[f"{name}.bn.bias"], training=False, eps=0.001)
        return F.relu(x)

    def tf_avg_pool(x):  # the FID patch: the padded zeros are not counted
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    def fid_inception_a(p, x):
        branch1x1 = conv(f"{p}.branch1x1", x)
        branch5x5 = conv(f"{p}.branch5x5_2", conv(f"{p}.branch5x5_1", x), padding=2)
        branch3x3dbl = conv(f"{p}.branch3x3dbl_1", x)
        branch3x3dbl = conv(f"{p}.branch3x3dbl_2", branch3x3dbl, padding=1)
        branch3x3dbl = conv(f"{p}.branch3x3dbl_3", branch3x3dbl, padding=1)
        branch_pool = conv(f"{p}.branch_pool", tf_avg_pool(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)

    def inception_b(p, x):
        branch3x3 = conv(f"{p}.branch3x3", x, stride=2)
        branch3x3dbl = conv(f"{p}.branch3x3dbl_1", x)
        branch3x3dbl = conv(f"{p}.branch3x3dbl_2", branch3x3dbl, padding=1)
        branch3x3dbl = conv(f"{p}.branch3x3dbl_3", branch3x3dbl, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    def fid_inception_c(p, x):
        branch1x1 = conv(f"{p}.branch1x1", x)
        branch7x7 = conv(f"{p}.branch7x7_1", x)
        branch7x7 = conv(f"{p}.branch7x7_2", branch7x7, padding=(0, 3))
        branch7x7 = conv(f"{p}.branch7x7_3", branch7x7, padding=(3, 0))
        branch7x7dbl = conv(f"{p}.branch7x7dbl_1", x)
        branch7x7dbl = conv(f"{p}.branch7x7dbl_2", branch7x7dbl, padding=(3, 0))
        branch7x7dbl = conv(f"{p}.branch7x7dbl_3", branch7x7dbl, padding=(0, 3))
        branch7x7dbl = conv(f"{p}.branch7x7dbl_4", branch7x7dbl, padding=(3, 0))
        branch7x7dbl = conv(f"{p}.branch7x7dbl_5", branch7x7dbl, padding=(0, 3))
        branch_pool = conv(f"{p}.branch_pool", tf_avg_pool(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)

    def inception_d(p, x):
        branch3x3 = conv(f"{p}.branch3x3_2", conv(f"{p}.branch3x3_1", x), stride=2)
        branch7x7x3 = conv(f"{p}.branch7x7x3_1", x)
        branch7x7x3 = conv(f"{p}.branch7x7x3_2", branch7x7x3, padding=(0, 3))
        branch7x7x3 = conv(f"{p}.branch7x7x3_3", branch7x7x3, padding=(3, 0))
        branch7x7x3 = conv(f"{p}.branch7x7x3_4", branch7x7x3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    def fid_inception_e(p, x, pool):
        branch1x1 = conv(f"{p}.branch1x1", x)
        branch3x3 = conv(f"{p}.branch3x3_1", x)
        branch3x3 = torch.cat([conv(f"{p}.branch3x3_2a", branch3x3, padding=(0, 1)),
                               conv(f"{p}.branch3x3_2b", branch3x3, padding=(1, 0))], 1)
        branch3x3dbl = conv(f"{p}.branch3x3dbl_1", x)
        branch3x3dbl = conv(f"{p}.branch3x3dbl_2", branch3x3dbl, padding=1)
        branch3x3dbl = torch.cat([conv(f"{p}.branch3x3dbl_3a", branch3x3dbl, padding=(0, 1)),
                                  conv(f"{p}.branch3x3dbl_3b", branch3x3dbl, padding=(1, 0))], 1)
        branch_pool = conv(f"{p}.branch_pool", pool(x))
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)

    x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = conv("Conv2d_1a_3x3", x, stride=2)
    x = conv("Conv2d_2a_3x3", x)
    x = conv("Conv2d_2b_3x3", x, padding=1)
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = conv("Conv2d_3b_1x1", x)
    x = conv("Conv2d_4a_3x3", x)
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = fid_inception_a("Mixed_5b", x)
    x = fid_inception_a("Mixed_5c", x)
    x = fid_inception_a("Mixed_5d", x)
    x = inception_b("Mixed_6a", x)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = fid_inception_c(name, x)
    x = inception_d("Mixed_7a", x)
    x = fid_inception_e("Mixed_7b", x, tf_avg_pool)  # FIDInceptionE_1
    x = fid_inception_e("Mixed_7c", x, lambda t: F.max_pool2d(t, kernel_size=3, stride=1, padding=1))  # E_2
    return F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)


def test_inception_layout_and_keys(inception, weights):
    assert sum(p.numel() for p in inception.parameters()) == FID_INCEPTION_PARAMETERS
    keys = list(inception.state_dict())
    for key in ("Conv2d_1a_3x3.conv.weight", "Conv2d_4a_3x3.bn.running_var", "Mixed_5b.branch5x5_2.conv.weight",
                "Mixed_6e.branch7x7dbl_5.bn.bias", "Mixed_7c.branch3x3dbl_3b.conv.weight", "fc.weight", "fc.bias"):
        assert key in keys
    assert not any(key.startswith("AuxLogits") for key in keys)
    assert tuple(inception.state_dict()["fc.weight"].shape) == (1008, 2048)
    assert not any(p.requires_grad for p in inception.parameters())
    inception.train()
    assert not any(module.training for module in inception.modules())


def test_inception_features_match_the_reference_implementation(inception, weights):
    """Two images at a non-299 size (so the bilinear resize is part of the comparison)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand((2, 3, 96, 128), generator=generator)
    ours = inception.features(images)
    assert ours.shape == (2, 2048) and ours.dtype == torch.float32 and not ours.requires_grad
    with torch.no_grad():
        expected = reference_features(weights, images)
    assert float(expected.std()) > 0.05 and float((expected > 0).float().mean()) > 0.2  # not a degenerate net
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(ours[0], ours[1])


def test_inception_float64(weights):
    """``.double()`` runs the network in float64: features in float64, equal to the reference in float64 to
    float64 rounding."""
    model = FIDInceptionV3()
    model.load_state_dict(weights)
    model.double()
    images = torch.rand((1, 3, 299, 299), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = model.features(images)
    assert ours.dtype == torch.float64 and ours.shape == (1, 2048)
    double_state = {k: v.double() if v.is_floating_point() else v for k, v in weights.items()}
    with torch.no_grad():
        expected = reference_features(double_state, images)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))


def test_inception_input_handling(inception):
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (1, 3, 40, 50), dtype=torch.uint8, generator=generator)
    from_uint8 = inception.preprocess(pixels)
    assert from_uint8.shape == (1, 3, 299, 299) and from_uint8.dtype == torch.float32
    torch.testing.assert_close(from_uint8, inception.preprocess(pixels.float() / 255.0), rtol=0, atol=0)
    expected = F.interpolate(pixels.float() / 255.0, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(from_uint8, expected, rtol=0, atol=0)
    at_size = torch.rand((1, 3, 299, 299), generator=generator)
    torch.testing.assert_close(inception.preprocess(at_size), at_size * 2 - 1, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        inception.features(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        inception.features(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inception.features(torch.rand(1, 3, 64, 64) * 2 - 1)
    with pytest.raises(ValueError, match="non-finite"):
        inception.features(torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(ValueError, match="uint8"):
        inception.features(torch.zeros((1, 3, 64, 64), dtype=torch.int32))


def test_inception_from_file(tmp_path, weights):
    with pytest.raises(FileNotFoundError) as missing:
        FIDInceptionV3.from_file(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    assert FID_WEIGHTS_URL in str(missing.value)
    assert FID_WEIGHTS_URL == ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                               "pt_inception-2015-12-05-6726825d.pth")
    path = tmp_path / "weights.pth"
    torch.save(weights, path)
    loaded = FIDInceptionV3.from_file(path).state_dict()
    assert loaded.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key
    # the file has no num_batches_tracked (saved before they existed): still loads
    torch.save({k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}, path)
    FIDInceptionV3.from_file(path)
    # strict: a missing or an unexpected key is an error that names the file
    torch.save({k: v for k, v in weights.items() if k != "fc.bias"}, path)
    with pytest.raises(ValueError, match=r"(?s)weights.pth.*fc.bias"):
        FIDInceptionV3.from_file(path)
    torch.save({**weights, "AuxLogits.fc.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="AuxLogits"):
        FIDInceptionV3.from_file(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable"):
        FIDInceptionV3.from_file(path)


def test_inception_matches_torch_fidelity(tmp_path, inception, weights):
    """torch-fidelity's pure-PyTorch extractor on the same weights. It takes uint8 images ``u`` (TF1-style resize,
    ``(u - 128) / 128``); at 299 px both resizes are the identity and our ``2 x - 1`` of ``x = u / 256`` is
    exactly ``(u - 128) / 128``."""
    extractor = import_peer_or_skip("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3",
                                    "pip install --no-deps torch-fidelity")
    path = tmp_path / "weights.pth"
    torch.save(weights, path)
    theirs_model = extractor.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                         feature_extractor_weights_path=str(path))
    pixels = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        (theirs,) = theirs_model(pixels)
    ours = inception.features(pixels.float() / 256.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
