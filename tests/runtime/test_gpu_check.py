"""scripts/gpu_check.py: a clean stop without a GPU, and the whole check through the TensorRT stand-ins."""

from __future__ import annotations

import json

import pytest
import torch

from scripts import gpu_check
from tests.runtime.trt_standins import write_engines

SMALL = ["--model", "tiny", "--num-prompts", "2", "--steps", "2", "--images", "1", "--runs", "2", "--warmup", "1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("extra", [[], ["--torch-only"]])
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path, capsys, extra):
    assert gpu_check.main(["--out", str(tmp_path), *extra]) == 0
    printed = capsys.readouterr().out
    assert "torch sees no CUDA GPU" in printed or "no CUDA GPU here" in printed
    written = json.loads((tmp_path / ("gpu_check_torch.json" if extra else "gpu_check.json")).read_text())
    assert written["status"] == "skipped" and "no CUDA GPU" in json.dumps(written)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"gpu_check{'_torch' if extra else ''}.json"]


def test_unsupported_tensorrt_is_named_in_the_skip(standin, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(standin.modules["tensorrt"], "__version__", "11.0.0")
    assert gpu_check.main(["--out", str(tmp_path), *SMALL]) == 0
    assert "tensorrt 11.0.0 is not supported" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu_check.json").read_text())["status"] == "skipped"


@pytest.mark.slow
def test_whole_check_through_standins_passes_then_fails_on_a_broken_engine(standin, monkeypatch, tmp_path, capsys):
    from runtime import build

    module = standin.modules["tensorrt"]
    broken: dict[str, float] = {}

    def standin_build(export_dir, overwrite=False, **kwargs):
        # Engines that compute with ONNX Runtime on the export's graph; "broken" ones add an offset.
        return write_engines(module, export_dir, perturb={"unet": broken.get(export_dir.name, 0.0)})

    monkeypatch.setattr(build, "build_engines", standin_build)
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["status"] == "passed" and doc["environment"]["tensorrt"]["module"] == "tensorrt"
    assert sorted(doc["variants"]) == ["fp16", "int4", "int8"]
    for variant, result in doc["variants"].items():
        assert result["failures"] == [], variant
        # The stand-in runs the same graph in ONNX Runtime, on 1 thread against the script's default
        # (float sums split differently): round-off only, far above any floor.
        assert result["engine_vs_onnxruntime_db"] >= 60.0
        assert result["engine_vs_torch_db"] >= result["floors_db"]["engine_vs_torch_db"]
        assert result["image_psnr_db"] >= result["floors_db"]["image_psnr_db"] and result["graph_mode"] == "manual"
        assert result["latency"]["runs"] == 2 and sorted(result["engines"]) == ["text_encoder", "unet", "vae_decoder"]
    header, *rows = printed.strip().splitlines()[-4:]
    assert header.startswith("variant") and [r.split()[0] for r in rows] == ["fp16", "int8", "int4"]
    assert all(r.split()[-1] == "ok" for r in rows)

    broken["int8"] = 0.5
    assert gpu_check.main(["--out", str(out), *SMALL, "--reuse", "--variants", "int8", "fp16"]) == 1
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["status"] == "failed" and doc["variants"]["fp16"]["failures"] == []
    failures = doc["variants"]["int8"]["failures"]
    assert any(f.startswith("engine_vs_onnxruntime_db") and "under its floor 25.0 dB" in f for f in failures)
    assert "int8: engine_vs_onnxruntime_db" in capsys.readouterr().out


def test_torch_only_section_runs_its_checks_through_the_standins(standin, tmp_path, capsys):
    assert gpu_check.main(["--torch-only", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "gpu_check_torch.json").read_text())
    assert doc["status"] == "passed" and doc["failures"] == [] and len(doc["checks"]) == 11
    assert "ok    graphs replay across shapes" in capsys.readouterr().out


@pytest.mark.gpu
def test_torch_only_section_on_the_real_device(tmp_path):
    assert gpu_check.main(["--torch-only", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "gpu_check_torch.json").read_text())
    assert doc["status"] == "passed" and all(doc["checks"].values())
