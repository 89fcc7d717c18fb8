"""SDXL through the runtime: both text towers in one graph (penultimate hidden states concatenated,
pooled projection), ``text_embeds`` and ``time_ids`` as diffusers computes them, zero negative
embeddings where the pipeline says so; float parity with ``StableDiffusionXLPipeline``, a quantized
SDXL-shaped export against its simulator, its TensorRT-RTX engine, and the refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dgq import zoo
from dgq.eval import metrics
from export.float_export import ExportError, export_float
from runtime import build
from runtime.pipeline import Text2ImagePipeline
from tests.runtime.runtime_fixtures import image_diff
from tests.tolerances import (
    RUNTIME_IMAGE_MAX_ABS_LEVELS,
    RUNTIME_IMAGE_MAX_DIFF_FRACTION,
    RUNTIME_QUANT_IMAGE_MIN_PSNR_DB,
)

pytestmark = pytest.mark.slow
PROMPTS = ["a red sneaker", "a photo of a dress"]
STEPS = 3


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    pipe = zoo.build_pipeline("tiny-xl", seed=0)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("xl") / "float"
    export_float(pipe, folder)
    return pipe, folder


@pytest.fixture(scope="module")
def xl_runtime(xl):
    pipe = Text2ImagePipeline.from_export(xl[1], backend="onnxruntime", threads=1)
    yield pipe
    pipe.deactivate()


def _diffusers(pipe, prompts, seeds, steps, guidance, negative=None, size=None):
    out = pipe(
        prompts,
        negative_prompt=None if negative is None else [negative] * len(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=size,
        width=size,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    )
    return (out.images * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    "guidance,negative,size",
    [(5.0, None, None), (1.0, None, None), (5.0, "blurry", None), (5.0, None, 48)],
    ids=["zero-negatives", "no-guidance", "negative-prompt", "48px"],
)
def test_float_export_matches_diffusers_sdxl_pipeline(xl, xl_runtime, guidance, negative, size):
    """Same prompts, seeds and settings as diffusers' StableDiffusionXLPipeline: the same images up
    to the two backends' float32 numerics (the bound of SD v1 exports). At 48 px the size conditioning
    (time_ids) is 48 px, not the model's default 32."""
    pipe, _ = xl
    want = _diffusers(pipe, PROMPTS, [4, 5], STEPS, guidance, negative, size)
    got = xl_runtime(PROMPTS, seed=[4, 5], steps=STEPS, guidance=guidance, negative_prompt=negative, size=size).images
    levels, fraction = image_diff(got, want)
    assert levels <= RUNTIME_IMAGE_MAX_ABS_LEVELS and fraction <= RUNTIME_IMAGE_MAX_DIFF_FRACTION


def test_text_encoder_graph_is_both_towers(xl, xl_runtime):
    """The one text-encoder graph gives encode_prompt's embeddings: penultimate hidden states of both
    towers concatenated, and the second tower's pooled projection."""
    pipe, _ = xl
    spec = xl_runtime.text_encoder.spec
    assert spec.input_names == ["input_ids", "input_ids_2"]
    assert spec.output_names == ["prompt_embeds", "pooled_prompt_embeds"]
    assert spec.metadata["force_zeros_for_empty_prompt"] is True
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    feed = {
        "input_ids": xl_runtime.tokenize(PROMPTS),
        "input_ids_2": xl_runtime.tokenize(PROMPTS, xl_runtime.tokenizer_2),
    }
    with xl_runtime.text_encoder:
        out = xl_runtime.text_encoder.infer(feed)
    # float32 graph vs eager float32: a few ulps of the embeddings' scale
    torch.testing.assert_close(torch.as_tensor(np.asarray(out["prompt_embeds"])), embeds, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.as_tensor(np.asarray(out["pooled_prompt_embeds"])), pooled, rtol=1e-4, atol=1e-4)


def test_sdxl_refusals(xl, xl_runtime, tmp_path):
    _, folder = xl
    # Without its second tokenizer the export cannot encode prompts.
    partial = shutil.copytree(folder, tmp_path / "no_tok2")
    shutil.rmtree(partial / "tokenizer_2")
    with pytest.raises(ValueError, match="needs its second tokenizer"):
        Text2ImagePipeline.from_export(partial, backend="onnxruntime", verify=False)
    # An SD v1 text encoder cannot feed an SDXL UNet.
    from tests.runtime.runtime_fixtures import export_tiny

    _, sd = export_tiny(tmp_path / "sd")
    sd_pipe = Text2ImagePipeline.from_export(sd, backend="onnxruntime")
    with pytest.raises(ValueError, match=r"needs one that takes \['input_ids', 'input_ids_2'\]"):
        Text2ImagePipeline(
            sd_pipe.text_encoder, xl_runtime.unet, xl_runtime.vae_decoder, sd_pipe.tokenizer, xl_runtime.scheduler
        )
    # Exporting SDXL's text encoder needs both towers.
    one_tower = zoo.build_pipeline("tiny-xl", components=("unet", "text_encoder", "vae"))
    with pytest.raises(ExportError, match="has no text_encoder_2"):
        export_float(one_tower, tmp_path / "one_tower")
    assert not (tmp_path / "one_tower").exists()


# ---- a quantized SDXL-shaped export -------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl_quant(xl, tmp_path_factory):
    from dgq.calibrate import calibrate
    from dgq.config import preset
    from export.qdq_export import export_onnx

    pipe, _ = xl
    cfg = preset("dgq", groups=4, profile="tensorrt", outlier_bits=16, weight_init="minmax")
    recipe = calibrate(pipe, PROMPTS, cfg, num_inference_steps=STEPS, progress=False)
    folder = tmp_path_factory.mktemp("xlq") / "tensorrt"
    export_onnx(pipe, folder, recipe, "tensorrt", compare_float=False, inspect_ort=False)
    return folder, recipe


def test_quantized_sdxl_export_matches_its_simulator(xl, xl_quant):
    """The tensorrt-target SDXL-shaped export through the runtime gives the simulator's images, at the
    calibrated steps and at other steps (uncalibrated timesteps take the nearest slot in both)."""
    from dgq.simulate import simulate

    pipe, _ = xl
    folder, recipe = xl_quant
    rt = Text2ImagePipeline.from_export(folder, backend="onnxruntime", threads=1)
    assert rt.xl and rt.takes_step_index
    qpipe = simulate(pipe, recipe)
    for steps in (STEPS, STEPS + 2):
        want = _diffusers(qpipe, PROMPTS, [4, 5], steps, 5.0)
        got = rt(PROMPTS, seed=[4, 5], steps=steps, guidance=5.0).images
        got, want = (torch.as_tensor(x, dtype=torch.float64) for x in (got, want))
        psnr = metrics.psnr(got, want, 255.0, per_sample=True)
        assert (psnr > RUNTIME_QUANT_IMAGE_MIN_PSNR_DB).all(), (steps, psnr)


@pytest.mark.trt  # skipped without tensorrt or tensorrt_rtx (tests/conftest.py)
def test_quantized_sdxl_unet_engine_builds(xl_quant, tmp_path):
    folder, _ = xl_quant
    results = build.build_engines(folder, components=["unet"], out_dir=tmp_path, workspace_gib=1)
    res = results["unet"]
    assert res.engine.stat().st_size == res.engine_bytes > 0
    meta = json.loads(res.metadata.read_text())
    assert meta["export"]["target"] == "tensorrt" and meta["iospec"]["name"] == "unet"
    report = json.loads(res.report.read_text())
    assert report["network"]["quantized"]["total"] > 0  # the Q/DQ layers reached TensorRT's network


def test_sdxl_export_refuses_a_recipe_of_another_model(xl, tmp_path, caplog):
    """A recipe calibrated on an SD v1 UNet, given to an SDXL export: one line naming both models,
    exit status 2, nothing written."""
    from app.cli import main

    recipe = tmp_path / "sd.safetensors"
    common = ["--steps", "2", "--num-prompts", "1", "--weight-init", "minmax"]
    assert main(["calibrate", "--model", "tiny", *common, "--out", str(recipe)]) == 0
    out = tmp_path / "xl_export"
    args = ["export", "--model", "tiny-xl", "--recipe", str(recipe), "--target", "tensorrt", "--out", str(out)]
    assert main(args) == 2
    assert "another model architecture" in caplog.text and not out.exists()
