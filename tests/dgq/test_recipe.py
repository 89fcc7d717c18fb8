import json

import pytest
import torch
from safetensors.torch import save_file

from dgq import recipe as R
from dgq import zoo
from dgq.calibrate import calibrate
from dgq.config import preset

from .conftest import CAL_PROMPTS


def test_round_trip_is_lossless(tiny_recipe, tmp_path):
    path = tiny_recipe.save(tmp_path / "r.safetensors")
    loaded = R.load(path)
    assert loaded.config == tiny_recipe.config and loaded.slots == tiny_recipe.slots
    assert loaded.model == tiny_recipe.model and set(loaded.acts) == set(tiny_recipe.acts)
    for key, act in tiny_recipe.acts.items():
        other = loaded.acts[key]
        assert other.axis == act.axis
        assert all(torch.equal(a, b) for a, b in zip(act.group_index, other.group_index, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(act.ranges, other.ranges, strict=True))
    for key, w in tiny_recipe.weights.items():
        assert torch.equal(loaded.weights[key].scale, w.scale)
    assert loaded.save(tmp_path / "again.safetensors").read_bytes() == path.read_bytes()


def test_calibration_is_deterministic(tiny_pipe, tmp_path):
    cfg = preset("dgq", groups=4)  # MSE weight search included
    runs = [
        calibrate(tiny_pipe, CAL_PROMPTS[:2], cfg, num_inference_steps=2, batch_size=2, progress=False)
        for _ in range(2)
    ]
    a, b = (r.save(tmp_path / f"{i}.safetensors").read_bytes() for i, r in enumerate(runs))
    assert a == b


def test_recipe_for_another_model_is_refused(tiny_recipe):
    other = zoo.build_pipeline("tiny", seed=1).unet
    with pytest.raises(R.RecipeError, match="other weights"):
        tiny_recipe.check_model(other)
    sd15 = zoo.builders.TINY_UNET | {"layers_per_block": 2}
    from diffusers import UNet2DConditionModel

    with pytest.raises(R.RecipeError, match="another model architecture"):
        tiny_recipe.check_model(UNet2DConditionModel(**sd15))


def test_bad_files_give_clear_errors(tiny_recipe, tmp_path):
    with pytest.raises(R.RecipeError, match="does not exist"):
        R.load(tmp_path / "missing.safetensors")
    good = tiny_recipe.save(tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(R.RecipeError, match="not a readable recipe"):
        R.load(tmp_path / "cut.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(R.RecipeError, match="not a dgq recipe"):
        R.load(tmp_path / "plain.safetensors")

    header = tiny_recipe.header()
    tensors = tiny_recipe.tensors()
    save_file(tensors, str(tmp_path / "v9.safetensors"), metadata={"dgq_recipe": json.dumps({**header, "version": 9})})
    with pytest.raises(R.RecipeError, match="version 9 is not supported"):
        R.load(tmp_path / "v9.safetensors")
    dropped = dict(tensors)
    victim = sorted(k for k in dropped if k.startswith("weight/"))[0]
    del dropped[victim]
    save_file(dropped, str(tmp_path / "drop.safetensors"), metadata={"dgq_recipe": json.dumps(header)})
    with pytest.raises(R.RecipeError, match="is missing"):
        R.load(tmp_path / "drop.safetensors")


def test_uncalibrated_timestep_takes_the_nearest_slot(tiny_recipe):
    slots = tiny_recipe.slots
    assert [tiny_recipe.slot_of(t) for t in slots] == list(range(len(slots)))
    for t in (slots[0] + 0.5, slots[-1] - 0.5, 1000.0, 0.0, (slots[0] + slots[1]) / 2 + 0.25):
        want = min(range(len(slots)), key=lambda i: abs(slots[i] - t))
        assert tiny_recipe.slot_of(t) == want, t
    flat = R.Recipe(preset("naive"), tiny_recipe.model, tiny_recipe.slots)
    assert flat.slot_of(12345) == 0  # not time-aware: every timestep uses the one slot


# ---- a recipe verifies itself ----------------------------------------------------------------------


def _layout(path):
    """(header length, safetensors header) of a safetensors file: where each tensor's bytes lie."""
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def _rewrite_header(path, change):
    """Edit the recipe header with ``change(header)`` and re-sign it as a careful forger would: the
    header digest recomputed, the tensors untouched."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["dgq_recipe"])
    change(header)
    if "digest" in header:
        header["digest"] = R.header_digest(header)
    save_file(tensors, str(path), metadata={"dgq_recipe": json.dumps(header)})


def test_one_flipped_exponent_bit_in_a_range_is_refused(tiny_recipe, tmp_path):
    """A group's max doubled by one exponent bit: still finite and above its min, so only the digest can
    tell (the image it gives is tens of dB away from the right one)."""
    import struct

    path = tiny_recipe.save(tmp_path / "r.safetensors")
    n, layout = _layout(path)
    data = bytearray(path.read_bytes())
    name = sorted(k for k in layout if k.endswith("/ranges"))[0]
    start = 8 + n + layout[name]["data_offsets"][0]
    ranges = tiny_recipe.acts[name.split("/")[1]].ranges[int(name.split("/")[2])]
    # the first group whose max is positive with the lowest exponent bit clear: flipping it doubles the max
    g = next(i for i, v in enumerate(ranges[:, 1].tolist()) if v > 0 and not struct.pack("<f", v)[2] & 0x80)
    data[start + 8 * g + 4 + 2] ^= 0x80  # float32 (g, 1), little endian: bit 23 is the exponent's lowest
    path.write_bytes(bytes(data))
    with pytest.raises(R.RecipeError, match=rf"tensor '{name}' does not match its digest"):
        R.load(path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h: h["acts"][sorted(h["acts"])[0]]["axis"].__setitem__(0, "row"), r"quantizer '.*' needs an axis"),
        (lambda h: h.__setitem__("weight", h.pop("weights")), r"header field 'weights' is missing"),
        (lambda h: h.pop("slots"), r"header field 'slots' is missing"),
        (lambda h: h["acts"][sorted(h["acts"])[0]]["k"].pop(), r"needs a group count >= 1 for each of its \d+"),
        (lambda h: h["acts"][sorted(h["acts"])[0]].__setitem__("layout", "conv3d"), r"has no valid layout"),
        (lambda h: h["weights"][sorted(h["weights"])[0]].__setitem__("granularity", "row"), "granularity 'row'"),
        (lambda h: h["config"].__setitem__("abits", 9), r"header field 'config' is not a valid QuantConfig"),
        (lambda h: h.__setitem__("slots", h["slots"][:-1]), r"needs an axis .* for each of its"),
    ],
    ids=["axis", "renamed-key", "missing-key", "slot-count", "layout", "granularity", "config", "slots"],
)
def test_a_resigned_header_is_checked_against_its_schema(tiny_recipe, tmp_path, change, message):
    path = tiny_recipe.save(tmp_path / "r.safetensors")
    _rewrite_header(path, change)
    with pytest.raises(R.RecipeError, match=message):
        R.load(path)


def test_an_edited_header_without_a_new_digest_is_refused(tiny_recipe, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = tiny_recipe.save(tmp_path / "r.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["dgq_recipe"])
    header["slots"] = header["slots"][::-1]  # every slot's ranges applied at another timestep
    save_file(load_file(str(path)), str(path), metadata={"dgq_recipe": json.dumps(header)})
    with pytest.raises(R.RecipeError, match="the header does not match its digest"):
        R.load(path)


def test_cli_inspect_refuses_an_unknown_axis_in_one_line(tiny_recipe, tmp_path, caplog):
    from app.cli import main

    path = tiny_recipe.save(tmp_path / "r.safetensors")
    _rewrite_header(path, lambda h: h["acts"][sorted(h["acts"])[0]]["axis"].__setitem__(0, "row"))
    assert main(["inspect", str(path)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "needs an axis" in errors[0] and "\n" not in errors[0]


def _same(a: R.Recipe, b: R.Recipe) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return a.header() == b.header() and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_random_byte_and_bit_flips_are_refused_or_harmless(tiny_recipe, tmp_path):
    """Each single-byte or single-bit change of a recipe file: a RecipeError or the same recipe. Half the
    edits land in the JSON header, half in the tensor bytes."""
    import random

    from tests.tolerances import FUZZ_CASES

    path = tiny_recipe.save(tmp_path / "r.safetensors")
    data = path.read_bytes()
    n, _ = _layout(path)
    rng = random.Random(0)
    outcomes = {"refused": 0, "identical": 0}
    for case in range(FUZZ_CASES):
        edited = bytearray(data)
        i = rng.randrange(8 + n) if case % 2 else rng.randrange(8 + n, len(data))
        if case % 4 < 2:
            edited[i] ^= 1 << rng.randrange(8)
        else:
            edited[i] = rng.choice([b for b in range(256) if b != edited[i]])
        path.write_bytes(bytes(edited))
        try:
            got = R.load(path)
        except R.RecipeError:
            outcomes["refused"] += 1
            continue
        assert _same(got, tiny_recipe), f"case {case}: byte {i} changed the recipe silently"
        outcomes["identical"] += 1
    assert sum(outcomes.values()) == FUZZ_CASES and outcomes["refused"] > FUZZ_CASES // 2, outcomes
