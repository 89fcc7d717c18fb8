"""DGQ grouping search: statistics per layout, spread rule, K-means, per-group ranges."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from dgq.eval.metrics import sqnr_db
from dgq.quant import (
    CHANNEL,
    LAYER,
    PIXEL,
    AxisStats,
    ConvGeometry,
    affine_params_from_range,
    axis_minmax,
    axis_spread,
    choose_axis,
    fake_quantize_affine,
    group_ranges,
    kmeans_groups,
    search_groups,
)
from tests.tolerances import OUTLIER_GROUPED_MIN_SQNR_DB, OUTLIER_PER_TENSOR_MAX_SQNR_DB


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_outlier_channels(shape, channel_dim, outliers, seed=0) -> torch.Tensor:
    """N(0, 1) data whose ``outliers`` channels are about 100x larger: uniform values whose range is
    exactly ``+-(300 + 0.1 j)`` for the j-th outlier (close ranges, so K-means keeps them together)."""
    x = torch.randn(shape, generator=gen(seed))
    for j, c in enumerate(outliers):
        idx = [slice(None)] * len(shape)
        idx[channel_dim] = c
        u = (torch.rand(x[tuple(idx)].shape, generator=gen(seed + 1 + j)) * 2 - 1).flatten()
        u[:2] = torch.tensor([-1.0, 1.0])
        x[tuple(idx)] = u.reshape(x[tuple(idx)].shape) * (300.0 + 0.1 * j)
    return x


# ------------------------------------------------------------------ step 1: statistics


def test_axis_minmax_linear_and_attention_layouts():
    x = torch.randn(2, 5, 3, generator=gen(0))  # (B, N, C)
    s = axis_minmax(x, "linear")
    assert torch.equal(s[CHANNEL][0], x.amin((0, 1))) and torch.equal(s[PIXEL][1], x.amax((0, 2)))
    q = torch.randn(2, 4, 7, 8, generator=gen(1))  # (B, heads, N, d)
    s = axis_minmax(q, "attention")
    assert s[CHANNEL][0].shape == (8,) and s[PIXEL][0].shape == (7,)
    assert torch.equal(s[CHANNEL][1], q.amax((0, 1, 2))) and torch.equal(s[PIXEL][0], q.amin((0, 1, 3)))
    assert set(axis_minmax(torch.randn(3, 6), "linear")) == {CHANNEL}


def test_axis_minmax_conv_views():
    x = torch.randn(2, 3, 4, 5, generator=gen(2))  # (B, C, H, W)
    plain = axis_minmax(x, "conv")
    assert torch.equal(plain[CHANNEL][0], x.amin((0, 2, 3)))
    assert torch.equal(plain[PIXEL][1], x.amax((0, 1)).flatten())  # row-major h * W + w
    one_by_one = axis_minmax(x, "conv_unfold", ConvGeometry.of(torch.nn.Conv2d(3, 8, 1)))
    for axis in (CHANNEL, PIXEL):
        assert all(torch.equal(a, b) for a, b in zip(plain[axis], one_by_one[axis], strict=True))
    geom = ConvGeometry.of(torch.nn.Conv2d(3, 8, 3, padding=1, stride=2))
    unf = axis_minmax(x, "conv_unfold", geom)
    cols = F.unfold(x, 3, padding=1, stride=2)  # (B, C*9, L)
    assert unf[CHANNEL][0].shape == (27,) and unf[PIXEL][0].shape == (cols.shape[-1],)
    assert torch.equal(unf[CHANNEL][1], cols.amax((0, 2))) and torch.equal(unf[PIXEL][0], cols.amin((0, 1)))


def test_axis_stats_streams_batches():
    batches = [torch.randn(b, 6, 4, generator=gen(3 + b)) for b in (1, 3, 2)]
    stats = AxisStats.from_batch(batches[0], "linear")
    for b in batches[1:]:
        stats.update(b)
    whole = AxisStats.from_batch(torch.cat(batches), "linear")
    assert stats.samples == 6
    for axis in (CHANNEL, PIXEL):
        assert all(torch.equal(a, b) for a, b in zip(stats.axis(axis), whole.axis(axis), strict=True))
    with pytest.raises(ValueError, match="one resolution"):
        stats.update(torch.randn(1, 7, 4))  # another token count
    with pytest.raises(ValueError):
        stats.update(torch.randn(1, 6, 4, 2))


@pytest.mark.parametrize(
    "x,layout",
    [
        (torch.tensor([[1.0, float("nan")]]), "linear"),
        (torch.randn(2, 3, 4), "conv"),
        (torch.randn(2, 3, 4, 4), "conv_unfold"),  # no geometry
        (torch.randn(2, 3, 4), "nchw"),
    ],
)
def test_axis_minmax_rejects_bad_input(x, layout):
    with pytest.raises(ValueError):
        axis_minmax(x, layout)


# ------------------------------------------------------------------ step 2: spread rule


def test_axis_spread_formula():
    amin, amax = torch.tensor([-1.0, -3.0, 0.0]), torch.tensor([2.0, 5.0, 1.0])
    assert axis_spread(amin, amax) == (5.0 - 1.0) + (0.0 - -3.0)


def test_spread_rule_picks_channel_when_channels_differ():
    x = torch.randn(2, 16, 8, 8, generator=gen(4)) * torch.linspace(0.1, 20, 16)[None, :, None, None]
    stats = AxisStats.from_batch(x, "conv")
    assert axis_spread(*stats.axis(CHANNEL)) > axis_spread(*stats.axis(PIXEL))
    assert choose_axis(stats) == CHANNEL


def test_spread_rule_picks_pixel_when_pixels_differ():
    x = torch.randn(2, 16, 8, 8, generator=gen(5)) * torch.linspace(0.1, 20, 64).reshape(1, 1, 8, 8)
    assert choose_axis(AxisStats.from_batch(x, "conv")) == PIXEL
    tokens = torch.randn(2, 4, 12, 8, generator=gen(6)) * torch.linspace(0.1, 20, 12)[None, None, :, None]
    assert choose_axis(AxisStats.from_batch(tokens, "attention")) == PIXEL


def test_spread_tie_goes_to_channel_and_2d_has_no_pixel_axis():
    assert choose_axis(AxisStats.from_batch(torch.ones(2, 3, 4), "linear")) == CHANNEL
    with pytest.raises(ValueError, match="layer-wise"):
        choose_axis(AxisStats.from_batch(torch.randn(2, 4), "linear"))


# ------------------------------------------------------------------ step 3: K-means


def test_kmeans_is_deterministic_and_sorted_by_range_width():
    amin = -torch.rand(200, generator=gen(7)) * torch.linspace(1, 50, 200)
    amax = torch.rand(200, generator=gen(8)) * torch.linspace(1, 50, 200)
    first = kmeans_groups(amin, amax, 8, seed=0)
    assert torch.equal(first, kmeans_groups(amin.clone(), amax.clone(), 8, seed=0))
    assert first.dtype == torch.int64 and first.shape == (200,)
    assert torch.unique(first).tolist() == list(range(8))
    gmin, gmax = group_ranges(amin, amax, first, 8)
    width = gmax - gmin
    assert bool((width[1:] >= width[:-1]).all())


def test_kmeans_fewer_elements_than_k_gives_one_group_each():
    amin, amax = torch.tensor([-1.0, -5.0, -2.0]), torch.tensor([1.0, 5.0, 3.0])
    assert kmeans_groups(amin, amax, 8).tolist() == [0, 2, 1]


def test_kmeans_duplicate_points_are_deterministic_without_warnings():
    amin = torch.tensor([-1.0, -1.0, -4.0, -1.0, -4.0, -9.0])
    amax = torch.tensor([1.0, 1.0, 4.0, 1.0, 4.0, 9.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        few = kmeans_groups(amin, amax, 8)  # 3 distinct points, k = 8
        many = kmeans_groups(torch.cat([amin, amin * 1.5]), torch.cat([amax, amax * 1.5]), 4)
    assert few.tolist() == [0, 0, 1, 0, 1, 2]
    assert many.max() == 3 and torch.equal(
        many, kmeans_groups(torch.cat([amin, amin * 1.5]), torch.cat([amax, amax * 1.5]), 4)
    )


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError):
        kmeans_groups(torch.tensor([0.0, float("nan")]), torch.tensor([1.0, 1.0]), 2)
    with pytest.raises(ValueError):
        kmeans_groups(torch.zeros(3), torch.ones(3), 0)
    with pytest.raises(ValueError):
        kmeans_groups(torch.zeros(3), torch.ones(4), 2)
    with pytest.raises(ValueError):
        kmeans_groups(torch.ones(3), torch.zeros(3), 2)  # amin > amax


# ------------------------------------------------------------------ step 4 and the whole search


def test_group_ranges_min_of_min_max_of_max():
    amin, amax = torch.tensor([-1.0, -3.0, -2.0, 0.5]), torch.tensor([1.0, 2.0, 7.0, 0.5])
    gmin, gmax = group_ranges(amin, amax, torch.tensor([0, 0, 1, 2]), 3)
    assert gmin.tolist() == [-3.0, -2.0, 0.5] and gmax.tolist() == [2.0, 7.0, 0.5]
    with pytest.raises(ValueError, match="no members"):
        group_ranges(amin, amax, torch.tensor([0, 0, 2, 2]), 3)


@pytest.mark.parametrize("k", [4, 8])
def test_outlier_channels_land_together_in_the_last_group(k):
    outliers = [5, 20, 41]
    x = with_outlier_channels((4, 32, 48), 2, outliers, seed=9)  # (B, N, C)
    result = search_groups(AxisStats.from_batch(x, "linear"), k, seed=0)
    assert result.axis == CHANNEL and result.k == k
    assert result.group_index.shape == (48,)
    last = result.k - 1
    assert (result.group_index == last).nonzero().flatten().tolist() == outliers
    assert float(result.group_max[last]) == pytest.approx(300.2)


def test_search_groups_quantizes_outlier_layer_well():
    outliers = [3, 17, 29]
    x = with_outlier_channels((4, 64, 32), 2, outliers, seed=10)
    regular = torch.ones(32, dtype=torch.bool)
    regular[outliers] = False
    result = search_groups(AxisStats.from_batch(x, "linear"), 8, seed=0)
    scale, zero = result.affine_params(8)
    assert torch.equal(scale, affine_params_from_range(result.group_min, result.group_max, 8)[0])
    grouped = fake_quantize_affine(x, scale, zero, 0, 255, axis=-1, group_index=result.group_index)
    baseline = search_groups(AxisStats.from_batch(x, "linear"), 1)
    s1, z1 = baseline.affine_params(8)
    per_tensor = fake_quantize_affine(x, s1, z1, 0, 255)
    assert sqnr_db(x[..., regular], grouped[..., regular]) > OUTLIER_GROUPED_MIN_SQNR_DB
    assert sqnr_db(x[..., regular], per_tensor[..., regular]) < OUTLIER_PER_TENSOR_MAX_SQNR_DB


def test_group_ranges_cover_their_members():
    x = torch.randn(2, 8, 6, 6, generator=gen(11)) * torch.linspace(0.1, 20, 36).reshape(1, 1, 6, 6)
    stats = AxisStats.from_batch(x, "conv")
    result = search_groups(stats, 8, seed=3)
    assert result.axis == PIXEL and result.group_index.shape == (36,)
    amin, amax = stats.axis(PIXEL)
    for g in range(result.k):
        members = result.group_index == g
        assert float(result.group_min[g]) == float(amin[members].min())
        assert float(result.group_max[g]) == float(amax[members].max())
    assert int(result.group_sizes().sum()) == 36
    assert set(result.spread) == {CHANNEL, PIXEL} and result.spread[PIXEL] > result.spread[CHANNEL]


def test_k1_and_2d_inputs_keep_one_layerwise_range():
    x = torch.rand(2, 5, 4, generator=gen(12)) + 1.0  # all positive
    one = search_groups(AxisStats.from_batch(x, "linear"), 1)
    assert one.axis == LAYER and one.k == 1 and one.group_index.tolist() == [0]
    assert float(one.group_min[0]) == float(x.min()) and float(one.group_max[0]) == float(x.max())
    scale, zero = one.affine_params(8)  # layer-wise: widened to contain 0
    assert float(zero) == 0.0 and float(scale) == pytest.approx(float(x.max()) / 255)
    flat = search_groups(AxisStats.from_batch(torch.randn(3, 10, generator=gen(13)), "linear"), 16)
    assert flat.axis == LAYER and flat.k == 1 and set(flat.spread) == {CHANNEL}
    with pytest.raises(ValueError):
        search_groups(AxisStats.from_batch(x, "linear"), 0)
