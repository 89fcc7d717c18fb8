"""dgq.eval.metrics on cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from dgq.eval import metrics
from tests.tolerances import METRIC_ANALYTIC_ATOL, METRIC_FLOAT32_INPUT_ATOL, SSIM_REFERENCE_ATOL


def _images(n=3, c=3, h=24, w=20, seed=0):
    # float64 so that analytic checks are not limited by float32 rounding of the test inputs
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def test_identical_tensors_give_infinite_sqnr_and_psnr_unit_cosine_ssim():
    x = _images()
    assert metrics.sqnr_db(x, x.clone()) == math.inf
    assert torch.isinf(metrics.sqnr_db(x, x.clone(), per_sample=True)).all()
    assert metrics.psnr(x, x.clone(), data_range=2.0) == math.inf
    assert metrics.mse(x, x.clone()) == 0.0
    assert metrics.cosine(x, x.clone()) == pytest.approx(1.0, abs=METRIC_ANALYTIC_ATOL)
    assert metrics.ssim(x, x.clone(), data_range=2.0) == pytest.approx(1.0, abs=METRIC_ANALYTIC_ATOL)


def test_sqnr_of_a_scaled_copy_is_analytic():
    # test = (1 - a) * ref  ->  error energy = a^2 * signal energy  ->  SQNR = -20 log10(a).
    x = _images()
    for a in (0.1, 0.01, 0.5):
        assert metrics.sqnr_db(x, (1 - a) * x) == pytest.approx(-20 * math.log10(a), abs=METRIC_ANALYTIC_ATOL)


def test_sqnr_aggregate_pools_energies_not_per_sample_decibels():
    ref = torch.stack([torch.full((4,), 1.0), torch.full((4,), 10.0)]).double()
    test = ref + 0.1
    signal, error = 4 * (1 + 100), 2 * 4 * 0.01
    assert metrics.sqnr_db(ref, test) == pytest.approx(10 * math.log10(signal / error), abs=METRIC_ANALYTIC_ATOL)
    per = metrics.sqnr_db(ref, test, per_sample=True)
    assert per.shape == (2,)
    assert per.tolist() == pytest.approx([20.0, 40.0], abs=METRIC_ANALYTIC_ATOL)


def test_psnr_of_a_known_noise_level_is_analytic():
    # A +-e pattern has MSE exactly e^2, so PSNR = 20 log10(range / e).
    x = _images(n=2)
    sign = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    for e, data_range in ((0.01, 2.0), (0.1, 1.0), (0.05, 255.0)):
        value = metrics.psnr(x, x + e * sign, data_range=data_range)
        assert value == pytest.approx(20 * math.log10(data_range / e), abs=METRIC_FLOAT32_INPUT_ATOL)
        per = metrics.psnr(x, x + e * sign, data_range=data_range, per_sample=True)
        assert per.tolist() == pytest.approx([20 * math.log10(data_range / e)] * 2, abs=METRIC_FLOAT32_INPUT_ATOL)


def test_psnr_aggregate_is_finite_when_only_some_images_match():
    x = _images(n=2)
    y = x.clone()
    y[1] += 0.1
    assert math.isinf(metrics.psnr(x, y, 2.0, per_sample=True)[0])
    assert metrics.psnr(x, y, 2.0) == pytest.approx(10 * math.log10(4 / (0.01 / 2)), abs=METRIC_ANALYTIC_ATOL)


def test_cosine_and_mse_known_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert metrics.cosine(a, b, per_sample=True).tolist() == pytest.approx([0.0, 1.0], abs=METRIC_ANALYTIC_ATOL)
    assert metrics.mse(a, b, per_sample=True).tolist() == pytest.approx([1.0, 1.0], abs=METRIC_ANALYTIC_ATOL)
    assert metrics.cosine(torch.zeros(2, 3), torch.zeros(2, 3)) == 1.0
    assert metrics.cosine(-a, a) == pytest.approx(-1.0, abs=METRIC_ANALYTIC_ATOL)


def test_ssim_of_constant_images_is_the_luminance_term():
    # Constant images have zero variance: SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    m1, m2, L = 0.2, 0.7, 1.0
    c1 = (metrics.SSIM_K1 * L) ** 2
    x, y = torch.full((1, 1, 16, 16), m1, dtype=torch.float64), torch.full((1, 1, 16, 16), m2, dtype=torch.float64)
    expected = (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1)
    assert metrics.ssim(x, y, data_range=L) == pytest.approx(expected, abs=METRIC_ANALYTIC_ATOL)


def test_ssim_matches_the_skimage_formula_computed_with_scipy():
    # skimage's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    # filters with scipy.ndimage.gaussian_filter (truncate 3.5 -> 11 taps) and crops 5 pixels per side.
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(2, 3, 32, 28, generator=torch.Generator().manual_seed(2))
    y = (x + 0.15 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    c1, c2 = (0.01 * 1.0) ** 2, (0.03 * 1.0) ** 2

    def reference(a, b):
        def filt(z):
            return ndimage.gaussian_filter(z, sigma=1.5, truncate=3.5)

        ux, uy = filt(a), filt(b)
        vx, vy, vxy = filt(a * a) - ux * ux, filt(b * b) - uy * uy, filt(a * b) - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        return s[5:-5, 5:-5].mean()

    expected = [
        sum(reference(x[i, c].double().numpy(), y[i, c].double().numpy()) for c in range(3)) / 3 for i in range(2)
    ]
    got = metrics.ssim(x, y, data_range=1.0, per_sample=True)
    assert got.tolist() == pytest.approx(expected, abs=SSIM_REFERENCE_ATOL)
    assert metrics.ssim(x, y, data_range=1.0) == pytest.approx(sum(expected) / 2, abs=SSIM_REFERENCE_ATOL)


def test_psnr_is_invariant_to_the_value_range_convention_but_ssim_is_not():
    # PSNR of [-1, 1] images with range 2 equals [0, 1] with range 1; SSIM's luminance term depends
    # on absolute means, so SSIM must be computed on [0, 1] images (what the yardstick does).
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = (x + 0.1).clamp(0, 1)
    assert metrics.psnr(x, y, 1.0) == pytest.approx(metrics.psnr(2 * x - 1, 2 * y - 1, 2.0), abs=METRIC_ANALYTIC_ATOL)
    assert abs(metrics.ssim(x, y, 1.0) - metrics.ssim(2 * x - 1, 2 * y - 1, 2.0)) > 0.1


def test_energy_ratio_matches_sqnr():
    x = _images()
    y = x + 0.01
    signal, error = metrics.energies(x, y, per_sample=True)
    assert signal.shape == error.shape == (3,)
    pooled = metrics.energy_ratio_db(float(signal.sum()), float(error.sum()))
    assert pooled == pytest.approx(metrics.sqnr_db(x, y), abs=METRIC_ANALYTIC_ATOL)
    assert metrics.energy_ratio_db(1.0, 0.0) == math.inf


def test_sqnr_edge_cases_agree_between_tensors_and_pooled_energies():
    # The per-layer report pools energies (energy_ratio_db), the export parity check compares tensors
    # (sqnr_db): the same cases must give the same answers.
    zero, one = torch.zeros(2, 3), torch.ones(2, 3)
    cases = [(one, one, math.inf), (zero, zero, math.inf), (zero, one, -math.inf)]
    for ref, test, want in cases:
        signal, error = metrics.energies(ref, test)
        assert metrics.sqnr_db(ref, test) == want
        assert metrics.energy_ratio_db(float(signal), float(error)) == want


def test_first_divergence_is_the_first_below_the_threshold_in_order():
    from types import SimpleNamespace as Layer

    layers = [Layer(name=n, sqnr_db=v) for n, v in [("a", math.inf), ("b", 30.0), ("c", math.nan), ("d", -math.inf)]]
    assert metrics.first_divergence(layers, 20.0).name == "d"  # -inf diverged; NaN and +inf do not count
    assert metrics.first_divergence([*layers[:2], Layer(name="e", sqnr_db=19.9), layers[3]], 20.0).name == "e"
    assert metrics.first_divergence(layers[:3], 20.0) is None
    assert metrics.first_divergence([], 20.0) is None


def test_summarize_reports_mean_median_min_max():
    s = metrics.summarize(torch.tensor([1.0, 4.0, 2.0, math.inf]))
    assert s == {"mean": math.inf, "median": 2.0, "min": 1.0, "max": math.inf}


@pytest.mark.parametrize(
    "call",
    [
        lambda: metrics.sqnr_db(torch.zeros(2, 3), torch.zeros(2, 4)),
        lambda: metrics.mse(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)),
        lambda: metrics.psnr(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), 1.0),
        lambda: metrics.psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), 0.0),
        lambda: metrics.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)),
        lambda: metrics.cosine(torch.zeros(3), torch.zeros(3), per_sample=True),
    ],
)
def test_bad_input_raises(call):
    with pytest.raises((ValueError, TypeError)):
        call()
