"""Runners: one protocol over ONNX Runtime, PyTorch and TensorRT; feed checks; clear refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from export.iospec import FeedError, read_specs
from runtime.runners import (
    BackendUnavailable,
    OnnxRuntimeRunner,
    RunnerError,
    TensorRTRunner,
    TorchRunner,
    to_numpy,
)
from tests.runtime.runtime_fixtures import export_tiny
from tests.tolerances import FLOAT_ONNX_MAX_REL_ERR, TRT_FLOAT_MAX_REL_ERR


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipe, folder = export_tiny(tmp_path_factory.mktemp("runners") / "onnx")
    return pipe, folder, read_specs(folder)


def _unet_feed(spec, batch=2, seed=0):
    from export.float_export import example_inputs

    return example_inputs(spec, seed=seed, batch=batch)


def test_onnxruntime_matches_torch_runner(tiny):
    from export.float_export import UNetForExport

    pipe, folder, specs = tiny
    feed = _unet_feed(specs["unet"])
    with TorchRunner(UNetForExport(pipe.unet), specs["unet"]) as ref:
        want = to_numpy(ref.infer(feed)["noise_pred"])
    for optimization in ("off", "all"):
        with OnnxRuntimeRunner(folder / "unet.onnx", specs["unet"], optimization=optimization, threads=1) as runner:
            assert runner.active_providers[0] in ("CPUExecutionProvider", "CUDAExecutionProvider")
            got = runner.infer({k: v.numpy() for k, v in feed.items()})["noise_pred"]
        assert isinstance(got, np.ndarray) and got.shape == want.shape == (2, 4, 16, 16)
        assert np.abs(got - want).max() / np.abs(want).max() <= FLOAT_ONNX_MAX_REL_ERR


def test_protocol_state(tiny):
    _, folder, specs = tiny
    runner = OnnxRuntimeRunner(folder / "text_encoder.onnx", specs["text_encoder"], threads=1)
    feed = {"input_ids": np.zeros((1, 77), np.int32)}
    with pytest.raises(RunnerError, match="not active"):
        runner.infer(feed)
    with runner as active:
        assert active is runner and runner.is_active
        assert runner.infer(feed)["last_hidden_state"].shape == (1, 77, 32)
        runner.activate()  # idempotent
    assert not runner.is_active and runner.session is None
    assert runner.name == "onnxruntime(text_encoder)" and runner.spec is specs["text_encoder"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.update(sample=f["sample"].half()), "'sample' has dtype float16, the graph expects float32"),
        (
            lambda f: f.update(sample=torch.zeros(2, 4, 64, 64)),
            r"latent_height\) is 64, outside the profile: must be in \[8, 32\]",
        ),
        (lambda f: f.update(sample=torch.zeros(2, 4, 18, 16)), "multiple of 4"),
        (lambda f: f.update(encoder_hidden_states=torch.zeros(3, 77, 32)), "dim batch is 2 in 'sample' but 3"),
        (lambda f: f.pop("timestep"), r"missing \['timestep'\]"),
        (lambda f: f.update(step_index=torch.tensor(0)), r"unexpected \['step_index'\]"),
    ],
)
def test_feed_errors_name_tensor_and_dim(tiny, change, message):
    _, folder, specs = tiny
    feed = _unet_feed(specs["unet"])
    change(feed)
    with (
        OnnxRuntimeRunner(folder / "unet.onnx", specs["unet"], threads=1) as runner,
        pytest.raises(FeedError, match=message),
    ):
        runner.infer(feed)


def test_onnxruntime_refusals(tiny):
    _, folder, specs = tiny
    with pytest.raises(FileNotFoundError, match="no ONNX graph"):
        OnnxRuntimeRunner(folder / "missing.onnx", specs["unet"])
    with pytest.raises(ValueError, match="optimization"):
        OnnxRuntimeRunner(folder / "unet.onnx", specs["unet"], optimization="fast")
    with pytest.raises(BackendUnavailable, match="NoSuchExecutionProvider"):
        OnnxRuntimeRunner(folder / "unet.onnx", specs["unet"], providers=["NoSuchExecutionProvider"]).activate()
    # A graph that is not the spec's network is refused on activation, naming both input lists.
    with pytest.raises(RunnerError, match="differ from the IO spec"):
        OnnxRuntimeRunner(folder / "text_encoder.onnx", specs["unet"]).activate()


def test_torch_runner_output_forms(tiny):
    _, _, specs = tiny
    spec = specs["vae_decoder"]
    feed = {"latent": torch.zeros(1, 4, 16, 16)}
    image = torch.ones(1, 3, 32, 32)
    for fn in (lambda x: image, lambda x: (image,), lambda x: {"images": image, "extra": 1}):
        with TorchRunner(fn, spec) as runner:
            assert torch.equal(runner.infer(feed)["images"], image)
    with TorchRunner(lambda x: (image, image), spec) as runner, pytest.raises(RunnerError, match="expected tensors"):
        runner.infer(feed)
    with (
        TorchRunner(lambda x: torch.ones(1, 3, 30, 32), spec) as runner,
        pytest.raises(RunnerError, match=r"\(1, 3, 32, 32\)"),
    ):
        runner.infer(feed)
    with pytest.raises(TypeError):
        TorchRunner(42, spec)


def test_runtime_imports_without_tensorrt():
    # A fresh interpreter where importing tensorrt/tensorrt_rtx fails: runtime must still import.
    code = (
        "import sys; sys.modules['tensorrt'] = sys.modules['tensorrt_rtx'] = None; "
        "import runtime.runners, runtime.pipeline; print(runtime.runners.tensorrt_available())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_tensorrt_runner_refuses_clearly(tiny, tmp_path):
    _, _, specs = tiny
    with pytest.raises(FileNotFoundError, match="no TensorRT engine"):
        TensorRTRunner(tmp_path / "unet.engine", specs["unet"])
    with pytest.raises(ValueError, match="module"):
        (tmp_path / "unet.engine").write_bytes(b"x")
        TensorRTRunner(tmp_path / "unet.engine", specs["unet"], module="onnxruntime")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_tensorrt_runner_without_cuda_says_so(tiny, tmp_path):
    _, _, specs = tiny
    (tmp_path / "unet.engine").write_bytes(b"not an engine")
    runner = TensorRTRunner(tmp_path / "unet.engine", specs["unet"])
    with pytest.raises(BackendUnavailable, match=r"CUDA GPU|not installed"):
        runner.activate()
    assert not runner.is_active


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.slow
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_tensorrt_runner_matches_onnxruntime(tiny, tmp_path, cuda_graph):
    from runtime.build import build_engines

    _, folder, specs = tiny
    build_engines(folder, ["unet"], out_dir=tmp_path, tf32=False)  # float32 kernels: the tolerance assumes no TF32
    feeds = [_unet_feed(specs["unet"], seed=s) for s in (0, 1, 1)]
    with OnnxRuntimeRunner(folder / "unet.onnx", specs["unet"]) as ort_runner:
        wants = [ort_runner.infer(f)["noise_pred"] for f in feeds]
    with TensorRTRunner(tmp_path / "unet.engine", specs["unet"], cuda_graph=cuda_graph) as runner:
        gots = [to_numpy(runner.infer(f)["noise_pred"]) for f in feeds]
    for got, want in zip(gots, wants, strict=True):
        assert np.abs(got - want).max() / np.abs(want).max() <= TRT_FLOAT_MAX_REL_ERR
