"""runtime.build: engines from export folders (TensorRT-RTX builds them AOT on a CPU-only machine)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal

import pytest

from export.manifest import ManifestError
from runtime import build
from runtime.build import (
    EngineBuildError,
    EngineCompatibilityError,
    build_engines,
    check_engine_compatible,
)
from tests.runtime import qdq_graphs

HAS_TRT = any(importlib.util.find_spec(m) is not None for m in build.TENSORRT_MODULES)
trt_only = pytest.mark.trt


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from dgq import zoo
    from export.float_export import export_float

    out = tmp_path_factory.mktemp("tiny") / "export"
    export_float(zoo.build_pipeline("tiny", seed=0), out)
    return out


@pytest.fixture(scope="module")
def tiny_engines(tiny_export, tmp_path_factory):
    if not HAS_TRT:
        pytest.skip("needs the tensorrt or tensorrt_rtx module")
    out = tmp_path_factory.mktemp("engines")
    return out, build_engines(tiny_export, out_dir=out, workspace_gib=1, timing_cache=out / "timing.cache")


# ---- float graphs of the tiny model ------------------------------------------------------------


@trt_only
@pytest.mark.slow
def test_tiny_float_graphs_build_with_metadata_and_report(tiny_engines, tiny_export):
    out, results = tiny_engines
    assert sorted(results) == ["text_encoder", "unet", "vae_decoder"]
    for comp, res in results.items():
        assert res.engine == out / f"{comp}.engine" and res.engine.stat().st_size == res.engine_bytes > 0
        meta = json.loads(res.metadata.read_text())
        assert meta["format"] == "dgq-engine" and meta["component"] == comp
        assert meta["tensorrt"]["flavour"] in ("tensorrt", "tensorrt-rtx") and meta["tensorrt"]["version"]
        assert meta["export"]["target"] == "float" and meta["export"]["recipe_sha256"] is None
        assert meta["iospec"]["name"] == comp and meta["settings"]["workspace_gib"] == 1
        assert meta["applied"]["strongly_typed"] is True
        assert "applied" in meta["applied"]["timing_cache"]  # recorded either way (a no-op on TensorRT-RTX)
        if not meta["gpu"]["visible"]:
            assert meta["gpu"]["note"] == "AOT, no GPU"
        if meta["tensorrt"]["flavour"] == "tensorrt-rtx":  # capturable into CUDA graphs (the real graphs build so)
            assert meta["applied"]["require_user_allocation"] == {"applied": True, "value": True}
        report = json.loads(res.report.read_text())
        net = report["network"]
        assert net["quantized"]["total"] == 0 and net["quantized"]["float"] > 0
        assert net["summary"].endswith(f"{net['quantized']['float']} float")
        assert report["engine"]["source"] in ("engine inspector", "unavailable")
    assert not [n for n in _files(out) if n.endswith(".tmp")]
    table = build.report_table(results)
    assert table.splitlines()[0].startswith("component") and len(table.splitlines()) == 4


@trt_only
@pytest.mark.slow
def test_built_engine_metadata_is_compatible_here(tiny_engines):
    _, results = tiny_engines
    meta = build.read_engine_meta(results["unet"].engine)
    check_engine_compatible(meta)  # same process, same TensorRT: accepted
    assert meta["engine_sha256"] and meta["build_seconds"] > 0


@trt_only
@pytest.mark.slow
def test_existing_engine_is_not_overwritten_without_overwrite(tiny_engines, tiny_export):
    out, results = tiny_engines
    before = results["vae_decoder"].engine.read_bytes()
    with pytest.raises(FileExistsError, match=r"vae_decoder\.engine"):
        build_engines(tiny_export, components=["vae_decoder"], out_dir=out)
    assert results["vae_decoder"].engine.read_bytes() == before


# ---- synthetic Q/DQ graphs ------------------------------------------------------------------------


@trt_only
def test_int8_qdq_graph_builds_and_report_lists_quantized_layers(tmp_path):
    folder = qdq_graphs.export_folder(tmp_path / "int8", "int8")
    res = build_engines(folder)["unet"]
    report = json.loads(res.report.read_text())["network"]
    assert {layer["name"]: layer["scheme"] for layer in report["layers"]} == {"conv": "INT8", "fc": "INT8"}
    assert report["quantized"] == {"total": 2, "float": 0, "by_scheme": {"INT8": 2}}
    assert report["summary"] == "2 of 2 Conv/MatMul layers quantized (INT8: 2), 0 float"
    assert report["qdq_dtypes"] == {"INT8": 8}
    conv = next(layer for layer in report["layers"] if layer["name"] == "conv")
    assert [i["dequantized_from"] for i in conv["inputs"]] == ["INT8", "INT8"]
    meta = json.loads(res.metadata.read_text())
    assert meta["export"] == {**meta["export"], "target": "tensorrt", "recipe_sha256": qdq_graphs.FAKE_RECIPE_SHA256}


@trt_only
@pytest.mark.parametrize("block", [64, 128])
def test_int4_blockwise_weight_graph_builds_and_report_says_int4_weights(tmp_path, block):
    folder = tmp_path / "int4"
    qdq_graphs.export_folder(folder, "int4")
    if block != 64:  # rewrite the graph with another block size and re-hash the folder
        qdq_graphs.int4_weight_matmul(folder / "unet.onnx", block=block)
        from export.manifest import write_manifest

        write_manifest(folder, {"target": "tensorrt", "components": ["unet"]})
    report = json.loads(build_engines(folder)["unet"].report.read_text())["network"]
    assert report["quantized"]["by_scheme"] == {"INT4 weights": 1}
    assert report["layers"][0]["inputs"][0]["dequantized_from"] is None
    assert report["layers"][0]["inputs"][1]["dequantized_from"] == "INT4"


@trt_only
def test_fp8_graph_refused_for_jetson_orin(tmp_path):
    folder = qdq_graphs.export_folder(tmp_path / "fp8", "fp8")
    with pytest.raises(EngineBuildError, match=r"FP8 Q/DQ .* SM 8\.7 \(Jetson Orin\).*>= 8\.9"):
        build_engines(folder, target_sm="8.7")
    assert _files(folder) == ["iospec.json", "manifest.json", "recipe.safetensors", "unet.onnx"]


def test_fp8_refusal_rule_needs_sm89():
    report = {"qdq_dtypes": {"FP8": 4}}
    for sm in ("8.6", "8.7", "8.0"):
        with pytest.raises(EngineBuildError, match="FP8"):
            build._refuse_fp8("unet", report, sm)
    for sm in ("8.9", "9.0", "12.0", None):
        build._refuse_fp8("unet", report, sm)
    build._refuse_fp8("unet", {"qdq_dtypes": {"INT8": 4}}, "8.7")


# ---- refusals and failures ----------------------------------------------------------------------


@trt_only
def test_edited_export_folder_is_refused(tmp_path):
    folder = qdq_graphs.export_folder(tmp_path / "int8", "int8")
    with open(folder / "unet.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestError, match=r"unet\.onnx does not match its manifest hash"):
        build_engines(folder)
    assert not list(folder.glob("*.engine*"))


@trt_only
def test_graph_tensorrt_rejects_gives_parser_message_and_no_partial_files(tmp_path):
    folder = qdq_graphs.export_folder(tmp_path / "asym", "int8")
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(folder / "unet.onnx")
    for init in model.graph.initializer:
        if init.name == "x_zp":  # an asymmetric zero point: TensorRT takes symmetric Q/DQ only
            init.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), "x_zp"))
    onnx.save(model, folder / "unet.onnx")
    from export.manifest import write_manifest

    write_manifest(folder, {"target": "tensorrt", "components": ["unet"]})
    out = tmp_path / "out"
    with pytest.raises(
        EngineBuildError,
        match=r"unet\.onnx: TensorRT's ONNX parser rejected .*node 'x_Q' \(QuantizeLinear\).*zero point",
    ):
        build_engines(folder, out_dir=out)
    assert not out.exists()  # the engine folder this build created is not left behind empty


@trt_only
def test_failure_while_writing_leaves_no_engine(tmp_path, monkeypatch):
    folder = qdq_graphs.export_folder(tmp_path / "int4", "int4")
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # report and metadata are in place, the engine rename fails
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(build.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        build_engines(folder)
    assert _files(folder) == ["iospec.json", "manifest.json", "recipe.safetensors", "unet.onnx"]


@trt_only
def test_unknown_component_and_bad_settings_refused(tmp_path):
    folder = qdq_graphs.export_folder(tmp_path / "int8", "int8")
    with pytest.raises(EngineBuildError, match=r"no component\(s\) \['vae'\]"):
        build_engines(folder, components=["vae"])
    with pytest.raises(EngineBuildError, match="workspace_gib"):
        build_engines(folder, workspace_gib=0)
    with pytest.raises(EngineBuildError, match="must look like"):
        build_engines(folder, target_sm="sm87")


def test_export_for_onnx_runtime_is_refused_before_parsing_and_leaves_no_folder(tmp_path):
    from export.manifest import read_manifest, write_manifest

    folder = qdq_graphs.export_folder(tmp_path / "faithful", "int8")
    write_manifest(folder, read_manifest(folder) | {"target": "faithful"})
    out = tmp_path / "engines"
    with pytest.raises(EngineBuildError, match=r"is a 'faithful' export, which runs in ONNX Runtime"):
        build_engines(folder, out_dir=out)
    assert not out.exists()
    assert _files(folder) == ["iospec.json", "manifest.json", "recipe.safetensors", "unet.onnx"]


def test_export_with_fused_attention_is_refused_before_parsing(tmp_path):
    """A float graph with ONNX Runtime's contrib MultiHeadAttention (the manifest says so) is refused
    with the reason, not handed to TensorRT's parser."""
    from export.manifest import read_manifest, write_manifest

    folder = qdq_graphs.export_folder(tmp_path / "fused", "int8")
    write_manifest(folder, read_manifest(folder) | {"target": "float", "fused_attention": True})
    out = tmp_path / "engines"
    with pytest.raises(EngineBuildError, match=r"fused attention.*without --fused-attention"):
        build_engines(folder, out_dir=out)
    assert not out.exists()


def test_export_whose_manifest_does_not_verify_is_refused(tmp_path):
    folder = qdq_graphs.export_folder(tmp_path / "int8", "int8")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["target"] = "float"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="does not match its digest"):
        build_engines(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"no manifest\.json"):
        build_engines(folder)


@trt_only
def test_overwrite_replaces_only_engines_dgq_built(tmp_path):
    folder = qdq_graphs.export_folder(tmp_path / "int8", "int8")
    out = tmp_path / "engines"
    out.mkdir()
    (out / "unet.engine").write_bytes(b"someone else's plan")
    with pytest.raises(FileExistsError, match=r"unet\.engine exist\(s\) without the dgq metadata"):
        build_engines(folder, out_dir=out, overwrite=True)
    assert (out / "unet.engine").read_bytes() == b"someone else's plan" and _files(out) == ["unet.engine"]
    (out / "unet.engine").unlink()
    build_engines(folder, out_dir=out)
    build_engines(folder, out_dir=out, overwrite=True)  # its own: rebuilt
    assert _files(out) == ["unet.engine", "unet.engine.json", "unet.engine.report.json"]


@trt_only
def test_a_build_removes_what_a_killed_build_left(tmp_path):
    folder = qdq_graphs.export_folder(tmp_path / "int8", "int8")
    before = _files(folder)
    left = [".dgq-tmp.unet.engine.lock", ".dgq-tmp.unet.engine.k1ll3d_0", ".dgq-tmp.unet.engine.json.zz9_8y7x"]
    for name in left:  # a killed build's lock and temporaries (the lock was released by the kill)
        (folder / name).write_bytes(b"partial")
    build_engines(folder)
    assert _files(folder) == sorted([*before, "unet.engine", "unet.engine.json", "unet.engine.report.json"])


def test_tensorrt_callbacks_keep_a_ctrl_c_for_after_the_call():
    """TensorRT swallows exceptions raised in its callbacks: a KeyboardInterrupt there is kept and raised
    when TensorRT returns, and the progress monitor then cancels the build."""
    interrupts = build._Interrupts()
    interrupts.raise_pending()  # nothing pending: no exception
    with interrupts.watching():
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: recorded by the handler, not raised
        assert interrupts.interrupted()
    with pytest.raises(KeyboardInterrupt):
        interrupts.raise_pending()
    assert not interrupts.interrupted()


@trt_only
@pytest.mark.slow
def test_ctrl_c_stops_a_tensorrt_build_exits_130_and_leaves_nothing(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    from dgq import zoo
    from export.float_export import export_float
    from tests.tolerances import BUILD_INTERRUPT_MAX_SECONDS

    folder = tmp_path / "export"
    export_float(zoo.build_pipeline("tiny", seed=0), folder, components=("unet",))
    before = _files(folder)
    log = tmp_path / "stderr.txt"
    root = Path(__file__).resolve().parents[2]
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "build", str(folder)],
            stderr=err,
            stdout=subprocess.DEVNULL,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            # SIGINT as a terminal delivers it, whatever this test process inherited (a background job
            # of a non-interactive shell has it ignored, which stays so across exec, and Python then
            # installs no KeyboardInterrupt handler)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        while "building ['unet']" not in log.read_text() and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(2.0)  # past the parser (about 1 s), into the builder (about 8 s)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    elapsed = time.monotonic() - sent
    lines = log.read_text().strip().splitlines()
    assert proc.returncode == 130, lines
    assert elapsed < BUILD_INTERRUPT_MAX_SECONDS
    assert lines[-1].endswith("interrupted; nothing half-written was left behind") and len(lines) == 2, lines
    assert _files(folder) == before


# ---- compatibility of engine metadata -----------------------------------------------------------


def _meta(**gpu):
    return {
        "format": "dgq-engine",
        "component": "unet",
        "tensorrt": {"flavour": "tensorrt", "module": "tensorrt", "version": "10.3.0"},
        "gpu": gpu or {"visible": True, "name": "Orin", "compute_capability": "8.7"},
    }


def _env(flavour="tensorrt", version="10.3.0", **gpu):
    return {
        "tensorrt": {"flavour": flavour, "module": flavour.replace("-", "_"), "version": version},
        "gpu": gpu or {"visible": True, "name": "Orin", "compute_capability": "8.7"},
    }


@pytest.mark.parametrize(
    "env",
    [_env(), _env(visible=False)],  # the build's GPU; no GPU visible (nothing to compare, deserializing will tell)
    ids=["same-gpu", "no-gpu"],
)
def test_compatible_engine_accepted_and_a_changed_version_refused(env):
    assert check_engine_compatible(_meta(), env) is None
    # The same pair with only the TensorRT version changed is refused: the acceptance is the check's decision.
    env = copy.deepcopy(env)
    env["tensorrt"]["version"] = "10.3.1"
    with pytest.raises(EngineCompatibilityError, match=r"10\.3\.0 but this process runs 10\.3\.1"):
        check_engine_compatible(_meta(), env)


@pytest.mark.parametrize(
    "env, message",
    [
        (_env(flavour="tensorrt-rtx"), "built by tensorrt but this process runs tensorrt-rtx"),
        (_env(version="10.7.0"), r"built by tensorrt 10\.3\.0 but this process runs 10\.7\.0"),
        (
            _env(visible=True, name="NVIDIA H100", compute_capability="9.0"),
            r"built for Orin \(SM 8\.7\) but this GPU is NVIDIA H100 \(SM 9\.0\)",
        ),
    ],
)
def test_incompatible_engine_refused(env, message):
    with pytest.raises(EngineCompatibilityError, match=message):
        check_engine_compatible(_meta(), env)


def test_aot_engine_checked_against_its_targets():
    aot = _meta(visible=False, note="AOT, no GPU", target_sm=["8.9"])
    check_engine_compatible(aot, _env(visible=True, name="RTX 4090", compute_capability="8.9"))
    with pytest.raises(EngineCompatibilityError, match=r"ahead of time for SM 8\.9 .*SM 8\.6"):
        check_engine_compatible(aot, _env(visible=True, name="RTX 3090", compute_capability="8.6"))


def test_rtx_engines_run_on_any_gpu_of_their_targets():
    # TensorRT-RTX engines are portable across the compute capabilities they target, whatever GPU
    # model built them; full TensorRT engines stay tied to the model (test_incompatible_engine_refused).
    rtx = {"flavour": "tensorrt-rtx", "module": "tensorrt_rtx", "version": "1.7.1"}
    built_on = {"visible": True, "name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    meta = _meta(**built_on, target_sm=["8.6", "8.9", "12.0"]) | {"tensorrt": rtx}
    for name, sm in (("NVIDIA RTX 6000 Ada Generation", "8.9"), ("NVIDIA GeForce RTX 5090", "12.0")):
        check_engine_compatible(meta, _env("tensorrt-rtx", "1.7.1", visible=True, name=name, compute_capability=sm))
    with pytest.raises(EngineCompatibilityError, match=r"built on a GPU for SM 8\.6, 8\.9, 12\.0 .*SM 7\.5"):
        check_engine_compatible(meta, _env("tensorrt-rtx", "1.7.1", visible=True, name="T4", compute_capability="7.5"))
    default_targets = _meta(**built_on, target_sm=None) | {"tensorrt": rtx}  # left to TensorRT-RTX's runtime
    check_engine_compatible(
        default_targets, _env("tensorrt-rtx", "1.7.1", visible=True, name="A", compute_capability="8.6")
    )


def test_rtx_compute_capability_members_read_as_major_minor():
    members = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121", "ComputeCapability.SM120")
    assert [build.sm_of_member(m) for m in members] == ["7.5", "8.0", "8.6", "8.9", "12.0", "12.1", "12.0"]
    with pytest.raises(EngineBuildError, match="CURRENT"):
        build.sm_of_member("CURRENT")


def test_not_engine_metadata_refused():
    with pytest.raises(EngineCompatibilityError, match="not a dgq-engine"):
        check_engine_compatible({"format": "other"}, _env())


# ---- script and CLI -----------------------------------------------------------------------------


@trt_only
def test_script_and_cli_build_and_map_errors_to_exit_2(tmp_path, capsys):
    from app.cli import main as dgq_main
    from scripts.build_engine import main

    folder = qdq_graphs.export_folder(tmp_path / "int8", "int8")
    assert main([str(folder), "--workspace-gib", "1"]) == 0
    assert "unet" in capsys.readouterr().out and (folder / "unet.engine").is_file()
    assert dgq_main(["build", str(folder)]) == 2  # exists, no --overwrite
    assert dgq_main(["build", str(folder), "--overwrite", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "unet.engine.json").is_file()
    with open(folder / "iospec.json", "a") as f:
        f.write(" ")
    assert dgq_main(["build", str(folder), "--overwrite"]) == 2


@trt_only
def test_benchmark_reports_sizes_and_exits_0_without_gpu(tmp_path, capsys):
    from runtime.runners import tensorrt_available
    from scripts.benchmark_engines import main

    if tensorrt_available():
        pytest.skip("a GPU is present: the latency path runs instead")
    for kind in ("int8", "int4"):
        build_engines(qdq_graphs.export_folder(tmp_path / kind, kind))
    out = tmp_path / "bench.json"
    assert main([f"int8={tmp_path / 'int8'}", f"int4={tmp_path / 'int4'}", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "no CUDA GPU with a TensorRT runtime here" in text
    results = json.loads(out.read_text())
    assert set(results) == {"int8", "int4"} and all(
        r["engine_mb"] > 0 and "median_ms" not in r for r in results.values()
    )
    # the parsed network's layer counts from the build reports, and ratios against the first variant
    assert all(r["network_layers"] > r["gemm_layers"] > 0 for r in results.values())
    assert "network layers" in text and "1.00x" in text
    assert main([f"int8={tmp_path / 'int8'}", "--baseline", "int4"]) == 2  # not a variant
    assert main([f"x={tmp_path / 'none'}"]) == 2


def test_old_full_tensorrt_refused_for_strong_typing_and_int4():
    build.check_tensorrt_version({"flavour": "tensorrt", "version": "10.3.0"}, build.MIN_TENSORRT)
    build.check_tensorrt_version({"flavour": "tensorrt-rtx", "version": "1.0.0"}, build.MIN_TENSORRT)
    with pytest.raises(
        EngineBuildError, match=r"INT4 block-wise weights need TensorRT >= 10\.0, this is 8\.5\.2.*JetPack 6"
    ):
        build.check_tensorrt_version({"flavour": "tensorrt", "version": "8.5.2"}, ["INT4 block-wise weights"])


@trt_only
def test_aot_target_sm_recorded_or_refused(tmp_path):
    trt = build.load_tensorrt()
    if not hasattr(trt, "ComputeCapability") or build.gpu_info()["visible"]:
        pytest.skip("AOT compute-capability targets are a TensorRT-RTX feature used without a GPU")
    folder = qdq_graphs.export_folder(tmp_path / "int4", "int4")
    meta = build.read_engine_meta(build_engines(folder, target_sm="8.9")["unet"].engine)
    assert meta["gpu"] == {"visible": False, "note": "AOT, no GPU", "target_sm": ["8.9"]}
    assert meta["applied"]["target_sm"] == {"applied": True, "value": "8.9"}
    with pytest.raises(EngineBuildError, match=r"cannot target SM 8\.7"):
        build_engines(folder, target_sm="8.7", overwrite=True)
    assert (folder / "unet.engine").is_file()  # the refused rebuild left the earlier engine alone


@trt_only
@pytest.mark.parametrize("sm, gpu", [("12.0", "NVIDIA GeForce RTX 5090"), ("12.1", "NVIDIA GB10")])
def test_aot_blackwell_engine_is_accepted_on_its_gpu(tmp_path, sm, gpu):
    trt = build.load_tensorrt()
    if not hasattr(trt, "ComputeCapability") or build.gpu_info()["visible"]:
        pytest.skip("AOT compute-capability targets are a TensorRT-RTX feature used without a GPU")
    if not hasattr(trt.ComputeCapability, "SM" + sm.replace(".", "")):
        pytest.skip(f"{trt.__name__} {trt.__version__} has no SM {sm} target")
    folder = qdq_graphs.export_folder(tmp_path / "int8", "int8")
    meta = build.read_engine_meta(build_engines(folder, target_sm=sm)["unet"].engine)
    assert meta["gpu"]["target_sm"] == [sm]
    here = _env("tensorrt-rtx", meta["tensorrt"]["version"], visible=True, name=gpu, compute_capability=sm)
    check_engine_compatible(meta, here)


@trt_only
def test_tf32_off_and_capturable_are_applied_and_recorded(tmp_path):
    trt = build.load_tensorrt()
    folder = qdq_graphs.export_folder(tmp_path / "int8", "int8")
    meta = build.read_engine_meta(build_engines(folder, tf32=False)["unet"].engine)
    assert meta["settings"]["tf32"] is False and meta["settings"]["capturable"] is True
    assert meta["applied"]["tf32"] == {"applied": True, "value": False}
    if hasattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION"):
        assert meta["applied"]["require_user_allocation"] == {"applied": True, "value": True}
    meta = build.read_engine_meta(build_engines(folder, capturable=False, overwrite=True)["unet"].engine)
    assert "require_user_allocation" not in meta["applied"] and "tf32" not in meta["applied"]


def test_unsupported_majors_are_named_with_what_to_install():
    assert build.unsupported_tensorrt("tensorrt", "10.3.0.30") is None
    assert build.unsupported_tensorrt("tensorrt_rtx", "1.7.1.116") is None
    assert "install tensorrt>=10.3,<11" in build.unsupported_tensorrt("tensorrt", "11.0.0")
    assert "JetPack 6" in build.unsupported_tensorrt("tensorrt", "8.5.2")
    assert "install tensorrt-rtx>=1.0,<2" in build.unsupported_tensorrt("tensorrt_rtx", "2.0")
    assert "major version cannot be read" in build.unsupported_tensorrt("tensorrt", "dev")


def test_network_layers_are_told_apart_by_origin():
    from runtime.engine_report import _origin

    assert (
        _origin("ONNXTRT_castHelper_12")
        == _origin("tmp_weight_3")
        == _origin("(Unnamed Layer* 5) [Constant]")
        == "parser"
    )
    attn = "/unet/down_blocks.0/attentions.0/transformer_blocks.0/attn1/"
    assert _origin(attn + "Softmax") == _origin(attn + "q_quant/QuantizeLinear") == "attention"
    assert _origin(attn + "to_q/MatMul") == _origin(attn + "to_out.0/MatMul") == "graph"
    assert _origin("/unet/down_blocks.0/resnets.0/conv1/Conv") == _origin("/unet/attn_like/Conv") == "graph"
