"""scripts/compare_methods.py's ModelOpt peers: ModelOpt's own configs on a copy of the UNet."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from scripts import compare_methods


def test_modelopt_int8_quantizes_a_copy_calibrated_through_the_pipeline(tiny_pipe):
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.nn import TensorQuantizer

    qpipe = compare_methods.modelopt_pipeline(tiny_pipe, "INT8_DEFAULT_CFG", ["a photo", "a dog"], 2, 5.0, seed=0)
    quantizers = [m for m in qpipe.unet.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
    assert quantizers and not any(isinstance(m, TensorQuantizer) for m in tiny_pipe.unet.modules())
    # calibrated: every enabled input quantizer has a finite range from the forward loop
    inputs = [m for m in quantizers if getattr(m, "amax", None) is not None]
    assert inputs and all(bool(torch.isfinite(m.amax).all()) for m in inputs)
    kw = {"num_inference_steps": 2, "guidance_scale": 5.0, "output_type": "latent"}
    ref = tiny_pipe(["a cat"], generator=torch.Generator().manual_seed(1), **kw).images
    out = qpipe(["a cat"], generator=torch.Generator().manual_seed(1), **kw).images
    assert out.shape == ref.shape and not torch.equal(out, ref)


def test_modelopt_flag_without_modelopt_is_refused_before_any_work(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "modelopt" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        compare_methods.main(["--modelopt", "--model", "tiny"])
    assert e.value.code == 2 and "nvidia-modelopt" in capsys.readouterr().err


def test_onnxruntime_ablations_use_the_export_target_fields():
    """The ablations' onnxruntime fields are the export's own preset (kept apart for a fast --help)."""
    from export.qdq_export import ORT_PRESET

    assert compare_methods.ORT_FIELDS == ORT_PRESET
    ablation = compare_methods.ABLATIONS["DGQ, onnxruntime profile K=4, conv branches"]
    assert ablation == ("dgq", {**ORT_PRESET, "groups": 4, "fold_conv": False})
