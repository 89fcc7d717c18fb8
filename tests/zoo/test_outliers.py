"""The stress model: planted outliers change what quantizers see, not what the float UNet computes."""

import pytest
import torch

from dgq import zoo
from dgq.zoo.outliers import FACTORS, plant_outliers
from tests.tolerances import PLANTED_OUTLIER_MIN_RATIO


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(2, c.in_channels, 16, 16, generator=g)
    e = torch.randn(2, 16, c.cross_attention_dim, generator=g)
    return x, e


def _site_inputs(unet, names, x, t, e):
    seen = {}
    hooks = [
        unet.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach()))
        for n in names
    ]
    try:
        with torch.no_grad():
            out = unet(x, t, e).sample
    finally:
        for h in hooks:
            h.remove()
    return out, seen


@pytest.fixture(scope="module")
def pair():
    base = zoo.build_pipeline("fashion", components=["unet"]).unet
    stressed = zoo.build_pipeline("fashion-outliers", components=["unet"]).unet
    return base, stressed


def test_the_float_unet_is_bit_identical(pair):
    base, stressed = pair
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), stressed.parameters(), strict=True))
    for seed, t in ((0, 981), (1, 501), (2, 21)):
        x, e = _inputs(base, seed)
        with torch.no_grad():
            assert torch.equal(base(x, t, e).sample, stressed(x, t, e).sample), (seed, t)


def test_planted_channels_stand_out_at_every_site(pair):
    base, stressed = pair
    planted = plant_outliers(zoo.build_pipeline("fashion", components=["unet"]).unet)
    assert len(planted) == 21 and {p.factor for p in planted} == set(FACTORS)  # 7 blocks x (ff, attn1, attn2)
    names = [p.consumer for p in planted]
    x, e = _inputs(base)
    _, before = _site_inputs(base, names, x, 501, e)
    _, after = _site_inputs(stressed, names, x, 501, e)
    for p in planted:
        amax_b = before[p.consumer].abs().flatten(0, -2).amax(0)
        amax_a = after[p.consumer].abs().flatten(0, -2).amax(0)
        others = [c for c in range(amax_a.numel()) if c not in p.channels]
        assert torch.allclose(amax_a[list(p.channels)], amax_b[list(p.channels)] * p.factor)
        ratio = amax_a[list(p.channels)].max() / amax_a[others].median()
        assert ratio >= PLANTED_OUTLIER_MIN_RATIO, (p.consumer, float(ratio))


def test_factors_must_be_powers_of_two():
    unet = zoo.build_pipeline("fashion", components=["unet"]).unet
    with pytest.raises(ValueError, match="powers of two"):
        plant_outliers(unet, factors=(10.0,))


def test_calibrated_with_the_captions_it_was_trained_on():
    from dgq.prompts import calibration_prompts

    assert calibration_prompts("fashion-outliers", 8) == calibration_prompts("fashion", 8)
