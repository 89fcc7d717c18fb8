"""TensorRTRunner's real activate / infer / deactivate through strict TensorRT and torch.cuda stand-ins.

The stand-ins (tests/runtime/trt_standins.py) refuse what TensorRT refuses or would get wrong: shapes
outside the profile or of the wrong rank, a USER_MANAGED context run without device memory, buffers
smaller than the tensors written into them. They log the stream of every call and every capture.
"""

from __future__ import annotations

import json
import logging
import re
import sys

import numpy as np
import pytest
import torch

from export.iospec import FeedError
from runtime.runners import BackendUnavailable, DeviceMemoryPool, RunnerError, to_torch
from tests.runtime.runtime_fixtures import export_tiny
from tests.runtime.trt_standins import (
    CudaGraphStrategy,
    FakeNetwork,
    as_numpy,
    engine_meta,
    unet_like_compute,
    unet_like_feed,
    unet_like_spec,
    write_engines,
)


def _network(dtype="float32", **kwargs) -> FakeNetwork:
    return FakeNetwork(unet_like_spec(dtype), unet_like_compute, **kwargs)


def _want(feed) -> np.ndarray:
    return as_numpy(unet_like_compute({k: torch.as_tensor(v) for k, v in feed.items()})["noise_pred"])


def _contexts(standin, module="tensorrt"):
    return [c for e in standin.modules[module].engines for c in e.contexts]


# ---- feeds: numpy and torch, fp16 and fp32 -------------------------------------------------------------


def test_to_torch_keeps_a_0d_array_0d():
    assert to_torch(np.array(5.0, np.float32)).shape == ()
    assert to_torch(np.float32(5.0)).shape == ()
    strided = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    assert to_torch(strided).is_contiguous() and to_torch(strided).tolist() == strided.tolist()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("numpy_feed", [False, True])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_feeds_of_both_kinds_and_dtypes_run(standin, dtype, numpy_feed, cuda_graph):
    runner = standin.runner(_network(dtype), cuda_graph=cuda_graph)
    with runner:
        for seed in (0, 1, 2):  # with a graph: plain run + capture, then two replays
            feed = unet_like_feed(runner.spec, seed=seed, numpy=numpy_feed)
            got = runner.infer(feed)["noise_pred"]
            assert got.dtype == getattr(torch, dtype) and tuple(got.shape) == (2, 4, 8, 8)
            np.testing.assert_array_equal(as_numpy(got), _want(feed))
    context = _contexts(standin)[0]
    assert context.shapes["timestep"] == () and context.errors == []
    assert standin.cuda.captures == (1 if cuda_graph else 0)


def test_feed_outside_the_engine_profile_is_refused_by_the_engine(standin):
    network = _network()
    network.profile["sample"] = ((1, 4, 4, 4), (4, 4, 8, 8))  # the engine was built for smaller latents
    runner = standin.runner(network)
    with runner, pytest.raises(FeedError, match=r"TensorRT refused shape \(2, 4, 16, 16\) for 'sample'"):
        runner.infer(unet_like_feed(runner.spec, hw=16))


# ---- activation cycles and the shared device memory -----------------------------------------------------


def test_every_activation_binds_device_memory_before_running(standin):
    pool = DeviceMemoryPool(device="cpu")
    runner = standin.runner(_network(), memory_pool=pool)
    for cycle in range(2):  # `with pipe:` twice
        with runner:
            feed = unet_like_feed(runner.spec, seed=cycle)
            np.testing.assert_array_equal(as_numpy(runner.infer(feed)["noise_pred"]), _want(feed))
    contexts = _contexts(standin)
    assert len(contexts) == 2
    for context in contexts:
        assert context.strategy.name == "USER_MANAGED" and context.errors == []
        assert context.device_memory is not None and context.device_memory[1] >= 4096


def test_pool_follows_the_runners_device_and_is_freed_when_the_last_runner_deactivates(standin):
    pool = DeviceMemoryPool()
    small = standin.runner(_network(scratch_bytes=1000), memory_pool=pool)
    big = standin.runner(_network(scratch_bytes=5000), memory_pool=pool)
    for _ in range(2):
        with small, big:
            assert pool.device == small.device and pool.nbytes == 5000
            for r in (small, big):
                r.infer(unet_like_feed(r.spec))
        assert pool.nbytes == 0 and pool.buffer is None
    assert all(c.errors == [] for c in _contexts(standin))
    elsewhere = standin.runner(_network(), memory_pool=DeviceMemoryPool(device="cpu:1"))
    with pytest.raises(RunnerError, match=r"memory pool is on cpu:1 but .* runs on cpu;"):
        elsewhere.activate()


def test_runtime_cache_survives_reactivation_and_processes(standin, tmp_path):
    cache = tmp_path / "unet.runtime_cache"
    network = _network()
    runner = standin.runner(network, module="tensorrt_rtx", runtime_cache=cache)
    for _ in range(2):
        with runner:
            runner.infer(unet_like_feed(runner.spec))
    engines = standin.modules["tensorrt_rtx"].engines
    assert len(engines) == 2 and sum(e.compilations for e in engines) == 1
    assert cache.is_file()
    again = standin.runner(network, module="tensorrt_rtx", runtime_cache=cache)  # a new process, same cache file
    with again:
        again.infer(unet_like_feed(again.spec))
    assert sum(e.compilations for e in engines) == 1
    contexts = _contexts(standin, "tensorrt_rtx")
    assert all(c.config is not None and c.config.cache is not None for c in contexts)


# ---- streams ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("caller", ["default", "side"])
def test_runs_on_its_stream_after_the_callers_and_hands_outputs_back(standin, caller):
    runner = standin.runner(_network())
    cuda = standin.cuda
    with runner:
        side = torch.cuda.Stream() if caller == "side" else cuda.default
        with cuda.stream(side):
            out = runner.infer(unet_like_feed(runner.spec))["noise_pred"]
    own = runner_stream = _contexts(standin)[0].streams[0]
    assert own not in (cuda.default.cuda_stream, side.cuda_stream)
    events = cuda.events
    execute = events.index(("execute", own))
    assert ("wait", runner_stream, side.cuda_stream) in events[:execute]  # inputs written on the caller's stream
    assert ("record_stream", torch.Tensor.data_ptr(out), side.cuda_stream) in events[execute:]
    assert ("wait", side.cuda_stream, runner_stream) in events[execute:]  # the caller orders its reads after


# ---- CUDA graphs: capture decisions ---------------------------------------------------------------------


def test_graph_replays_from_runner_owned_buffers(standin):
    runner = standin.runner(_network(), cuda_graph=True)
    first = unet_like_feed(runner.spec, seed=0)
    kept = {k: v.clone() for k, v in first.items()}
    with runner:
        runner.infer(first)
        second = unet_like_feed(runner.spec, seed=1)
        np.testing.assert_array_equal(as_numpy(runner.infer(second)["noise_pred"]), _want(second))
    for name, value in kept.items():  # the replay copied the new feed into the runner's buffers, not the caller's
        assert torch.equal(first[name], value), name
    assert standin.cuda.captures == 1 and runner.graph_mode == "manual"


def test_alternating_shapes_keep_one_graph_each(standin):
    runner = standin.runner(_network(), cuda_graph=True)
    with runner:
        for i in range(6):
            feed = unet_like_feed(runner.spec, seed=i, batch=1 + i % 2)
            np.testing.assert_array_equal(as_numpy(runner.infer(feed)["noise_pred"]), _want(feed))
    assert standin.cuda.captures == 2
    context = _contexts(standin)[0]
    assert len(context.streams) == 4  # two plain runs and two captures; the other calls replayed
    assert context.shapes["sample"] == (2, 4, 8, 8)  # rebound to the last replayed graph's shapes


def test_not_capturable_runs_plainly_with_a_warning(standin, caplog):
    runner = standin.runner(_network(capturable=False), cuda_graph=True)
    with caplog.at_level(logging.WARNING, logger="runtime.runners"), runner:
        for seed in range(3):
            feed = unet_like_feed(runner.spec, seed=seed)
            np.testing.assert_array_equal(as_numpy(runner.infer(feed)["noise_pred"]), _want(feed))
    assert standin.cuda.captures == 0 and not any(e[0] == "capture_begin" for e in standin.cuda.events)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "is_stream_capturable" in warnings[0]
    assert len(_contexts(standin)[0].streams) == 3  # three plain executions


def test_failed_capture_falls_back_to_plain_execution(standin, caplog):
    standin.cuda.fail_capture = "CUDA error: operation not permitted when stream is capturing"
    runner = standin.runner(_network(), cuda_graph=True)
    with caplog.at_level(logging.WARNING, logger="runtime.runners"), runner:
        for seed in range(3):
            feed = unet_like_feed(runner.spec, seed=seed)
            np.testing.assert_array_equal(as_numpy(runner.infer(feed)["noise_pred"]), _want(feed))
    assert runner.graph_mode == "off"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "operation not permitted" in warnings[0]
    assert sum(e[0] == "capture_begin" for e in standin.cuda.events) == 1  # not retried on every call


def test_tensorrt_rtx_uses_its_builtin_graphs_instead_of_capturing(standin):
    runner = standin.runner(_network(), module="tensorrt_rtx", cuda_graph=True)
    with runner:
        for hw in (8, 12, 8):  # dynamic shapes: TensorRT-RTX captures per shape itself
            feed = unet_like_feed(runner.spec, hw=hw)
            np.testing.assert_array_equal(as_numpy(runner.infer(feed)["noise_pred"]), _want(feed))
    context = _contexts(standin, "tensorrt_rtx")[0]
    assert runner.graph_mode == "tensorrt-rtx" and standin.cuda.captures == 0
    assert context.config.cuda_graph_strategy == CudaGraphStrategy.WHOLE_GRAPH_CAPTURE


# ---- engine/spec disagreements and versions -------------------------------------------------------------


def test_engine_output_larger_than_the_spec_is_refused_before_running(standin):
    def doubled(inputs):
        b, c, h, w = inputs["sample"]
        return {"noise_pred": (b, c, 2 * h, 2 * w)}

    runner = standin.runner(_network(output_shapes=doubled))
    with (
        runner,
        pytest.raises(RunnerError, match=r"\(2, 4, 16, 16\) \(get_tensor_shape\).*IO spec gives \(2, 4, 8, 8\)"),
    ):
        runner.infer(unet_like_feed(runner.spec))
    assert _contexts(standin)[0].streams == []  # nothing was enqueued


@pytest.mark.parametrize(
    "module, version, message",
    [
        ("tensorrt", "11.0.0", r"tensorrt 11\.0\.0 is not supported.*TensorRT 10\.x.*tensorrt>=10\.3,<11"),
        ("tensorrt", "8.6.1", r"tensorrt 8\.6\.1 is not supported.*JetPack 6"),
        ("tensorrt_rtx", "2.0.0", r"tensorrt_rtx 2\.0\.0 is not supported.*TensorRT-RTX 1\.x"),
    ],
)
def test_unsupported_tensorrt_major_is_refused_clearly(standin, monkeypatch, module, version, message):
    from runtime import build

    monkeypatch.setattr(standin.modules[module], "__version__", version)
    runner = standin.runner(_network(), module=module)
    with pytest.raises(BackendUnavailable, match=message):
        runner.activate()
    assert not runner.is_active
    with pytest.raises(build.EngineBuildError, match=message):
        build.load_tensorrt([module])


def test_engine_metadata_module_is_loaded_even_when_both_are_installed(standin, tmp_path):
    # scripts/benchmark_engines.py with tensorrt and tensorrt_rtx both importable and RTX engines.
    from scripts.benchmark_engines import measure_latency

    network = _network()
    engines = {}
    for label in ("a", "b"):
        path = tmp_path / label / "unet.engine"
        path.parent.mkdir()
        path.write_bytes(standin.modules["tensorrt_rtx"].plan_for(network))
        meta = engine_meta(standin.modules["tensorrt_rtx"], network.spec)
        path.with_name("unet.engine.json").write_text(json.dumps(meta))
        engines[label] = path
    results = measure_latency(engines, "unet", runs=3, warmup=1)
    assert set(results) == {"a", "b"} and all(r["runs"] == 3 and r["median_ms"] >= 0 for r in results.values())
    assert len(standin.modules["tensorrt_rtx"].engines) == 2 and standin.modules["tensorrt"].engines == []


# ---- the pipeline over stand-in engines -------------------------------------------------------------------

PROMPTS = ["a photo of a dress", "a red sneaker"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("trt_pipeline") / "onnx")[1]


def _standin_engines(standin, folder, engine_dir, module="tensorrt_rtx", **tensorrt) -> None:
    write_engines(standin.modules[module], folder, engine_dir, **tensorrt)


@pytest.mark.parametrize("module", ["tensorrt", "tensorrt_rtx"])
def test_pipeline_over_engines_twice_matches_onnxruntime(standin, tiny, tmp_path, module):
    from runtime.pipeline import Text2ImagePipeline

    _standin_engines(standin, tiny, tmp_path / "engines", module)
    reference = Text2ImagePipeline.from_export(tiny, backend="onnxruntime", optimization="off", threads=1)
    want = reference(PROMPTS, seed=[3, 4], steps=3, guidance=5.0).images
    pipe = Text2ImagePipeline.from_export(tiny, backend="tensorrt", engine_dir=tmp_path / "engines", cuda_graph=True)
    assert pipe.backend == f"tensorrt ({module})"
    pool = pipe.unet.memory_pool
    for _ in range(2):
        with pipe:
            got = pipe(PROMPTS, seed=[3, 4], steps=3, guidance=5.0)
        np.testing.assert_array_equal(got.images, want)
        assert pool.nbytes == 0  # released with the last engine
    contexts = _contexts(standin, module)
    assert len(contexts) == 6 and all(c.errors == [] and c.device_memory is not None for c in contexts)
    assert pipe.unet.graph_mode == ("manual" if module == "tensorrt" else "tensorrt-rtx")


@pytest.mark.parametrize(
    "case, reason",
    [
        ("rtx engines, no tensorrt_rtx here", r"no TensorRT Python module"),
        ("other version", r"built by tensorrt-rtx 1\.0\.0 but this process runs 1\.7\.1"),
    ],
)
def test_auto_falls_back_to_onnxruntime_when_engines_cannot_load(
    standin, tiny, tmp_path, monkeypatch, caplog, case, reason
):
    from runtime.pipeline import Text2ImagePipeline

    if case.startswith("rtx engines"):  # RTX engines copied to a Jetson, which has only tensorrt
        _standin_engines(standin, tiny, tmp_path / "engines")
        monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    else:
        _standin_engines(standin, tiny, tmp_path / "engines", version="1.0.0")
    with caplog.at_level(logging.WARNING, logger="runtime.pipeline"):
        pipe = Text2ImagePipeline.from_export(tiny, engine_dir=tmp_path / "engines")
    assert pipe.backend.startswith("onnxruntime")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falling back to ONNX Runtime" in warnings[0]
    assert re.search(reason, warnings[0]) and re.search(reason, pipe.backend_reason)
    with pytest.raises(ValueError, match=reason):  # asked for explicitly: the error stands
        Text2ImagePipeline.from_export(tiny, backend="tensorrt", engine_dir=tmp_path / "engines")
