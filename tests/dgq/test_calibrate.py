import copy

import pytest
import torch

from dgq.quant import CHANNEL, LAYER, PIXEL
from dgq.sites import attention_sites, layer_sites


def test_slots_are_the_scheduler_timesteps(tiny_pipe, tiny_recipe):
    tiny_pipe.scheduler.set_timesteps(4)
    expected = list(dict.fromkeys(float(t) for t in tiny_pipe.scheduler.timesteps))  # PNDM repeats one
    assert tiny_recipe.slots == expected


def test_every_site_is_calibrated(tiny_pipe, tiny_recipe):
    unet, cfg = tiny_pipe.unet, tiny_recipe.config
    layers = layer_sites(unet, cfg)
    names = {s.name for s in layers}
    assert "conv_in" not in names and "conv_out" not in names
    assert set(tiny_recipe.weights) == names
    expected = {s.input_key for s in layers}
    for a in attention_sites(unet, cfg):
        expected |= {a.key(r) for r in ("q", "k", "v")}
        assert a.key("probs") in tiny_recipe.probs
    assert set(tiny_recipe.acts) == expected


def test_groups_follow_method(tiny_recipe):
    n_slots = len(tiny_recipe.slots)
    axes = set()
    for key, act in tiny_recipe.acts.items():
        assert len(act.axis) == n_slots
        for s in range(n_slots):
            k, rg = act.k(s), act.ranges[s]
            assert 1 <= k <= 8 and rg.shape == (k, 2) and bool((rg[:, 0] <= rg[:, 1]).all())
            axes.add(act.axis[s])
            if act.axis[s] != LAYER:
                assert int(act.group_index[s].max()) == k - 1
        if "time_emb" in key or key.startswith("time_embedding"):
            assert set(act.axis) == {LAYER}  # 2-D inputs keep one layer-wise range
    assert {CHANNEL, PIXEL} <= axes


def test_tensorrt_profile_fixes_membership_across_steps(tiny_recipe_trt):
    assert tiny_recipe_trt.acts and tiny_recipe_trt.weights  # the loops below check something
    for act in tiny_recipe_trt.acts.values():
        assert len(set(act.axis)) == 1
        assert all(torch.equal(g, act.group_index[0]) for g in act.group_index)
    for w in tiny_recipe_trt.weights.values():
        assert w.symmetric and bool((w.zero_point == 0).all())


def test_one_statistics_pass_serves_every_preset(tiny_pipe, tiny_stats):
    from dgq.calibrate import build_recipe
    from dgq.config import preset

    naive = build_recipe(tiny_stats, tiny_pipe.unet, preset("naive"), progress=False)
    assert naive.acts and naive.weights and naive.probs  # so the all() below are not vacuous
    assert all(a.axis == ["layer"] for a in naive.acts.values())  # one range for all steps
    assert all(w.granularity == "tensor" for w in naive.weights.values())
    assert all(p.static_max is not None and p.static_max.numel() == 1 for p in naive.probs.values())
    trt = build_recipe(tiny_stats, tiny_pipe.unet, preset("trt-demo"), progress=False)
    assert not any(k.endswith((".q", ".k", ".v")) for k in trt.acts) and not trt.probs
    assert not any("conv_shortcut" in k or "time_emb" in k for k in trt.weights)


def test_bos_row_is_left_out_of_cross_attention_key_statistics(tiny_pipe, tiny_stats, tiny_recipe):
    from dgq.calibrate import build_recipe
    from dgq.config import preset

    cross = [k for k in tiny_recipe.acts if ".attn2.k" in k]
    assert cross
    no_bos = build_recipe(
        tiny_stats, tiny_pipe.unet, preset("dgq", groups=8, weight_init="minmax", bos_fp=False), progress=False
    )
    for key in cross:
        for s, axis in enumerate(tiny_recipe.acts[key].axis):
            if axis == "pixel":  # token axis: 76 tokens without BOS, 77 with it
                assert tiny_recipe.acts[key].group_index[s].numel() == 76
            if no_bos.acts[key].axis[s] == "pixel":
                assert no_bos.acts[key].group_index[s].numel() == 77


@pytest.mark.parametrize("profile", ["faithful", "onnxruntime"])
def test_with_bits_equals_a_fresh_build(tiny_pipe, tiny_stats, tiny_recipe, profile):
    """Also for the onnxruntime profile before its output pass, whose folded Linear weights carry the
    fold's scale in their columns."""
    from dgq.calibrate import build_recipe, with_bits
    from dgq.config import preset

    recipe = tiny_recipe
    if profile == "onnxruntime":
        config = preset("dgq", groups=4, profile="onnxruntime")
        recipe = build_recipe(tiny_stats, tiny_pipe.unet, config, progress=False)
    fresh = build_recipe(tiny_stats, tiny_pipe.unet, recipe.config.replace(wbits=4, abits=6), progress=False)
    rebit = with_bits(recipe, tiny_pipe.unet, 4, 6)
    assert rebit.config == fresh.config
    assert rebit.header() == fresh.header()
    for k, t in fresh.tensors().items():
        assert torch.equal(t, rebit.tensors()[k]), k


def test_with_bits_refuses_bits_whose_speed_rule_picks_other_layers(tiny_pipe, tiny_stats):
    """W8A8 folds the onnxruntime target's convs; below it they are branches with a higher threshold."""
    from dgq.calibrate import build_recipe, with_bits
    from dgq.config import preset

    config = preset("dgq", groups=4, profile="onnxruntime", min_intensity=30.0)
    recipe = build_recipe(tiny_stats, tiny_pipe.unet, config, progress=False)
    with pytest.raises(ValueError, match="speed rule picks other layers"):
        with_bits(recipe, tiny_pipe.unet, 8, 6)
    low = build_recipe(tiny_stats, tiny_pipe.unet, config.replace(abits=6), progress=False)
    with pytest.raises(ValueError, match="speed rule picks other layers"):
        with_bits(low, tiny_pipe.unet, 8, 8)
    assert set(with_bits(low, tiny_pipe.unet, 4, 6).weights) == set(low.weights)  # the same sites


def test_statistics_footprint_is_what_calibration_keeps(tiny_pipe, tiny_stats):
    from dgq.calibrate import statistics_bytes, statistics_footprint

    fp = statistics_footprint(tiny_pipe.unet, tiny_pipe.unet.config.sample_size)
    assert statistics_bytes(tiny_stats) == fp["bytes_per_slot"] * len(tiny_stats.slots)


def test_statistics_footprint_of_sdxl_needs_no_weights():
    from diffusers import UNet2DConditionModel

    from dgq.calibrate import statistics_footprint
    from dgq.config import QuantConfig
    from dgq.zoo import configs

    with torch.device("meta"):  # 2.6B parameters, none allocated
        unet = UNet2DConditionModel(**configs.SDXL_UNET)
    small, large = statistics_footprint(unet, 64), statistics_footprint(unet, 128)
    everything = QuantConfig(keep_float=())
    assert small["sites"] == len(layer_sites(unet, everything)) + 3 * len(attention_sites(unet, everything))
    assert small["sites"] == large["sites"] and small["bytes_per_slot"] < large["bytes_per_slot"]


def test_intensity_is_multiply_adds_per_element_read_or_written():
    from dgq.sites import intensity

    assert intensity(torch.nn.Linear(320, 320)) == 160.0
    assert intensity(torch.nn.Linear(384, 128)) == 384 * 128 / 512
    assert intensity(torch.nn.Conv2d(32, 32, 3, padding=1)) == 32 * 32 * 9 / 64
    # a stride-2 conv reads four input pixels per output pixel
    assert intensity(torch.nn.Conv2d(64, 64, 3, stride=2, padding=1)) == 64 * 64 * 9 / (64 * 4 + 64)
    assert intensity(torch.nn.Conv2d(64, 64, 3, groups=4)) == 16 * 64 * 9 / 128
    with pytest.raises(TypeError):
        intensity(torch.nn.GroupNorm(2, 4))


def test_min_intensity_keeps_small_layers_float_everywhere(tiny_pipe, tiny_stats):
    """The rule picks the sites, so calibration, the recipe and the simulator agree on them."""
    from dgq.calibrate import build_recipe
    from dgq.config import ORT_MIN_INTENSITY, preset
    from dgq.simulate import apply_recipe
    from dgq.sites import intensity

    unet = tiny_pipe.unet
    config = preset("dgq", groups=4, profile="onnxruntime", weight_init="minmax", min_intensity=ORT_MIN_INTENSITY)
    every = {s.name for s in layer_sites(unet, config.replace(min_intensity=0.0))}
    kept = {s.name for s in layer_sites(unet, config)}
    modules = dict(unet.named_modules())
    assert kept and kept < every

    def least(name: str) -> float:
        conv = type(modules[name]) is torch.nn.Conv2d
        return config.conv_min_intensity if conv else config.linear_min_intensity

    assert config.conv_min_intensity == ORT_MIN_INTENSITY  # W8A8: folded convs
    # folded Linears: the lower threshold (the tiny UNet has no Linear between the two, intensity 64 at
    # most; test_branched_convs_and_folded_linears_take_their_thresholds has one)
    assert config.linear_min_intensity < ORT_MIN_INTENSITY
    assert all(intensity(modules[n]) >= least(n) for n in kept)
    assert all(intensity(modules[n]) < least(n) for n in every - kept)
    recipe = build_recipe(tiny_stats, unet, config, progress=False)
    assert set(recipe.weights) == kept
    assert {k.removesuffix(".input") for k in recipe.acts if k.endswith(".input")} == kept
    quantized = copy.deepcopy(unet)
    apply_recipe(quantized, recipe, observe_outputs=lambda name, groups: lambda group, y, slot: None)
    types = {name: type(m) for name, m in quantized.named_modules()}
    assert all(types[n] in (torch.nn.Conv2d, torch.nn.Linear) for n in every - kept)
    assert not any(types[n] in (torch.nn.Conv2d, torch.nn.Linear) for n in kept)


def test_branched_convs_and_folded_linears_take_their_thresholds(tiny_pipe):
    """Below W8A8 the onnxruntime target's convs are K branches: a conv is quantized from
    conv_min_intensity on, a Linear (always folded) from the lower linear_min_intensity."""
    from dgq.config import LINEAR_RULE_FACTOR, preset
    from dgq.sites import CONV, intensity

    unet = tiny_pipe.unet
    modules = dict(unet.named_modules())
    config = preset("dgq", groups=4, abits=6, profile="onnxruntime", min_intensity=30.0)
    least, least_linear = config.conv_min_intensity, config.linear_min_intensity
    assert least == 60.0 and least_linear == 30.0 * LINEAR_RULE_FACTOR
    every = layer_sites(unet, config.replace(min_intensity=0.0))
    kept = {s.name for s in layer_sites(unet, config)}
    for site in every:
        bound = least if site.kind == CONV else least_linear
        assert (site.name in kept) == (intensity(modules[site.name]) >= bound), site.name
    convs = [intensity(modules[s.name]) for s in every if s.kind == CONV]
    assert any(30.0 <= i < 60.0 for i in convs), "the tiny UNet has no conv between the two thresholds"
    linears = [intensity(modules[s.name]) for s in every if s.kind != CONV]
    assert any(least_linear <= i < 30.0 for i in linears), "the tiny UNet has no Linear between the thresholds"
    assert kept != {s.name for s in layer_sites(unet, config.replace(branch_rule=False))}
    assert kept != {s.name for s in layer_sites(unet, config.replace(linear_rule=False))}


def test_every_layer_of_sd15_and_sdxl_passes_the_onnxruntime_speed_rule():
    """What the README says of the rule on real architectures (meta device: no weights allocated):
    every layer passes at W8A8; below it, where convs are K=4 branches, only 1x1 convs are left out."""
    from diffusers import UNet2DConditionModel

    from dgq.config import ORT_MIN_INTENSITY, QuantConfig
    from dgq.zoo import configs

    for config in (configs.SD15_UNET, configs.SDXL_UNET):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        every = layer_sites(unet, QuantConfig())
        assert len(every) > 200 and layer_sites(unet, QuantConfig(min_intensity=ORT_MIN_INTENSITY)) == every
        branched = QuantConfig(profile="onnxruntime", abits=6, groups=4, min_intensity=ORT_MIN_INTENSITY)
        kept = {s.name for s in layer_sites(unet, branched)}
        left = [s.name for s in every if s.name not in kept]
        assert left and all(unet.get_submodule(n).kernel_size == (1, 1) for n in left)
