import subprocess
import sys

import numpy as np
import pytest

from dgq.zoo.builders import TINY_TEXT, TINY_UNET, TINY_VAE
from dgq.zoo.configs import SDXL_UNET
from export.iospec import (
    Dim,
    FeedError,
    NetworkSpec,
    TensorSpec,
    specs_from_json,
    specs_to_json,
    text_encoder_spec,
    unet_spec,
    vae_decoder_spec,
)

TOKENS = 77
VAE_CFG = dict(TINY_VAE, scaling_factor=0.18215)


@pytest.fixture
def unet():
    return unet_spec(TINY_UNET, TOKENS)


def good_feed(spec, **dims):
    return {n: np.zeros(s, dtype=spec.input(n).dtype) for n, s in spec.example_shapes(**dims).items()}


def test_unet_contract(unet):
    assert unet.input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.output_names == ["noise_pred"]
    assert unet.input("timestep").shape == ()
    # 3 resolution levels -> latent sizes are multiples of 4, from sample_size/2 to sample_size*2
    assert unet.dims["latent_height"] == Dim(8, 16, 32, 4)
    assert unet.dims["batch"] == Dim(1, 2, 8)
    assert unet.dynamic_axes() == {
        "sample": {0: "batch", 2: "latent_height", 3: "latent_width"},
        "encoder_hidden_states": {0: "batch"},
        "noise_pred": {0: "batch", 2: "latent_height", 3: "latent_width"},
    }


def test_shape_profile(unet):
    profile = unet.shape_profile()
    assert profile["sample"] == ((1, 4, 8, 8), (2, 4, 16, 16), (8, 4, 32, 32))
    assert profile["timestep"] == ((), (), ())
    assert profile["encoder_hidden_states"] == ((1, 77, 32), (2, 77, 32), (8, 77, 32))


def test_static_size_pins_latent():
    spec = unet_spec(TINY_UNET, TOKENS, static_size=(12, 20))
    assert spec.input("sample").shape == ("batch", 4, 12, 20)
    assert set(spec.dims) == {"batch"}
    with pytest.raises(ValueError, match="multiple of 4"):
        unet_spec(TINY_UNET, TOKENS, static_size=10)


def test_vae_output_shape_follows_latent():
    spec = vae_decoder_spec(VAE_CFG)
    assert spec.input("latent").shape == ("batch", 4, "latent_height", "latent_width")
    dims = spec.check_feed(good_feed(spec, batch=2, latent_height=8, latent_width=13))
    assert spec.output_shapes(dims) == {"images": (2, 3, 16, 26)}
    assert spec.metadata["scaling_factor"] == pytest.approx(0.18215)
    assert spec.metadata["latent_scaling"] == "in graph"
    assert spec.metadata["vae_scale_factor"] == 2


def test_text_encoder_contract():
    spec = text_encoder_spec(TINY_TEXT, TOKENS)
    assert spec.input("input_ids") == TensorSpec("input_ids", "int32", ("batch", 77))
    assert spec.outputs[0].shape == ("batch", 77, 32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        text_encoder_spec(TINY_TEXT, 78)


def test_sdxl_unet_has_added_inputs():
    spec = unet_spec(SDXL_UNET, TOKENS)
    assert spec.input_names[3:] == ["text_embeds", "time_ids"]
    assert spec.input("text_embeds").shape == ("batch", 1280)
    assert spec.input("time_ids").shape == ("batch", 6)
    fp16 = unet_spec(SDXL_UNET, TOKENS, fp16=True)
    assert [t.dtype for t in fp16.inputs] == ["float16", "float32", "float16", "float16", "float32"]


def test_unsupported_unet_config_refused():
    with pytest.raises(ValueError, match="addition_embed_type='image'"):
        unet_spec(dict(TINY_UNET, addition_embed_type="image"), TOKENS)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        unet_spec(dict(TINY_UNET, time_cond_proj_dim=256), TOKENS)


def test_json_round_trip(unet):
    specs = {
        "unet": unet,
        "text_encoder": text_encoder_spec(TINY_TEXT, TOKENS, fp16=True),
        "vae_decoder": vae_decoder_spec(VAE_CFG, static_size=16),
    }
    text = specs_to_json(specs)
    assert specs_from_json(text) == specs
    assert specs_to_json(specs_from_json(text)) == text
    assert NetworkSpec.from_json(unet.to_json()) == unet


def test_json_refuses_other_versions(unet):
    text = specs_to_json({"unet": unet}).replace('"version": 1', '"version": 99')
    with pytest.raises(ValueError, match="version 99"):
        specs_from_json(text)


def test_check_feed_accepts_and_binds(unet):
    dims = unet.check_feed(good_feed(unet, batch=3, latent_height=8, latent_width=28))
    assert dims == {"batch": 3, "latent_height": 8, "latent_width": 28}
    assert unet.output_shapes(dims) == {"noise_pred": (3, 4, 8, 28)}


@pytest.mark.parametrize(
    "tensor, value, message",
    [
        ("sample", np.zeros((2, 4, 16, 16), np.float64), "'sample' has dtype float64, the graph expects float32"),
        (
            "sample",
            np.zeros((2, 4, 64, 16), np.float32),
            r"'sample' axis 2 \(latent_height\) is 64, outside the profile: must be in \[8, 32\]",
        ),
        ("sample", np.zeros((2, 4, 18, 16), np.float32), "and a multiple of 4"),
        ("sample", np.zeros((9, 4, 16, 16), np.float32), r"axis 0 \(batch\) is 9"),
        ("sample", np.zeros((2, 4, 16), np.float32), "'sample' has shape .* expected rank 4"),
        ("timestep", np.zeros((2,), np.float32), "'timestep' has shape"),
        (
            "encoder_hidden_states",
            np.zeros((2, 76, 32), np.float32),
            "'encoder_hidden_states' axis 1 is 76, the graph fixes it at 77",
        ),
        (
            "encoder_hidden_states",
            np.zeros((3, 77, 32), np.float32),
            "dim batch is 2 in 'sample' but 3 in 'encoder_hidden_states'",
        ),
    ],
)
def test_check_feed_names_tensor_and_dim(unet, tensor, value, message):
    feed = good_feed(unet)
    feed[tensor] = value
    with pytest.raises(FeedError, match=message):
        unet.check_feed(feed)


def test_check_feed_missing_and_extra(unet):
    feed = good_feed(unet)
    del feed["timestep"]
    feed["step_index"] = np.zeros((), np.int64)
    with pytest.raises(FeedError, match=r"missing \['timestep'\] and has unexpected \['step_index'\]"):
        unet.check_feed(feed)


def test_check_feed_takes_torch_tensors(unet):
    torch = pytest.importorskip("torch")
    feed = {n: torch.zeros(s) for n, s in unet.example_shapes().items()}
    assert unet.check_feed(feed)["batch"] == 2
    feed["sample"] = feed["sample"].half()
    with pytest.raises(FeedError, match="'sample' has dtype float16"):
        unet.check_feed(feed)


def test_with_inputs_leaves_room_for_qdq_inputs(unet):
    extended = unet.with_inputs(TensorSpec("step_index", "int64", ()), profile="tensorrt")
    assert extended.input_names[-1] == "step_index"
    assert extended.metadata["profile"] == "tensorrt"
    assert unet.input_names == ["sample", "timestep", "encoder_hidden_states"]  # original untouched
    assert NetworkSpec.from_json(extended.to_json()) == extended


def test_bad_specs_refused():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Dim(4, 2, 8)
    with pytest.raises(ValueError, match="multiples of 4"):
        Dim(4, 6, 8, 4)
    with pytest.raises(ValueError, match="do not match declared dims"):
        NetworkSpec("n", [TensorSpec("x", "float32", ("batch",))], [], {})
    with pytest.raises(ValueError, match="no input defines"):
        NetworkSpec("n", [TensorSpec("x", "float32", (1,))], [TensorSpec("y", "float32", ("h*2",))], {})


def test_iospec_imports_without_torch():
    # The Jetson runtime reads iospec.json with numpy alone.
    code = (
        "import sys, export, export.iospec; "
        "bad = {'torch', 'diffusers', 'onnx'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
