"""--device and --dtype (dgq.device), and calibration's errors that name where it failed."""

import argparse
import copy

import pytest
import torch

from dgq import device as dev
from dgq.calibrate import CalibrationError, build_recipe, collect_statistics
from dgq.config import preset
from dgq.device import DeviceError
from dgq.fingerprint import model_identity, weights_hash
from dgq.recipe import RecipeError

from .conftest import CAL_PROMPTS


@pytest.mark.parametrize("text,parsed", [("cpu", "cpu"), ("cuda", "cuda"), ("CUDA:1", "cuda:1")])
def test_device_spec_accepts(text, parsed):
    assert dev.device_spec(text) == parsed


@pytest.mark.parametrize("text", ["npu", "cpu:0", "cuda:", "cuda:x", "mps"])
def test_device_spec_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="use cpu, cuda or cuda:N"):
        dev.device_spec(text)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(DeviceError, match=r"sees no CUDA device.*use --device cpu"):
        dev.resolve_device("cuda")
    assert dev.resolve_device(None) == torch.device("cpu")  # the default falls back


def _fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_gpu_index_is_checked_and_processes_take_their_local_gpu(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dev.resolve_device(None) == torch.device("cuda", 0)
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"has 2 CUDA device\(s\)"):
        dev.resolve_device("cuda:2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dev.resolve_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")  # as accelerate picks it: modulo the visible GPUs
    assert dev.resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="every process on one GPU"):
        dev.resolve_device("cuda:0")


def test_weights_hash_of_a_cast_is_the_hash_of_the_cast_model(tiny_pipe):
    cast = copy.deepcopy(tiny_pipe.unet).to(torch.bfloat16)
    assert weights_hash(tiny_pipe.unet, torch.bfloat16) == weights_hash(cast)
    assert weights_hash(tiny_pipe.unet) != weights_hash(cast)
    assert "dtype" not in model_identity(tiny_pipe.unet)
    assert model_identity(cast)["dtype"] == "bfloat16"


def test_bfloat16_calibration_keeps_float32_statistics_and_fits_the_float32_model(tiny_pipe):
    pipe = dev.place(copy.deepcopy(tiny_pipe), torch.device("cpu"), torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    stats = collect_statistics(pipe, CAL_PROMPTS[:1], num_inference_steps=2, progress=False)
    _, per_slot = next(iter(stats.layers.values()))
    assert all(s.channel_amin.dtype == torch.float32 for s in per_slot.values())
    assert stats.meta["dtype"] == "bfloat16" and stats.meta["device"] == "cpu"
    recipe = build_recipe(stats, pipe.unet, preset("dgq", groups=4, weight_init="minmax"), progress=False)
    assert all(w.scale.dtype == torch.float32 for w in recipe.weights.values())
    recipe.check_model(pipe.unet)
    recipe.check_model(tiny_pipe.unet)  # the float32 model whose cast was calibrated
    other = copy.deepcopy(tiny_pipe.unet)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(RecipeError, match="other weights"):
        recipe.check_model(other)
    half = copy.deepcopy(tiny_pipe.unet).to(torch.float16)
    with pytest.raises(
        RecipeError, match=r"calibrated on the bfloat16 model and this UNet is float16.*--dtype bfloat16"
    ):
        recipe.check_model(half)


def test_non_finite_activation_names_the_site_and_step(tiny_pipe):
    name = "down_blocks.0.resnets.0.conv1"
    calls = {"n": 0}

    def poison(module, args):
        calls["n"] += 1
        if calls["n"] == 3:  # 2nd step (one call per step: guidance doubles the batch, not the calls)
            return (torch.full_like(args[0], float("nan")),)
        return None

    handle = tiny_pipe.unet.get_submodule(name).register_forward_pre_hook(poison)
    try:
        with pytest.raises(CalibrationError) as err:
            collect_statistics(tiny_pipe, CAL_PROMPTS[:1], num_inference_steps=3, progress=False)
    finally:
        handle.remove()
    timesteps = tiny_pipe.scheduler.timesteps  # the run above set them
    msg = str(err.value)
    assert msg.startswith(f"{name}: NaN or Inf in its input at timestep {float(timesteps[1]):g} (step 2 of 3)")
    assert not tiny_pipe.unet._forward_pre_hooks  # the pipeline is restored


def test_out_of_memory_names_the_site_and_what_to_change(tiny_pipe):
    name = "mid_block.attentions.0.proj_in"

    def oom(module, args, out):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = tiny_pipe.unet.get_submodule(name).register_forward_hook(oom)
    try:
        with pytest.raises(
            CalibrationError, match=f"out of memory on cpu after entering {name} .*--batch-size.*--dtype"
        ):
            collect_statistics(tiny_pipe, CAL_PROMPTS[:1], num_inference_steps=2, progress=False)
    finally:
        handle.remove()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_cuda_without_cuda_writes_nothing(tmp_path, capsys):
    from app.cli import main

    out = tmp_path / "r.safetensors"
    assert main(["calibrate", "--model", "tiny", "--device", "cuda", "--out", str(out)]) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_float32_recipe_on_a_cast_model_names_the_dtype_it_needs(tiny_pipe, tiny_recipe):
    half = copy.deepcopy(tiny_pipe.unet).to(torch.bfloat16)
    with pytest.raises(RecipeError, match=r"calibrated on the float32 model and this UNet is bfloat16"):
        tiny_recipe.check_model(half)
