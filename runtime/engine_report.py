"""What TensorRT made of a graph: per-layer precision and which GEMM/conv layers consume Q/DQ inputs.

Two sources, best first:
- the engine inspector (``ProfilingVerbosity.DETAILED`` + ``engine.create_engine_inspector()``), which
  shows the kernels TensorRT chose. It needs a deserialized engine, and deserializing needs a CUDA
  device (TensorRT-RTX 1.7 on a CPU-only machine fails with cudaError 35), so it runs only where a GPU
  is visible;
- the parsed network (always available): per layer type counts, and for every Conv/MatMul the dtype
  of the DequantizeLayer that feeds each input. This shows what the graph *asks* for (INT8 W8A8, INT4
  weight-only, FP8), not the kernels chosen; TensorRT-RTX, for one, runs INT8 activations in FP16.

The network walk takes a TensorRT ``INetworkDefinition`` and the TensorRT module; nothing else.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

# Layer types whose inputs TensorRT's explicit quantization fuses Q/DQ into.
COMPUTE_TYPES = ("CONVOLUTION", "DECONVOLUTION", "MATRIX_MULTIPLY", "FULLY_CONNECTED")
# Layers a DQ output may pass through on its way to a GEMM (the ONNX parser adds broadcasts and
# transposes of weights) without changing what the GEMM reads.
_PASS_THROUGH = ("SHUFFLE", "IDENTITY")
# TensorRT DataType name -> the name the report uses.
QUANT_DTYPES = {"INT8": "INT8", "INT4": "INT4", "FP8": "FP8", "FP4": "FP4", "UINT8": "UINT8"}


def _name(enum_value: Any) -> str:
    return str(enum_value).rsplit(".", 1)[-1]


def _producers(network) -> dict[str, Any]:
    out = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            out[layer.get_output(j).name] = layer
    return out


def _quant_dtype(tensor, producers: Mapping[str, Any]) -> str | None:
    """The quantized dtype (INT8/INT4/FP8...) a tensor was dequantized from, or None for a float tensor."""
    layer = producers.get(tensor.name)
    for _ in range(8):  # a short chain of broadcasts/transposes at most
        if layer is None:
            return None
        kind = _name(layer.type)
        if kind == "DEQUANTIZE":
            return QUANT_DTYPES.get(_name(layer.get_input(0).dtype), _name(layer.get_input(0).dtype))
        if kind not in _PASS_THROUGH or layer.get_input(0) is None:
            return None
        layer = producers.get(layer.get_input(0).name)
    return None


# Names TensorRT's ONNX parser gives the layers it adds itself (casts of int64 indices, broadcast
# shuffles, constants holding Q/DQ scales, shape-tensor helpers), not ONNX nodes of the graph.
_PARSER_PREFIXES = ("ONNXTRT_", "tmp_weight", "(Unnamed Layer")


def _origin(name: str) -> str:
    """Where a network layer comes from: ``parser`` (added by the ONNX parser), ``attention`` (an
    attention block's own ops: diffusers' ``attn1``/``attn2`` scopes, not their q/k/v/out
    projections) or ``graph`` (any other ONNX node)."""
    if name.startswith(_PARSER_PREFIXES):
        return "parser"
    parts = name.split("/")
    scoped = any(p.startswith("attn") and p[4:].isdigit() for p in parts[:-1])
    if scoped and not any(p.startswith(("to_q", "to_k", "to_v", "to_out")) for p in parts):
        return "attention"
    return "graph"


def _scheme(activation: str | None, weight: str | None) -> str | None:
    """One label per quantized GEMM: 'INT8' (W8A8), 'INT4 weights', 'FP8', 'INT8 weights', 'INT8 activations'."""
    if activation is None and weight is None:
        return None
    if activation is None:
        return f"{weight} weights"
    if weight is None:
        return f"{activation} activations"
    return activation if activation == weight else f"W{weight}/A{activation}"


def network_report(network) -> dict[str, Any]:
    """Layer type counts, each Conv/MatMul's input precisions and quantization scheme, and a summary line.

    ``layer_origins`` counts layers by where they come from (``_origin``: parser-added, attention
    ops, other graph nodes). ``layers`` lists every compute layer:
    ``{"name", "type", "inputs": [{"name", "dtype", "dequantized_from"}],
    "scheme"}`` where input 0 is the activation and input 1 the weight.
    """
    producers = _producers(network)
    types: Counter[str] = Counter()
    origins: Counter[str] = Counter()
    qdq_dtypes: Counter[str] = Counter()
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = _name(layer.type)
        types[kind] += 1
        origins[_origin(layer.name)] += 1
        if kind in ("QUANTIZE", "DEQUANTIZE"):
            side = layer.get_output(0) if kind == "QUANTIZE" else layer.get_input(0)
            qdq_dtypes[_name(side.dtype)] += 1
        if kind not in COMPUTE_TYPES:
            continue
        inputs = []
        for j in range(layer.num_inputs):
            t = layer.get_input(j)
            if t is None:
                continue
            inputs.append({"name": t.name, "dtype": _name(t.dtype), "dequantized_from": _quant_dtype(t, producers)})
        act = inputs[0]["dequantized_from"] if inputs else None
        weight = inputs[1]["dequantized_from"] if len(inputs) > 1 else None
        layers.append({"name": layer.name, "type": kind, "inputs": inputs, "scheme": _scheme(act, weight)})
    schemes = Counter(layer["scheme"] for layer in layers if layer["scheme"])
    n_quant = sum(schemes.values())
    n_float = len(layers) - n_quant
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(schemes.items()))
    summary = (
        f"{n_quant} of {len(layers)} Conv/MatMul layers quantized"
        + (f" ({detail})" if detail else "")
        + f", {n_float} float"
    )
    return {
        "source": "parsed network (the graph's Q/DQ; not the kernels TensorRT chose)",
        "num_layers": network.num_layers,
        "layer_types": dict(sorted(types.items())),
        "layer_origins": dict(sorted(origins.items())),
        "qdq_dtypes": dict(sorted(qdq_dtypes.items())),
        "quantized": {"total": n_quant, "float": n_float, "by_scheme": dict(sorted(schemes.items()))},
        "summary": summary,
        "layers": layers,
    }


def uses_fp8(report: Mapping[str, Any]) -> bool:
    return any(k in ("FP8",) for k in report["qdq_dtypes"])


def inspect_engine(trt, plan, logger) -> dict[str, Any]:
    """The engine inspector's JSON (needs a CUDA device to deserialize the plan); raises RuntimeError if it cannot."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeError("deserialize_cuda_engine returned None (see the TensorRT log above)")
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return {"source": "engine inspector", "num_layers": len(info.get("Layers", [])), "engine_information": info}


def format_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """A short table: component, engine size, build seconds, quantized/float GEMM counts, the summary."""
    rows = [("component", "engine MB", "build s", "layers", "quantized", "float", "schemes")]
    for comp, rep in reports.items():
        net = rep["network"]
        schemes = ", ".join(f"{k}: {v}" for k, v in net["quantized"]["by_scheme"].items()) or "-"
        rows.append(
            (
                comp,
                f"{rep['engine_bytes'] / 1e6:.1f}",
                f"{rep['build_seconds']:.1f}",
                str(net["num_layers"]),
                str(net["quantized"]["total"]),
                str(net["quantized"]["float"]),
                schemes,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
