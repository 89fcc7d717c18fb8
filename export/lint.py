"""TensorRT's explicit-quantization rules, checked on an ONNX graph without a GPU.

Rules (docs/export-targets.md, "TensorRT rules"; each violation names the node):

- ``zero-point``: every QuantizeLinear/DequantizeLinear has a zero point of 0 (or none).
- ``int8-container``: 8-bit activations are INT8, not UINT8 (TensorRT has no UINT8 Q/DQ).
- ``constant-scale``: scales (and zero points) are build-time constants (an initializer or a
  Constant node), never computed from inputs.
- ``per-tensor-activation``: a QuantizeLinear (an activation) has a scalar scale; only weights
  (DequantizeLinear of an initializer) may be per-channel or block-wise.
- ``q-then-dq``: a QuantizeLinear feeds DequantizeLinear nodes only.
- ``int4-weight-only``: INT4/UINT4 appears only as a block-wise (block 64 or 128, or per-channel)
  DequantizeLinear of a weight initializer that feeds a MatMul or Gemm.
- ``fp8`` (warning): FP8 Q/DQ needs Ada/Hopper; Jetson Orin (SM 8.7) and older GPUs refuse it.

Warnings (not failures): a Conv/MatMul/Gemm with a quantized weight whose data input is float
(TensorRT dequantizes the weight and runs the layer in float: correct, not an integer kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from common.errors import DGQError

INT4_TYPES = (TensorProto.INT4, TensorProto.UINT4)
FP8_TYPES = tuple(
    getattr(TensorProto, n)
    for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
    if hasattr(TensorProto, n)
)
GEMMS = ("MatMul", "Gemm")
PASS_THROUGH = ("Transpose", "Reshape", "Cast")  # allowed between a weight DQ and its GEMM


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str
    severity: str = "error"  # "error" fails the export, "warning" is reported

    def __str__(self) -> str:
        return f"[{self.rule}] node {self.node!r}: {self.message}"


class LintError(DGQError, ValueError):
    """A ``tensorrt``-target graph that breaks one of TensorRT's quantization rules."""

    def __init__(self, violations: list[Violation]):
        self.violations = violations
        shown = "\n  ".join(str(v) for v in violations[:10])
        more = f"\n  ... and {len(violations) - 10} more" if len(violations) > 10 else ""
        super().__init__(f"the graph breaks {len(violations)} TensorRT rule(s):\n  {shown}{more}")


class GraphIndex:
    """Producer and consumers of every tensor of a graph, and its build-time constants."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.init = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def constant(self, name: str) -> onnx.TensorProto | None:
        """The tensor behind ``name`` if it is a build-time constant (through the exporter's Identity
        nodes that stand for deduplicated initializers), else None."""
        while name not in self.init and (p := self.producer.get(name)) is not None and p.op_type == "Identity":
            name = p.input[0]
        if name in self.init:
            return self.init[name]
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return a.t
        return None

    def elem_type(self, name: str) -> int | None:
        t = self.constant(name)
        return None if t is None else t.data_type


def _name(n: onnx.NodeProto) -> str:
    return n.name or f"{n.op_type}->{n.output[0]}"


def feeds_gemm(g: GraphIndex, name: str, depth: int = 3) -> bool:
    """Whether tensor ``name`` reaches a MatMul/Gemm input directly or through up to ``depth`` of
    TensorRT's pass-through ops (a weight DQ feeding a GEMM)."""
    for c in g.consumers.get(name, []):
        if c.op_type in GEMMS:
            return True
        if depth and c.op_type in PASS_THROUGH and feeds_gemm(g, c.output[0], depth - 1):
            return True
    return False


def lint_tensorrt(model: onnx.ModelProto) -> list[Violation]:
    """Every rule violation (errors and warnings) of ``model``, in node order."""
    g = GraphIndex(model)
    out: list[Violation] = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        name = _name(n)
        scale = n.input[1]
        zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if g.constant(scale) is None:
            out.append(
                Violation(
                    "constant-scale", name, f"scale {scale!r} is computed in the graph, not a build-time constant"
                )
            )
        if zp is not None:
            zt = g.constant(zp)
            if zt is None:
                out.append(Violation("constant-scale", name, f"zero point {zp!r} is computed in the graph"))
            else:
                if np.any(numpy_helper.to_array(zt) != 0):
                    out.append(Violation("zero-point", name, "zero point is not 0 (TensorRT quantizes symmetrically)"))
                if zt.data_type == TensorProto.UINT8:
                    out.append(Violation("int8-container", name, "UINT8 Q/DQ; TensorRT takes INT8 only"))
                if zt.data_type in FP8_TYPES:
                    out.append(
                        Violation(
                            "fp8",
                            name,
                            "FP8 Q/DQ needs an Ada/Hopper GPU (SM >= 8.9); Jetson Orin and Ampere build INT8/FP16 only",
                            "warning",
                        )
                    )
        weight = n.op_type == "DequantizeLinear" and g.constant(n.input[0]) is not None
        st = g.constant(scale)
        if n.op_type == "QuantizeLinear":
            if st is not None and int(np.prod(st.dims)) != 1:
                out.append(
                    Violation(
                        "per-tensor-activation",
                        name,
                        f"activation scale has shape {list(st.dims)}; TensorRT quantizes activations per tensor",
                    )
                )
            bad = [c for c in g.consumers.get(n.output[0], []) if c.op_type != "DequantizeLinear"]
            if bad:
                out.append(
                    Violation(
                        "q-then-dq",
                        name,
                        f"QuantizeLinear feeds {bad[0].op_type} {_name(bad[0])!r}, not a DequantizeLinear",
                    )
                )
        elif not weight and st is not None and int(np.prod(st.dims)) != 1:
            out.append(Violation("per-tensor-activation", name, f"activation DQ scale has shape {list(st.dims)}"))
        etype = g.elem_type(n.input[0]) if weight else None
        zt_type = g.elem_type(zp) if zp is not None else None
        if etype in INT4_TYPES or zt_type in INT4_TYPES:
            block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
            if not weight:
                out.append(
                    Violation("int4-weight-only", name, "INT4 on an activation; TensorRT has INT4 weight-only GEMMs")
                )
            elif not feeds_gemm(g, n.output[0]):
                out.append(
                    Violation(
                        "int4-weight-only", name, "INT4 weight does not feed a MatMul/Gemm (convs take INT8 weights)"
                    )
                )
            elif block not in (0, 64, 128):
                out.append(Violation("int4-weight-only", name, f"INT4 block size {block}; TensorRT takes 64 or 128"))
    for n in model.graph.node:
        if n.op_type not in ("Conv", *GEMMS) or len(n.input) < 2:
            continue
        w, x = n.input[1], n.input[0]
        wp, xp = g.producer.get(w), g.producer.get(x)
        while wp is not None and wp.op_type in PASS_THROUGH:
            wp = g.producer.get(wp.input[0])
        w_quant = wp is not None and wp.op_type == "DequantizeLinear"
        x_quant = xp is not None and xp.op_type == "DequantizeLinear"
        if w_quant and not x_quant:
            out.append(
                Violation(
                    "float-input",
                    _name(n),
                    "quantized weight with a float input: runs in float (expected for a float outlier branch)",
                    "warning",
                )
            )
    return out


def check_tensorrt(model: onnx.ModelProto) -> list[Violation]:
    """Raise :class:`LintError` naming every rule the graph breaks; return the warnings."""
    found = lint_tensorrt(model)
    errors = [v for v in found if v.severity == "error"]
    if errors:
        raise LintError(errors)
    return [v for v in found if v.severity == "warning"]
