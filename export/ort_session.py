"""ONNX Runtime session options under which a Q/DQ graph computes what its nodes say.

With graph optimizations on, ONNX Runtime's CPU provider replaces Q/DQ node units by fused integer
kernels (QLinearConv, MatMulIntegerToFloat). Their integer arithmetic is exact on CPUs whose int8
dot product accumulates in 32 bits (x86 with AVX512-VNNI, AVX-VNNI or AMX; ARM). On x86 CPUs
without VNNI (AVX2, AVX512 before Cascade Lake) ONNX Runtime's default u8 x s8 kernels multiply
with ``vpmaddubsw``, which adds two adjacent products in a *saturating* int16: with uint8
activations near 255 and int8 weights near +-127 the pair sum (up to 64,770) clips at 32,767, and
the layer computes another function than its graph (seen on an emulated Haswell: 23% relative error
on a single MatMul, 70% of a QLinearConv's outputs off by more than one output step). ONNX Runtime
has an exact path for those CPUs (``session.x64quantprecision``), 2-4x slower where VNNI exists,
so it is switched on only where a probe finds the fast path saturating.

``session_options`` / ``create_session`` are what every session of the project uses (runtime,
parity checks, benchmarks); ``integer_kernels_saturate`` is the probe.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

log = logging.getLogger(__name__)

# ONNX Runtime's exact u8/s8 GEMM path on x86 CPUs without VNNI (session config key).
PRECISION_MODE_KEY = "session.x64quantprecision"
# ORT rewrites DQ -> MatMul into MatMulNBits, whose default accuracy level 4 quantizes the activations
# too; level 0 keeps the graph's own semantics.
MATMULNBITS_ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
# Q/DQ node units stay as written (float arithmetic on quantized values) while other fusions run.
DISABLE_QDQ_FUSION_KEY = "session.disable_quant_qdq"

# Probe: every adjacent pair of products is 255 * 127 * 2 = 64,770, beyond int16.
_PROBE_K, _PROBE_ROWS, _PROBE_COLS = 64, 8, 16


def probe_model(activation: str, conv: bool) -> bytes:
    """A Q/DQ unit that ONNX Runtime fuses into an integer kernel: ``activation`` "u8" or "s8",
    int8 weights of 127 everywhere, unit scales; a MatMul (-> MatMulIntegerToFloat) or a 1x1 Conv
    with a quantized output (-> QLinearConv)."""
    from onnx import TensorProto, helper, numpy_helper

    zp = np.array(0, np.uint8 if activation == "u8" else np.int8)
    w_shape = (_PROBE_COLS, _PROBE_K, 1, 1) if conv else (_PROBE_K, _PROBE_COLS)
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(zp, "zp"),
        numpy_helper.from_array(np.full(w_shape, 127, np.int8), "w"),
        numpy_helper.from_array(np.array(0, np.int8), "wzp"),
        # output grid of the conv: one step per 2^16 so that the exact result is representable
        numpy_helper.from_array(np.array(2.0**16, np.float32), "ys"),
        numpy_helper.from_array(np.array(0, np.uint8), "yzp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "one", "zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "one", "wzp"], ["wd"]),
    ]
    if conv:
        nodes += [
            helper.make_node("Conv", ["xd", "wd"], ["acc"]),
            helper.make_node("QuantizeLinear", ["acc", "ys", "yzp"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "ys", "yzp"], ["y"]),
        ]
        x_shape = [1, _PROBE_K, _PROBE_ROWS, 1]
    else:
        nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"]))
        x_shape = [_PROBE_ROWS, _PROBE_K]
    graph = helper.make_graph(
        nodes,
        "saturation_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    # IR 10 (opset 21's) rather than the installed onnx's newest, which an older ONNX Runtime refuses
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10).SerializeToString()


def probe_errors(precision_mode: bool = False) -> dict[str, float]:
    """Relative error of each fused probe unit against its exact integer result on this CPU:
    ``{"u8 MatMul": e, "s8 MatMul": e, "u8 QLinearConv": e}``; 0.0 where the kernel is exact."""
    import onnxruntime as ort

    out = {}
    for activation in ("u8", "s8"):
        top = 255.0 if activation == "u8" else 127.0
        for conv in (False, True) if activation == "u8" else (False,):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.intra_op_num_threads = 1
            so.log_severity_level = 3
            so.add_session_config_entry(PRECISION_MODE_KEY, "1" if precision_mode else "0")
            session = ort.InferenceSession(probe_model(activation, conv), so, providers=["CPUExecutionProvider"])
            shape = [1, _PROBE_K, _PROBE_ROWS, 1] if conv else [_PROBE_ROWS, _PROBE_K]
            y = session.run(None, {"x": np.full(shape, top, np.float32)})[0].astype(np.float64)
            exact = top * 127.0 * _PROBE_K
            if conv:  # the exact sum on the output grid (2^16 steps)
                exact = np.round(exact / 2.0**16) * 2.0**16
            out[f"{activation} {'QLinearConv' if conv else 'MatMul'}"] = float(np.abs(y - exact).max() / exact)
    return out


@functools.cache
def integer_kernels_saturate() -> bool:
    """Whether ONNX Runtime's fast integer kernels on this CPU saturate int8 products (x86 without
    VNNI). Probed once per process (a few milliseconds). A probe that cannot run counts as
    saturating: the exact path is only slower."""
    try:
        errors = probe_errors()
    except Exception as err:  # an ONNX Runtime that refuses the probe graph
        log.warning("could not probe ONNX Runtime's integer kernels (%s); using its exact path", err)
        return True
    saturate = any(e > 1e-6 for e in errors.values())
    if saturate:
        log.info(
            "ONNX Runtime's fast int8 kernels saturate on this CPU (x86 without VNNI: %s); Q/DQ graphs run on "
            "its exact integer path (%s=1), which is slower",
            ", ".join(f"{k} off by {v:.0%}" for k, v in errors.items() if v > 1e-6),
            PRECISION_MODE_KEY,
        )
    return saturate


def session_options(optimize: bool = True, threads: int | None = 1, integer_fusion: bool = True):
    """``onnxruntime.SessionOptions`` for a graph of this project on the CPU provider.

    ``optimize``: graph optimizations on (integer kernels) or off (every node as written);
    ``threads``: intra-op threads (None: ONNX Runtime's default); ``integer_fusion=False`` keeps the
    other optimizations but no Q/DQ fusion. MatMulNBits stays at accuracy level 0, and on CPUs whose
    fast integer kernels saturate the exact path is selected, so that the optimized graph computes
    the same function as the unoptimized one (up to float32 rounding).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    so.add_session_config_entry(MATMULNBITS_ACCURACY_KEY, "0")
    if not integer_fusion:
        so.add_session_config_entry(DISABLE_QDQ_FUSION_KEY, "1")
    elif optimize and integer_kernels_saturate():
        so.add_session_config_entry(PRECISION_MODE_KEY, "1")
    return so


# What ONNX Runtime's exact path (its int8 -> uint8 weight conversion) says of a shared zero point.
EXACT_PATH_REFUSAL = "Attempt to replace the existing tensor"


def create_session(model, optimize: bool = True, threads: int | None = 1, providers: list[str] | None = None):
    """An ``onnxruntime.InferenceSession`` of ``model`` (a path or serialized bytes) with
    ``session_options``. ONNX Runtime's exact path rejects graphs whose integer zero points are
    shared between weights (exports written before each weight got its own); such a graph runs with
    the Q/DQ fusions off instead (float arithmetic on the quantized values: exact, slower), with a
    warning."""
    import onnxruntime as ort

    providers = providers or ["CPUExecutionProvider"]
    model = str(model) if not isinstance(model, bytes) else model
    so = session_options(optimize, threads)
    try:
        return ort.InferenceSession(model, so, providers=providers)
    except Exception as err:  # ORT raises its own Fail type; retried only for the exact path's refusal
        if not (optimize and integer_kernels_saturate() and EXACT_PATH_REFUSAL in str(err)):
            raise
        log.warning(
            "ONNX Runtime's exact integer path refused this graph (%s); running it with Q/DQ fusions off "
            "(correct, slower). Re-export it to run integer kernels on this CPU.",
            str(err).splitlines()[0][-120:],
        )
        return ort.InferenceSession(model, session_options(optimize, threads, False), providers=providers)
