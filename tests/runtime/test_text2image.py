"""Text2ImagePipeline: parity with diffusers' pipeline, step_index feeding, truncation, refusals, CLI."""

from __future__ import annotations

import json
import logging
import shutil

import diffusers
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from export.iospec import FeedError, TensorSpec, read_specs
from export.manifest import ManifestError
from runtime.pipeline import Text2ImagePipeline, load_assets
from runtime.runners import BackendUnavailable, OnnxRuntimeRunner, TorchRunner
from tests.runtime.runtime_fixtures import (
    STEP_SCALE,
    export_tiny,
    image_diff,
    with_step_index,
)
from tests.tolerances import (
    RUNTIME_IMAGE_MAX_ABS_LEVELS,
    RUNTIME_IMAGE_MAX_DIFF_FRACTION,
    RUNTIME_TRT_IMAGE_MAX_ABS_LEVELS,
    RUNTIME_TRT_IMAGE_MAX_DIFF_FRACTION,
)

PROMPTS = ["a photo of a dress", "a red sneaker"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("t2i") / "onnx")


@pytest.fixture(scope="module")
def runtime_pipe(tiny):
    pipe = Text2ImagePipeline.from_export(tiny[1], backend="onnxruntime", threads=1)
    yield pipe
    pipe.deactivate()


def _reference(pipe, prompts, generator, steps, guidance):
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="np")
    return (out.images * 255).round().astype(np.uint8)


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_matches_diffusers_pipeline(tiny, runtime_pipe, guidance):
    torch_pipe, _ = tiny
    steps = 4
    # One seed: one CPU generator for the batch, as diffusers with one generator.
    want = _reference(torch_pipe, PROMPTS, torch.Generator().manual_seed(7), steps, guidance)
    out = runtime_pipe(PROMPTS, seed=7, steps=steps, guidance=guidance)
    assert out.images.dtype == np.uint8 and out.images.shape == want.shape == (2, 32, 32, 3)
    levels, fraction = image_diff(out.images, want)
    assert levels <= RUNTIME_IMAGE_MAX_ABS_LEVELS and fraction <= RUNTIME_IMAGE_MAX_DIFF_FRACTION
    # A seed per prompt: diffusers with a list of generators.
    want = _reference(torch_pipe, PROMPTS, [torch.Generator().manual_seed(s) for s in (3, 4)], steps, guidance)
    levels, fraction = image_diff(runtime_pipe(PROMPTS, seed=[3, 4], steps=steps, guidance=guidance).images, want)
    assert levels <= RUNTIME_IMAGE_MAX_ABS_LEVELS and fraction <= RUNTIME_IMAGE_MAX_DIFF_FRACTION
    # Timings: one UNet entry per scheduler timestep (PNDM runs steps + 1 calls), all positive.
    timings = out.timings
    assert len(timings.unet_step_s) == len(runtime_pipe.scheduler.timesteps) == steps + 1
    assert min(timings.unet_step_s) > 0 and timings.text_encoder_s > 0 and timings.vae_decoder_s > 0
    assert timings.total_s >= timings.text_encoder_s + sum(timings.unet_step_s) + timings.vae_decoder_s
    assert set(timings.to_dict()) == {
        "text_encoder_s",
        "unet_step_s",
        "unet_median_s",
        "unet_total_s",
        "vae_decoder_s",
        "total_s",
    }
    assert out.backend == runtime_pipe.backend == "onnxruntime (CPUExecutionProvider, optimization all)"
    assert [im.size for im in out.pil()] == [(32, 32), (32, 32)]


def test_fused_attention_export_generates_the_diffusers_images(tiny, tmp_path):
    """A float export with fused attention (ONNX Runtime's MultiHeadAttention) runs in the runtime
    and makes the diffusers pipeline's images within the same bounds as the plain export."""
    from export.float_export import export_float
    from export.manifest import read_manifest

    torch_pipe, _ = tiny
    folder = tmp_path / "fused"
    export_float(torch_pipe, folder, fused_attention=True)
    assert read_manifest(folder, verify=True)["fused_attention"] is True
    pipe = Text2ImagePipeline.from_export(folder, backend="onnxruntime", threads=1)
    try:
        want = _reference(torch_pipe, PROMPTS, torch.Generator().manual_seed(7), 4, 5.0)
        levels, fraction = image_diff(pipe(PROMPTS, seed=7, steps=4, guidance=5.0).images, want)
    finally:
        pipe.deactivate()
    assert levels <= RUNTIME_IMAGE_MAX_ABS_LEVELS and fraction <= RUNTIME_IMAGE_MAX_DIFF_FRACTION


def test_same_seed_same_image_other_seed_differs(runtime_pipe):
    a = runtime_pipe(PROMPTS[:1], seed=1, steps=2).images
    b = runtime_pipe(PROMPTS[:1], seed=1, steps=2).images
    c = runtime_pipe(PROMPTS[:1], seed=2, steps=2).images
    assert np.array_equal(a, b) and image_diff(a, c)[0] > 0


def test_prompt_truncation_warns_with_dropped_count(runtime_pipe, caplog):
    tokenizer = runtime_pipe.tokenizer
    long_prompt = " ".join(["dress"] * 100)
    dropped = len(tokenizer(long_prompt).input_ids) - tokenizer.model_max_length
    assert dropped > 0
    with caplog.at_level(logging.WARNING, logger="runtime.pipeline"):
        ids = runtime_pipe.tokenize([long_prompt, "short"])
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    assert ids[0, -1] == tokenizer.eos_token_id  # truncated like diffusers: the end token is kept
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "runtime.pipeline"]
    assert len(warnings) == 1 and f"{dropped} token(s) dropped" in warnings[0]


def _recording_unet(spec, calls):
    def unet(sample, timestep, encoder_hidden_states, step_index):
        calls.append((float(timestep), int(step_index)))
        return torch.zeros_like(sample)

    return TorchRunner(unet, spec)


def test_step_index_fed_from_manifest_slots(tiny, runtime_pipe):
    _, folder = tiny
    specs = read_specs(folder)
    unet_spec = specs["unet"].with_inputs(TensorSpec("step_index", "int64", ()))
    tokenizer, scheduler = load_assets(folder)
    scheduler.set_timesteps(3)
    timesteps = [float(t) for t in scheduler.timesteps]
    # Slots are the distinct timesteps in order of first appearance (PNDM repeats one), as calibration numbers them.
    slots = list(dict.fromkeys(timesteps))
    assert len(slots) < len(timesteps)
    calls = []
    pipe = Text2ImagePipeline(
        runtime_pipe.text_encoder,
        _recording_unet(unet_spec, calls),
        runtime_pipe.vae_decoder,
        tokenizer,
        scheduler,
        manifest={"slots": slots},
    )
    pipe(PROMPTS[:1], seed=0, steps=3)
    assert calls == [(t, slots.index(t)) for t in timesteps]
    # Other step counts and samplers run: a timestep without a slot is fed the nearest calibrated one's.
    for other, steps in ((scheduler, 5), (EulerDiscreteScheduler.from_config(scheduler.config), 4)):
        calls.clear()
        pipe.scheduler = other
        pipe(PROMPTS[:1], seed=0, steps=steps)
        other.set_timesteps(steps)
        want = [min(range(len(slots)), key=lambda i, t=float(t): abs(slots[i] - t)) for t in other.timesteps]
        assert calls == [(float(t), i) for t, i in zip(other.timesteps, want, strict=True)]
        assert len(set(want)) > 1
    # A UNet with step_index needs slots, and slots need a UNet with step_index.
    with pytest.raises(ValueError, match="no manifest with timestep slots"):
        Text2ImagePipeline(
            runtime_pipe.text_encoder, _recording_unet(unet_spec, []), runtime_pipe.vae_decoder, tokenizer, scheduler
        )
    with pytest.raises(ValueError, match="has no step_index input"):
        Text2ImagePipeline(*runtime_pipe.runners, tokenizer, scheduler, manifest={"slots": slots})


def test_step_index_export_folder_end_to_end(tiny, tmp_path, caplog):
    _, folder = tiny
    _, scheduler = load_assets(folder)
    scheduler.set_timesteps(3)
    quantized = with_step_index(folder, tmp_path / "q", list(dict.fromkeys(float(t) for t in scheduler.timesteps)))
    pipe = Text2ImagePipeline.from_export(quantized, backend="onnxruntime", threads=1)
    assert pipe.takes_step_index
    # The synthetic UNet's prediction is step_index * STEP_SCALE, so its feed is visible in the output.
    feed = {
        "sample": np.zeros((1, 4, 16, 16), np.float32),
        "timestep": np.array(0.0, np.float32),
        "encoder_hidden_states": np.zeros((1, 77, 32), np.float32),
        "step_index": np.array(2, np.int64),
    }
    with pipe.unet:
        assert np.allclose(pipe.unet.infer(feed)["noise_pred"], 2 * STEP_SCALE)
    out = pipe(PROMPTS[:1], seed=0, steps=3, guidance=1.0)
    assert out.images.shape == (1, 32, 32, 3) and len(out.timings.unet_step_s) == len(scheduler.timesteps)
    # 4 steps: uncalibrated timesteps, run with the nearest slots' parameters (no warning: in range).
    with caplog.at_level(logging.WARNING, logger="common.timesteps"):
        out = pipe(PROMPTS[:1], seed=0, steps=4, guidance=1.0)
    assert out.images.shape == (1, 32, 32, 3) and not caplog.records


def test_schedule_far_outside_the_calibrated_range_warns_once(tiny, tmp_path, caplog):
    _, folder = tiny
    low = with_step_index(folder, tmp_path / "low", [150.0, 100.0, 50.0])  # only t < 200 calibrated
    pipe = Text2ImagePipeline.from_export(low, backend="onnxruntime", threads=1)
    with caplog.at_level(logging.WARNING, logger="common.timesteps"):
        pipe(PROMPTS[:1], seed=0, steps=3, guidance=1.0)
        pipe(PROMPTS[:1], seed=0, steps=3, guidance=1.0)
    warnings = [r.message for r in caplog.records]
    assert len(warnings) == 1 and "is outside the range this export was calibrated for (50..150" in warnings[0]


def test_edited_folder_refused(tiny, tmp_path):
    _, folder = tiny
    edited = shutil.copytree(folder, tmp_path / "edited")
    with open(edited / "vae_decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"vae_decoder\.onnx does not match its manifest hash"):
        Text2ImagePipeline.from_export(edited)
    (edited / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        Text2ImagePipeline.from_export(edited)
    with pytest.raises(ManifestError, match="does not exist"):
        Text2ImagePipeline.from_export(tmp_path / "missing")


def test_an_edited_manifest_is_refused(tiny, tmp_path):
    _, folder = tiny
    slots = [999.0, 500.0, 1.0]
    edited = with_step_index(folder, tmp_path / "slots", slots)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["slots"] = slots[::-1]  # every step would read another step's parameters
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="does not match its digest"):
        Text2ImagePipeline.from_export(edited)
    with pytest.raises(ManifestError, match="does not match its digest"):
        Text2ImagePipeline.from_export(edited, verify=False)  # the files go unhashed, the manifest does not
    from export.manifest import canonical_digest

    manifest["digest"] = canonical_digest(manifest)  # re-signed: the IO spec still disagrees
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="slots differ from those the UNet graph was exported with"):
        Text2ImagePipeline.from_export(edited)


def test_backend_choice_and_missing_engines(tiny, tmp_path, caplog):
    _, folder = tiny
    with pytest.raises(
        FileNotFoundError, match=r"no engine file\(s\) \['text_encoder.engine', 'unet.engine', 'vae_decoder.engine'\]"
    ):
        Text2ImagePipeline.from_export(folder, backend="tensorrt")
    with pytest.raises(ValueError, match="backend must be one of"):
        Text2ImagePipeline.from_export(folder, backend="openvino")
    with caplog.at_level(logging.INFO, logger="runtime.pipeline"):
        pipe = Text2ImagePipeline.from_export(folder)
    assert pipe.backend.startswith("onnxruntime") and pipe.backend_reason == "no TensorRT engines"
    assert any("backend: onnxruntime" in r.getMessage() for r in caplog.records)
    assert all(isinstance(r, OnnxRuntimeRunner) for r in pipe.runners)
    # Engines in a separate folder: one missing, so auto stays on ONNX Runtime and tensorrt refuses.
    engines = tmp_path / "engines"
    engines.mkdir()
    for c in ("text_encoder", "unet"):
        (engines / f"{c}.engine").write_bytes(b"plan")
    pipe = Text2ImagePipeline.from_export(folder, engine_dir=engines)
    assert pipe.backend.startswith("onnxruntime") and "missing ['vae_decoder.engine']" in pipe.backend_reason
    with pytest.raises(FileNotFoundError, match=r"\['vae_decoder.engine'\]"):
        Text2ImagePipeline.from_export(folder, backend="tensorrt", engine_dir=engines)
    if not torch.cuda.is_available():
        (engines / "vae_decoder.engine").write_bytes(b"plan")
        pipe = Text2ImagePipeline.from_export(folder, engine_dir=engines)
        assert pipe.backend.startswith("onnxruntime") and "no CUDA GPU or TensorRT module" in pipe.backend_reason
        with pytest.raises(BackendUnavailable):
            Text2ImagePipeline.from_export(folder, backend="tensorrt", engine_dir=engines)


def test_outside_profile_refused_before_running(tiny):
    pipe = Text2ImagePipeline.from_export(tiny[1], backend="onnxruntime", threads=1)
    with pytest.raises(FeedError, match=r"latent_height\) is 64, outside the profile"):
        pipe(PROMPTS[:1], size=128)
    with pytest.raises(FeedError, match=r"batch\) is 10, outside the profile"):
        pipe(["x"] * 5, seed=0)
    with pytest.raises(ValueError, match="multiple of the VAE scale factor 2"):
        pipe(PROMPTS[:1], size=33)
    assert not any(r.is_active for r in pipe.runners)  # nothing was loaded for a refused request
    assert pipe.max_images_per_call == 4


def test_cli_generate_onnx(tiny, tmp_path, capsys):
    from app.cli import main

    torch_pipe, folder = tiny
    out = tmp_path / "images"
    assert (
        main(
            [
                "generate",
                "--onnx",
                str(folder),
                "--steps",
                "2",
                "--num-images",
                "2",
                "--image-seed",
                "5",
                "--prompt",
                PROMPTS[0],
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "backend: onnxruntime (CPUExecutionProvider" in printed and "ms/step median" in printed
    assert sorted(p.name for p in out.iterdir()) == ["image_000.png", "image_001.png", "timings.json"]
    timings = json.loads((out / "timings.json").read_text())
    assert timings["backend"].startswith("onnxruntime") and timings["steps"] == 2
    assert [c["images"] for c in timings["calls"]] == [2] and len(timings["calls"][0]["unet_step_s"]) == 3
    # Seeded per image like the PyTorch path of `dgq generate`.
    from PIL import Image

    want = _reference(torch_pipe, PROMPTS[:1], torch.Generator().manual_seed(6), 2, 5.0)[0]
    levels, fraction = image_diff(np.asarray(Image.open(out / "image_001.png")), want)
    assert levels <= RUNTIME_IMAGE_MAX_ABS_LEVELS and fraction <= RUNTIME_IMAGE_MAX_DIFF_FRACTION


def test_cli_generate_onnx_refusals_exit_2(tiny, tmp_path):
    from app.cli import main

    _, folder = tiny
    edited = shutil.copytree(folder, tmp_path / "edited")
    with open(edited / "tokenizer" / "tokenizer_config.json", "a") as f:
        f.write(" ")
    out = str(tmp_path / "out")
    for args in (
        ["--onnx", str(tmp_path / "missing")],
        ["--onnx", str(edited)],
        ["--onnx", str(folder), "--backend", "tensorrt"],
        ["--onnx", str(folder), "--size", "128"],
        ["--onnx", str(folder), "--model", "tiny"],
        ["--onnx", str(folder), "--scheduler", "FlowMatchEulerDiscreteScheduler"],  # not for this model
        ["--model", "tiny", "--scheduler", "FlowMatchEulerDiscreteScheduler"],
    ):
        assert main(["generate", *args, "--steps", "1", "--out", out]) == 2, args
    for args in (["--scheduler", "eulr"], ["--steps", "0"]):  # refused by the parser, before anything loads
        with pytest.raises(SystemExit) as stop:
            main(["generate", "--onnx", str(folder), *args, "--out", out])
        assert stop.value.code == 2, args
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,cls", [("euler", "EulerDiscreteScheduler"), ("dpm++", "DPMSolverMultistepScheduler")])
def test_cli_generate_with_another_scheduler_matches_pytorch(tiny, tmp_path, name, cls):
    """``--scheduler`` samples with another diffusers scheduler built from the model's config, in the
    runtime and in the PyTorch pipeline alike: the same image as diffusers with that scheduler."""
    from PIL import Image

    from app.cli import main

    torch_pipe, folder = tiny
    common = ["--scheduler", name, "--steps", "3", "--image-seed", "4", "--prompt", PROMPTS[1]]
    assert main(["generate", "--onnx", str(folder), *common, "--out", str(tmp_path / "rt")]) == 0
    assert json.loads((tmp_path / "rt" / "timings.json").read_text())["scheduler"] == cls
    # From the export's scheduler config, as a pipeline loaded from a saved folder would build it.
    sampler = getattr(diffusers, cls).from_config(load_assets(folder)[1].config)
    reference = type(torch_pipe)(**{**torch_pipe.components, "scheduler": sampler})
    reference.set_progress_bar_config(disable=True)
    want = _reference(reference, PROMPTS[1:], torch.Generator().manual_seed(4), 3, 5.0)[0]
    levels, fraction = image_diff(np.asarray(Image.open(tmp_path / "rt" / "image_000.png")), want)
    assert levels <= RUNTIME_IMAGE_MAX_ABS_LEVELS and fraction <= RUNTIME_IMAGE_MAX_DIFF_FRACTION
    plain = _reference(torch_pipe, PROMPTS[1:], torch.Generator().manual_seed(4), 3, 5.0)[0]
    assert image_diff(want, plain)[0] > RUNTIME_IMAGE_MAX_ABS_LEVELS  # the sampler really changed


def test_fashion_matches_diffusers_and_truncates_at_16_tokens(tmp_path, caplog):
    # The trained default model: DDIM scheduler, BERT tokenizer with 16 tokens, 64x64 images.
    from dgq import zoo
    from export.float_export import export_float

    torch_pipe = zoo.load_pipeline("fashion")
    torch_pipe.set_progress_bar_config(disable=True)
    export_float(torch_pipe, tmp_path / "onnx")
    pipe = Text2ImagePipeline.from_export(tmp_path / "onnx", backend="onnxruntime", threads=1)
    prompts = [
        "a photo of a dress",
        "a photo of an ankle boot with a long heel and a buckle on the side, black leather",
    ]
    want = _reference(torch_pipe, prompts, torch.Generator().manual_seed(0), 4, 5.0)
    with caplog.at_level(logging.WARNING, logger="runtime.pipeline"), pipe:
        out = pipe(prompts, seed=0, steps=4, guidance=5.0)
    assert out.images.shape == want.shape == (2, 64, 64, 3)
    levels, fraction = image_diff(out.images, want)
    assert levels <= RUNTIME_IMAGE_MAX_ABS_LEVELS and fraction <= RUNTIME_IMAGE_MAX_DIFF_FRACTION
    dropped = len(pipe.tokenizer(prompts[1]).input_ids) - 16
    messages = [r.getMessage() for r in caplog.records if r.name == "runtime.pipeline" and r.levelno == logging.WARNING]
    assert dropped > 0 and len(messages) == 1 and f"{dropped} token(s) dropped" in messages[0]


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.slow
def test_tensorrt_pipeline_matches_onnxruntime(tiny, runtime_pipe, tmp_path):
    from runtime.build import build_engines

    _, folder = tiny
    build_engines(folder, out_dir=tmp_path, tf32=False)  # float32 kernels, as the tolerances assume
    pipe = Text2ImagePipeline.from_export(folder, backend="auto", engine_dir=tmp_path, cuda_graph=True)
    assert pipe.backend.startswith("tensorrt")
    with pipe:
        got = pipe(PROMPTS, seed=[3, 4], steps=4, guidance=5.0)
    want = runtime_pipe(PROMPTS, seed=[3, 4], steps=4, guidance=5.0)
    levels, fraction = image_diff(got.images, want.images)
    assert levels <= RUNTIME_TRT_IMAGE_MAX_ABS_LEVELS and fraction <= RUNTIME_TRT_IMAGE_MAX_DIFF_FRACTION
    assert len(got.timings.unet_step_s) == 5 and got.timings.unet_median_s > 0
