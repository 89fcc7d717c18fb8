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


def test_unknown_timestep_is_refused(tiny_recipe):
    with pytest.raises(R.RecipeError, match="was not calibrated"):
        tiny_recipe.slot_of(tiny_recipe.slots[0] + 0.5)
    assert tiny_recipe.slot_of(tiny_recipe.slots[-1]) == len(tiny_recipe.slots) - 1
    flat = R.Recipe(preset("naive"), tiny_recipe.model, tiny_recipe.slots)
    assert flat.slot_of(12345) == 0  # not time-aware: every timestep uses the one slot
