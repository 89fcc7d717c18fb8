"""Small hand-built Q/DQ ONNX graphs in the forms TensorRT's explicit quantization takes.

They stand in for the Q/DQ exporter's output in builder tests: symmetric INT8 (zero point 0,
constant scales) on both inputs of a Conv and of a MatMul, and INT4 block-wise weight-only
DequantizeLinear (opset 21, axis 0) feeding a MatMul.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.iospec import Dim, NetworkSpec, TensorSpec, specs_to_json
from export.manifest import write_manifest

OPSET = 21


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _qdq(x: str, scale: float, prefix: str, nodes: list, inits: list, dtype=TensorProto.INT8) -> str:
    """Symmetric per-tensor Q -> DQ on tensor ``x``; returns the dequantized tensor's name."""
    inits += [
        _const(f"{prefix}_scale", np.array(scale, np.float32)),
        helper.make_tensor(f"{prefix}_zp", dtype, [], [0]),
    ]
    nodes += [
        helper.make_node("QuantizeLinear", [x, f"{prefix}_scale", f"{prefix}_zp"], [f"{prefix}_q"], name=f"{prefix}_Q"),
        helper.make_node(
            "DequantizeLinear",
            [f"{prefix}_q", f"{prefix}_scale", f"{prefix}_zp"],
            [f"{prefix}_dq"],
            name=f"{prefix}_DQ",
        ),
    ]
    return f"{prefix}_dq"


def int8_conv_matmul(path: Path, channels: int = 16, hidden: int = 64, seed: int = 0) -> Path:
    """x (B, C, 8, 8) -> Q/DQ -> Conv(Q/DQ weight) -> Reshape (B, 64, C) -> Q/DQ -> MatMul(Q/DQ weight) -> y."""
    rng = np.random.default_rng(seed)
    nodes: list = []
    inits: list = []
    x_dq = _qdq("x", 0.02, "x", nodes, inits)
    w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32) * 0.1
    inits.append(_const("conv_w", w))
    w_dq = _qdq("conv_w", float(np.abs(w).max() / 127), "conv_w", nodes, inits)
    nodes.append(helper.make_node("Conv", [x_dq, w_dq], ["conv_out"], name="conv", pads=[1, 1, 1, 1]))
    inits.append(_const("shape", np.array([0, channels, 64], np.int64)))
    nodes.append(helper.make_node("Reshape", ["conv_out", "shape"], ["flat"], name="reshape"))
    nodes.append(helper.make_node("Transpose", ["flat"], ["tokens"], name="transpose", perm=[0, 2, 1]))
    t_dq = _qdq("tokens", 0.05, "tokens", nodes, inits)
    m = rng.standard_normal((channels, hidden)).astype(np.float32) * 0.1
    inits.append(_const("fc_w", m))
    m_dq = _qdq("fc_w", float(np.abs(m).max() / 127), "fc_w", nodes, inits)
    nodes.append(helper.make_node("MatMul", [t_dq, m_dq], ["y"], name="fc"))
    graph = helper.make_graph(
        nodes,
        "int8_conv_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64, hidden])],
        inits,
    )
    return _save(graph, path)


def int4_weight_matmul(path: Path, k: int = 128, n: int = 64, block: int = 64, seed: int = 0) -> Path:
    """x (B, 16, K) float -> MatMul with an INT4 block-wise (axis 0, ``block`` rows) dequantized weight (K, N) -> y."""
    if k % block:
        raise ValueError(f"K={k} must be a multiple of the block size {block}")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.1
    blocks = w.reshape(k // block, block, n)
    scale = (np.abs(blocks).max(axis=1) / 7).astype(np.float32)  # (K/block, N)
    q = np.clip(np.round(blocks / scale[:, None, :]), -8, 7).reshape(k, n).astype(np.int8)
    w_q = helper.make_tensor("fc_w_q", TensorProto.INT4, [k, n], q.flatten().tolist())
    nodes = [
        helper.make_node(
            "DequantizeLinear", ["fc_w_q", "fc_w_scale"], ["fc_w_dq"], name="fc_w_DQ", axis=0, block_size=block
        ),
        helper.make_node("MatMul", ["x", "fc_w_dq"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "int4_weight_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, n])],
        [w_q, _const("fc_w_scale", scale)],
    )
    return _save(graph, path)


def fp8_matmul(path: Path, k: int = 32, n: int = 32, seed: int = 0) -> Path:
    """x (B, 16, K) -> FP8 E4M3 Q/DQ -> MatMul(FP8 Q/DQ weight) -> y: what Jetson Orin (SM 8.7) cannot run."""
    rng = np.random.default_rng(seed)
    nodes: list = []
    inits: list = []
    x_dq = _qdq("x", 0.01, "x", nodes, inits, dtype=TensorProto.FLOAT8E4M3FN)
    inits.append(_const("fc_w", rng.standard_normal((k, n)).astype(np.float32) * 0.1))
    w_dq = _qdq("fc_w", 0.001, "fc_w", nodes, inits, dtype=TensorProto.FLOAT8E4M3FN)
    nodes.append(helper.make_node("MatMul", [x_dq, w_dq], ["y"], name="fc"))
    graph = helper.make_graph(
        nodes,
        "fp8_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, n])],
        inits,
    )
    return _save(graph, path)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    onnx.save(model, path)
    return path


# name -> (graph writer, input shape after batch, output shape after batch)
GRAPHS = {
    "int8": (int8_conv_matmul, (16, 8, 8), (64, 64)),
    "int4": (int4_weight_matmul, (16, 128), (16, 64)),
    "fp8": (fp8_matmul, (16, 32), (16, 32)),
}
# A stand-in for the recipe file a quantized export carries (the builder records its hash, never reads it).
FAKE_RECIPE = b"stand-in for recipe.safetensors"
FAKE_RECIPE_SHA256 = hashlib.sha256(FAKE_RECIPE).hexdigest()


def export_folder(folder: Path, kind: str) -> Path:
    """An export folder (``unet.onnx``, ``iospec.json``, ``manifest.json``, target tensorrt) around one graph."""
    writer, in_shape, out_shape = GRAPHS[kind]
    folder = Path(folder)
    folder.mkdir(parents=True)
    writer(folder / "unet.onnx")
    spec = NetworkSpec(
        "unet",
        inputs=(TensorSpec("x", "float32", ("batch", *in_shape)),),
        outputs=(TensorSpec("y", "float32", ("batch", *out_shape)),),
        dims={"batch": Dim(1, 2, 4)},
    )
    (folder / "iospec.json").write_text(specs_to_json({"unet": spec}))
    (folder / "recipe.safetensors").write_bytes(FAKE_RECIPE)
    write_manifest(
        folder,
        {
            "target": "tensorrt",
            "components": ["unet"],
            "recipe": {"file": "recipe.safetensors", "sha256": FAKE_RECIPE_SHA256, "config": {}},
        },
    )
    return folder
