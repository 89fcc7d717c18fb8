"""Export folders shared by the runtime tests: the tiny pipeline's float graphs, and a copy whose UNet
is a synthetic graph with the quantized exports' extra ``step_index`` input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from export.iospec import TensorSpec, read_specs, specs_to_json
from export.manifest import read_manifest, write_manifest

STEP_SCALE = 0.01  # the synthetic UNet predicts noise = sample * 0 + step_index * STEP_SCALE


def export_tiny(folder: Path):
    """(pipeline, folder) for the tiny zoo model exported in float32 with assets."""
    from dgq import zoo
    from export.float_export import export_float

    pipe = zoo.build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    export_float(pipe, folder)
    return pipe, folder


def step_index_unet(spec) -> onnx.ModelProto:
    """A UNet graph with the float UNet's IO plus ``step_index`` int64 (): noise_pred = 0 * sample + "
    "step_index * 0.01."""
    inputs = [
        helper.make_tensor_value_info(
            t.name, TensorProto.FLOAT if t.dtype == "float32" else TensorProto.INT64, list(t.shape)
        )
        for t in spec.inputs
    ]
    out = spec.outputs[0]
    nodes = [
        helper.make_node("Mul", ["sample", "zero"], ["zeroed"]),
        helper.make_node("Mul", ["timestep", "zero"], ["t0"]),
        helper.make_node("ReduceSum", ["encoder_hidden_states"], ["e"], keepdims=0),
        helper.make_node("Mul", ["e", "zero"], ["e0"]),
        helper.make_node("Cast", ["step_index"], ["s"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["s", "scale"], ["s_scaled"]),
        helper.make_node("Add", ["s_scaled", "t0"], ["a"]),
        helper.make_node("Add", ["a", "e0"], ["b"]),
        helper.make_node("Add", ["zeroed", "b"], [out.name]),
    ]
    inits = [
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [STEP_SCALE]),
    ]
    graph = helper.make_graph(
        nodes,
        "step_index_unet",
        inputs,
        [helper.make_tensor_value_info(out.name, TensorProto.FLOAT, list(out.shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def with_step_index(src: Path, dst: Path, slots: list[float]) -> Path:
    """A copy of the float export ``src`` whose UNet takes ``step_index`` and whose manifest has ``slots``."""
    shutil.copytree(src, dst)
    specs = read_specs(dst)
    # The slots go into the UNet's IO spec too, as the Q/DQ exporter records them.
    specs["unet"] = specs["unet"].with_inputs(TensorSpec("step_index", "int64", ()), slots=[float(s) for s in slots])
    onnx.save_model(step_index_unet(specs["unet"]), str(dst / "unet.onnx"))
    (dst / "iospec.json").write_text(specs_to_json(specs))
    manifest = read_manifest(src)
    (dst / "manifest.json").unlink()
    write_manifest(
        dst,
        {k: v for k, v in manifest.items() if k not in ("files", "format", "version")}
        | {"target": "faithful", "slots": [float(s) for s in slots]},
    )
    return dst


def image_diff(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """(max |a - b| in levels, fraction of values that differ) of two uint8 image stacks."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float((d > 0).mean())
