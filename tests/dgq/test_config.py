import json

import pytest

from dgq.config import PRESETS, TRT_DEMO_KEEP_FLOAT, QuantConfig, preset


def test_defaults_are_the_documented_dgq_setting():
    """The paper's bits, K, kept-float layers and BOS handling; uniform attention probabilities
    (the documented deviation; ``dgq-paper`` has log2)."""
    c = QuantConfig()
    assert (c.wbits, c.abits, c.groups, c.profile, c.attn_probs, c.bos_fp) == (8, 8, 16, "faithful", "uniform", True)
    assert c.keep_float == ("conv_in", "conv_out")
    assert preset("dgq") == c and preset("dgq-paper").attn_probs == "log2"
    assert not c.is_symmetric and QuantConfig(profile="tensorrt").is_symmetric
    # onnxruntime: uint8 activations with zero points, int8 weights with zero points 0
    ort = QuantConfig(profile="onnxruntime")
    assert not ort.is_symmetric and ort.weights_symmetric and not c.weights_symmetric


@pytest.mark.parametrize(
    "bad",
    [
        dict(wbits=9),
        dict(abits=1),
        dict(groups=0),
        dict(profile="onnx"),
        dict(act_axis="row"),
        dict(attn_probs="log10"),
        dict(outlier_bits=12),
        dict(version=99),
        dict(weight_block=100),
        dict(profile="onnxruntime", symmetric=True),
        dict(profile="onnxruntime", outlier_bits=16),
        dict(profile="onnxruntime", weight_granularity="block"),
    ],
)
def test_invalid_fields_are_refused(bad):
    with pytest.raises(ValueError, match="invalid QuantConfig"):
        QuantConfig(**bad)


def test_dict_round_trip_and_unknown_fields():
    c = preset("dgq", wbits=4, abits=6, keep_float=TRT_DEMO_KEEP_FLOAT)
    assert QuantConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown QuantConfig fields"):
        QuantConfig.from_dict({**c.to_dict(), "lr": 1})


def test_keep_float_patterns_name_layers():
    c = QuantConfig(keep_float=TRT_DEMO_KEEP_FLOAT)
    for name in (
        "conv_in",
        "time_embedding.linear_1",
        "down_blocks.0.resnets.0.time_emb_proj",
        "up_blocks.1.resnets.0.conv_shortcut",
        "down_blocks.0.attentions.0.proj_out",
    ):
        assert c.keeps_float(name), name
    assert not c.keeps_float("down_blocks.0.resnets.0.conv1")
    assert not QuantConfig().keeps_float("time_embedding.linear_1")


def test_presets_differ_only_as_documented():
    assert set(PRESETS) == {"dgq", "dgq-paper", "dgq-k1", "naive", "trt-demo"}
    assert preset("dgq-paper") == preset("dgq", attn_probs="log2")
    assert preset("dgq-k1").groups == 1 and preset("dgq-k1").time_aware
    naive = preset("naive")
    assert (naive.weight_granularity, naive.time_aware, naive.attn_probs) == ("tensor", False, "uniform")
    trt = preset("trt-demo")
    assert trt.is_symmetric and not trt.quantize_qkv and trt.attn_probs == "float"
    with pytest.raises(ValueError, match="unknown preset"):
        preset("smoothquant")


def test_stored_configs_without_later_fields_read_them_as_off():
    """A recipe written before folded Linear inputs and normalized outputs was calibrated without them."""
    from dgq.config import LEGACY_OFF

    stored = QuantConfig(profile="onnxruntime").to_dict()
    for name in LEGACY_OFF:
        del stored[name]
    old = QuantConfig.from_dict(stored)
    assert not old.fold_linear and not old.norm_outputs and not old.folds_linear and not old.folds_conv
    new = QuantConfig(profile="onnxruntime")  # new configs have them on
    assert new.folds_linear and new.folds_conv and new.normalizes_outputs
    assert not QuantConfig(profile="onnxruntime", weight_granularity="tensor").normalizes_outputs


def test_conv_fold_at_w8a8_unless_set():
    assert QuantConfig(profile="onnxruntime").folds_conv
    assert not QuantConfig(profile="onnxruntime", abits=6).folds_conv
    assert not QuantConfig(profile="onnxruntime", wbits=4).folds_conv
    assert QuantConfig(profile="onnxruntime", wbits=4, fold_conv=True).folds_conv
    assert not QuantConfig(profile="onnxruntime", fold_conv=False).folds_conv
    # the tensorrt profile's fold is fold_groups, whatever fold_conv says
    assert not QuantConfig(profile="tensorrt", outlier_bits=16, fold_conv=True, fold_groups=False).folds_conv
    stored = QuantConfig(profile="onnxruntime", abits=6).to_dict()
    assert QuantConfig.from_dict(json.loads(json.dumps(stored))).fold_conv is None  # the rule, not a value
    for bad in ("yes", 1, 1.0):
        with pytest.raises(ValueError, match="fold_conv"):
            QuantConfig(profile="onnxruntime", fold_conv=bad)


def test_fold_strength_follows_the_weight_width_unless_set():
    from dgq.config import FOLD_STRENGTH_8BIT, FOLD_STRENGTH_LOWBIT

    assert QuantConfig(profile="onnxruntime").fold_exponent == FOLD_STRENGTH_8BIT == 1.0
    assert QuantConfig(profile="onnxruntime", wbits=4).fold_exponent == FOLD_STRENGTH_LOWBIT < 1.0
    assert QuantConfig(profile="onnxruntime", wbits=4, fold_strength=1.0).fold_exponent == 1.0
    stored = QuantConfig(profile="onnxruntime", wbits=4, fold_strength=0.25).to_dict()
    assert QuantConfig.from_dict(json.loads(json.dumps(stored))).fold_exponent == 0.25
    # a stored fold without the field was made at strength 1, whatever its weight width
    del stored["fold_strength"]
    assert QuantConfig.from_dict(stored).fold_exponent == 1.0


@pytest.mark.parametrize("strength", [-0.1, 1.5, "half"])
def test_fold_strength_outside_0_1_is_refused(strength):
    with pytest.raises(ValueError, match="fold_strength"):
        QuantConfig(profile="onnxruntime", fold_strength=strength)


def test_tensorrt_folds_channel_groups_with_8bit_weights_unless_told():
    """New tensorrt configs fold Conv and Linear input groups with 8-bit weights (not with 4-bit ones,
    where it cost more); stored ones without the field were calibrated with a branch per group and keep
    it; only None/True/False is accepted."""
    from dgq.config import LEGACY_OFF

    new = QuantConfig(profile="tensorrt", outlier_bits=16)
    assert new.fold_groups is None and new.folds_groups and new.folds_conv and new.folds_linear
    assert QuantConfig(profile="tensorrt", outlier_bits=16, abits=6).folds_groups
    assert not QuantConfig(profile="tensorrt", outlier_bits=16, wbits=4).folds_groups
    assert QuantConfig(profile="tensorrt", outlier_bits=16, wbits=4, fold_groups=True).folds_groups
    off = QuantConfig(profile="tensorrt", outlier_bits=16, fold_groups=False)
    assert not off.folds_conv and not off.folds_linear
    assert not QuantConfig(fold_groups=True).folds_conv  # the faithful profile folds nothing
    stored = new.to_dict()
    assert "fold_groups" in LEGACY_OFF
    del stored["fold_groups"]
    assert not QuantConfig.from_dict(stored).folds_conv
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match="fold_groups"):
            QuantConfig(profile="tensorrt", fold_groups=bad)


def test_min_intensity_is_a_finite_number_and_off_in_stored_configs():
    assert QuantConfig().min_intensity == 0.0  # every layer, unless asked
    for bad in (-1.0, float("inf"), float("nan"), "150", None):
        with pytest.raises(ValueError, match="min_intensity"):
            QuantConfig(min_intensity=bad)
    stored = QuantConfig(profile="onnxruntime", min_intensity=150.0).to_dict()
    assert QuantConfig.from_dict(json.loads(json.dumps(stored))).min_intensity == 150.0
    del stored["min_intensity"]  # a recipe written before the rule quantized every layer
    assert QuantConfig.from_dict(stored).min_intensity == 0.0


def assert_rule_field_is_stored(config: QuantConfig, field: str, threshold: str, now: float, before: float):
    """``config`` round-trips with its ``threshold`` at ``now``; stored without the bool ``field`` (a
    recipe from before it) it reads the field as off, ``before``; anything but a bool is refused."""
    stored = config.to_dict()
    assert getattr(QuantConfig.from_dict(json.loads(json.dumps(stored))), threshold) == now
    del stored[field]
    assert getattr(QuantConfig.from_dict(stored), threshold) == before
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=field):
            QuantConfig(**{field: bad})


def test_branched_convs_have_the_higher_threshold_and_stored_configs_keep_theirs():
    from dgq.config import BRANCH_RULE_FACTOR

    ort = QuantConfig(profile="onnxruntime", groups=4, min_intensity=150.0)
    assert ort.folds_conv and ort.conv_min_intensity == 150.0  # W8A8: one folded QLinearConv per conv
    low = ort.replace(abits=6)
    assert not low.folds_conv and low.conv_min_intensity == 150.0 * 4 * BRANCH_RULE_FACTOR
    assert ort.replace(fold_conv=False).conv_min_intensity == low.conv_min_intensity
    assert low.replace(groups=1).conv_min_intensity == 150.0  # one branch: no gathers, one unit
    assert low.replace(groups=2).conv_min_intensity == 150.0  # never below the folded unit's
    assert low.replace(act_axis="layer").conv_min_intensity == 150.0
    assert low.replace(branch_rule=False).conv_min_intensity == 150.0
    assert low.replace(min_intensity=0.0).conv_min_intensity == 0.0  # every layer
    for profile in ("faithful", "tensorrt"):  # no QLinearConv branches
        assert QuantConfig(profile=profile, abits=6, groups=4, min_intensity=150.0).conv_min_intensity == 150.0
    # a recipe written before this rule picked its convs at min_intensity
    assert_rule_field_is_stored(low, "branch_rule", "conv_min_intensity", now=300.0, before=150.0)


def test_folded_linears_have_the_lower_threshold_and_stored_configs_keep_theirs():
    from dgq.config import LINEAR_RULE_FACTOR

    assert 0.0 < LINEAR_RULE_FACTOR < 1.0
    ort = QuantConfig(profile="onnxruntime", groups=4, min_intensity=150.0)
    assert ort.folds_linear and ort.linear_min_intensity == 150.0 * LINEAR_RULE_FACTOR
    assert ort.replace(abits=6, wbits=4).linear_min_intensity == ort.linear_min_intensity  # any bits
    assert ort.replace(fold_linear=False).linear_min_intensity == 150.0  # K MatMul branches: not swept
    assert ort.replace(linear_rule=False).linear_min_intensity == 150.0
    assert ort.replace(min_intensity=0.0).linear_min_intensity == 0.0  # every layer
    for profile in ("faithful", "tensorrt"):  # other Linear units
        assert QuantConfig(profile=profile, groups=4, min_intensity=150.0).linear_min_intensity == 150.0
    # a recipe written before this rule picked its Linears at min_intensity
    assert_rule_field_is_stored(ort, "linear_rule", "linear_min_intensity", now=90.0, before=150.0)


def test_the_recipe_summary_states_each_threshold_the_rule_applies():
    from dgq.summary import speed_rule_text

    assert speed_rule_text(QuantConfig()) == ""  # no rule
    ort = QuantConfig(profile="onnxruntime", groups=4, min_intensity=150.0)
    assert speed_rule_text(ort) == "; layers under 150 multiply-adds per element (folded Linears: under 90)"
    low = speed_rule_text(ort.replace(abits=6))
    assert "(convs as branches: under 300)" in low and "(folded Linears: under 90)" in low
    stored = speed_rule_text(ort.replace(abits=6, branch_rule=False, linear_rule=False))
    assert stored == "; layers under 150 multiply-adds per element"
    assert "Linears" not in speed_rule_text(QuantConfig(profile="tensorrt", min_intensity=150.0))
