import copy
import dataclasses

import pytest
import torch

from dgq.attention import DGQAttnProcessor, StepContext
from dgq.calibrate import ActObserver, build_act_quant
from dgq.config import QuantConfig
from dgq.eval.metrics import sqnr_db
from dgq.plan import plan_act
from dgq.quant import CHANNEL, LAYER
from dgq.recipe import ActQuant, RecipeError
from dgq.simulate import ActFakeQuant, QuantLayer, apply_recipe, simulate
from dgq.sites import CONV, LINEAR
from tests.tolerances import ATTN_PROCESSOR_ATOL, OUTLIER_DGQ_MIN_SQNR_DB, TINY_W8A8_MIN_SQNR_DB


def unet_inputs(pipe, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    ids = pipe.tokenizer(["", "a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
    return sample, torch.tensor(t), text


def test_processor_without_hooks_equals_diffusers(tiny_pipe):
    unet = copy.deepcopy(tiny_pipe.unet)
    sample, t, text = unet_inputs(tiny_pipe, 981)
    with torch.no_grad():
        ref = unet(sample, t, text).sample
        ctx = StepContext()
        ctx.slot = 0
        unet.set_attn_processor(DGQAttnProcessor(ctx))
        out = unet(sample, t, text).sample
    assert torch.allclose(ref, out, atol=ATTN_PROCESSOR_ATOL)


def test_apply_and_remove_restore_the_float_unet(tiny_pipe, tiny_recipe):
    unet = copy.deepcopy(tiny_pipe.unet)
    sample, t, text = unet_inputs(tiny_pipe, tiny_recipe.slots[0])
    with torch.no_grad():
        ref = unet(sample, t, text).sample
        handle = apply_recipe(unet, tiny_recipe)
        quant = unet(sample, t, text).sample
        handle.remove()
        back = unet(sample, t, text).sample
    assert not torch.equal(ref, quant)
    assert torch.allclose(ref, back, atol=ATTN_PROCESSOR_ATOL)
    assert type(unet.get_submodule("down_blocks.0.resnets.0.conv1")) is torch.nn.Conv2d


@pytest.mark.parametrize("fixture", ["tiny_recipe", "tiny_recipe_trt"])
def test_w8a8_is_close_to_float(tiny_pipe, fixture, request):
    recipe = request.getfixturevalue(fixture)
    qpipe = simulate(tiny_pipe, recipe)
    assert qpipe.unet is not tiny_pipe.unet and type(tiny_pipe.unet.conv_in) is torch.nn.Conv2d
    for t in recipe.slots:
        sample, tt, text = unet_inputs(tiny_pipe, t)
        with torch.no_grad():
            ref = tiny_pipe.unet(sample, tt, text).sample
            out = qpipe.unet(sample, tt, text).sample
        assert sqnr_db(ref, out) > TINY_W8A8_MIN_SQNR_DB, t


def test_uncalibrated_timestep_runs_with_the_nearest_slot_other_model_is_refused(tiny_pipe, tiny_recipe):
    # A timestep between two calibrated ones runs with the nearest one's parameters: exactly the output
    # of a recipe whose nearest slot is relabelled to that timestep (slot values only select the row).
    slots = tiny_recipe.slots
    t = slots[0] - 0.3 * (slots[0] - slots[1])
    relabelled = dataclasses.replace(tiny_recipe, slots=[t, *slots[1:]])
    other = dataclasses.replace(tiny_recipe, slots=[slots[0], t, *slots[2:]])
    sample, _, text = unet_inputs(tiny_pipe, 0)
    with torch.no_grad():
        got = simulate(tiny_pipe, tiny_recipe).unet(sample, torch.tensor(t), text).sample
        want = simulate(tiny_pipe, relabelled).unet(sample, torch.tensor(t), text).sample
        second = simulate(tiny_pipe, other).unet(sample, torch.tensor(t), text).sample
    assert torch.equal(got, want)
    assert not torch.equal(got, second)  # the slots differ, so the test can tell which one ran
    other = copy.deepcopy(tiny_pipe.unet)
    with torch.no_grad():
        other.conv_in.weight.add_(1e-3)
    with pytest.raises(RecipeError, match="other weights"):
        apply_recipe(other, tiny_recipe)


def test_cross_attention_keeps_bos_out_of_the_probability_quantizer(tiny_pipe):
    seen = []
    ctx = StepContext()
    ctx.slot = 0

    def probs_hook(p, slot, heads):
        seen.append(p.shape[-1])
        return p

    unet = copy.deepcopy(tiny_pipe.unet)
    unet.set_attn_processor(DGQAttnProcessor(ctx, probs=probs_hook, keep_bos=True))
    sample, t, text = unet_inputs(tiny_pipe, 1)
    with torch.no_grad():
        unet(sample, t, text)
    assert 76 in seen  # cross-attention: 77 tokens minus BOS
    assert all(n in (76, 256, 64, 16) for n in seen)  # self-attention sees every pixel


def test_per_prompt_probability_scale_is_each_prompts_max_over_its_heads():
    """Rows ``b*heads .. b*heads + heads - 1`` of ``(B*heads, N, M)`` probabilities are prompt ``b``:
    each row is quantized on its prompt's max, and the uniform grid is ``max / (2^bits - 1)``."""
    from dgq.plan import ProbsPlan
    from dgq.simulate import ProbsFakeQuant

    heads, batch = 3, 4
    p = torch.rand(batch * heads, 5, 7, generator=torch.Generator().manual_seed(0)).softmax(-1)
    p[7, 2, 3] = 0.9  # prompt 2's max, in its second head
    q = ProbsFakeQuant(ProbsPlan("uniform", "prompt", 8, None))
    s = q.scale(p, 0, heads)
    expected = torch.stack([p[b * heads : (b + 1) * heads].amax() for b in range(batch)]).repeat_interleave(heads)
    assert s.shape == (batch * heads, 1, 1) and torch.equal(s.flatten(), expected)
    got = q(p, 0, heads)
    levels = got / s * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3) and float(got[7, 2, 3]) == pytest.approx(0.9)


def _outlier_input(seed=0):
    """Linear input (B, N, C) whose channels 3 and 17 are ~100x larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 64, 32, generator=g)
    x[..., [3, 17]] *= 100.0
    return x


@pytest.mark.parametrize("groups, min_db", [(8, OUTLIER_DGQ_MIN_SQNR_DB)])
def test_outlier_channels_keep_their_sqnr_under_dgq(groups, min_db):
    obs = ActObserver(LINEAR)
    for seed in range(3):
        obs(_outlier_input(seed), 0)
    x = _outlier_input(7)
    regular = [c for c in range(32) if c not in (3, 17)]
    results = {}
    for name, cfg in {"dgq": QuantConfig(groups=groups), "per-tensor": QuantConfig(groups=1)}.items():
        act = build_act_quant(LINEAR, obs.stats, 1, cfg)
        x_hat = ActFakeQuant(plan_act("x", act, 8, cfg))(x, 0)
        results[name] = (act.axis[0], sqnr_db(x[..., regular], x_hat[..., regular]))
    assert results["dgq"][0] == CHANNEL and results["per-tensor"][0] == LAYER
    assert results["dgq"][1] > min_db
    assert results["per-tensor"][1] < min_db - 15  # the regular channels drown in the outliers' range


def test_conv_pixel_groups_bind_to_positions():
    obs = ActObserver(CONV)
    # Seeded: with some draws a hot-row pixel near 0 joins the regular group and widens its range.
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    x[..., 0, :] *= 50.0  # the first row of pixels is hot in every channel
    obs(x, 0)
    act = build_act_quant(CONV, obs.stats, 1, QuantConfig(groups=2))
    assert act.axis == ["pixel"]
    hot = act.group_index[0].view(6, 6)[0]
    assert bool((hot == 1).all()) and int(act.group_index[0].sum()) == 6
    x_hat = ActFakeQuant(plan_act("x", act, 8, QuantConfig(groups=2)))(x, 0)
    assert x_hat.shape == x.shape and sqnr_db(x[..., 1:, :], x_hat[..., 1:, :]) > OUTLIER_DGQ_MIN_SQNR_DB


def _snapshot(unet):
    return (
        sum(isinstance(m, QuantLayer) for m in unet.modules()),
        len(unet._forward_pre_hooks),
        {k: type(v) for k, v in unet.attn_processors.items()},
    )


def test_a_bad_recipe_entry_leaves_the_unet_untouched(tiny_pipe, tiny_recipe):
    """The whole recipe is planned before the UNet is touched: a bad attention entry (group index
    outside its ranges) is refused with no layer swapped, no hook and no processor left behind."""
    recipe = copy.copy(tiny_recipe)
    recipe.acts = dict(recipe.acts)
    key = next(k for k in recipe.acts if k.endswith(".q"))
    a = recipe.acts[key]
    recipe.acts[key] = ActQuant(a.layout, a.axis, [gi + 100 for gi in a.group_index], a.ranges)
    unet = copy.deepcopy(tiny_pipe.unet)
    before = _snapshot(unet)
    with pytest.raises(RecipeError, match=key):
        apply_recipe(unet, recipe)
    assert _snapshot(unet) == before


def test_a_failure_while_applying_restores_the_float_unet(tiny_pipe, tiny_recipe, monkeypatch):
    unet = copy.deepcopy(tiny_pipe.unet)
    before = _snapshot(unet)
    calls = []

    def failing(processors):  # the second call is remove() restoring the originals
        calls.append(processors)
        if len(calls) == 1:
            raise RuntimeError("processor swap failed")
        return type(unet).set_attn_processor(unet, processors)

    monkeypatch.setattr(unet, "set_attn_processor", failing)
    with pytest.raises(RuntimeError, match="processor swap failed"):
        apply_recipe(unet, tiny_recipe)
    assert _snapshot(unet) == before
