"""ONNX Runtime's fused integer kernels compute what a Q/DQ graph says, on every x86 kernel path.

The native CPU exercises one path; the QEMU tests run the same checks on emulated CPUs whose
CPUID makes ONNX Runtime select its AVX2 kernels (which saturate int16 pair sums) and its SSE4.1
kernels, so that no test's verdict depends on the machine CI happens to run on.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.ort_session import (
    create_session,
    integer_kernels_saturate,
    probe_errors,
    probe_model,
    session_options,
)
from tests.tolerances import FUSED_KERNEL_MAX_REL_ERR, QDQ_OUTPUT_FLIP_MAX_FRACTION

ROOT = Path(__file__).resolve().parents[2]


def qdq_unit(kind: str, seed: int = 0) -> tuple[bytes, np.ndarray, float | None]:
    """``(model, input, output step)`` of one Q/DQ unit that ONNX Runtime fuses, with full-range
    int8 weights (per output channel) and activations that fill their grid.

    ``kind``: "u8 MatMul" (asymmetric uint8 activations, the onnxruntime target's Linear),
    "s8 MatMul" (symmetric int8, the tensorrt target's) or "u8 QLinearConv" (a 3x3 conv with a
    quantized output, the onnxruntime target's conv branch; output step returned)."""
    rng = np.random.default_rng(seed)
    k, n = 64, 32
    act, op = kind.split()
    conv = op == "QLinearConv"
    zp = np.array(128, np.uint8) if act == "u8" else np.array(0, np.int8)
    w = rng.integers(-127, 128, (n, k, 3, 3) if conv else (k, n)).astype(np.int8)
    w_scale = rng.uniform(0.005, 0.02, n).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(zp, "xz"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(w_scale, "ws"),
        numpy_helper.from_array(np.zeros(n, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0 if conv else 1),
    ]
    step = None
    if conv:
        step = 0.5
        inits += [
            numpy_helper.from_array(np.array(step, np.float32), "ys"),
            numpy_helper.from_array(np.array(128, np.uint8), "yz"),
        ]
        nodes += [
            helper.make_node("Conv", ["xd", "wd"], ["acc"], pads=[1, 1, 1, 1]),
            helper.make_node("QuantizeLinear", ["acc", "ys", "yz"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"]),
        ]
        shape = [2, k, 8, 8]
    else:
        nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"]))
        shape = [2, 128, k]
    graph = helper.make_graph(
        nodes,
        "unit",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
    x = (rng.integers(-128, 128, shape) * 0.05).astype(np.float32)  # every activation level, extremes included
    return model, x, step


UNITS = ("u8 MatMul", "s8 MatMul", "u8 QLinearConv")


def unit_errors() -> dict[str, dict[str, float]]:
    """Per unit, the project's sessions with optimizations on against off: the largest error
    relative to the output's range, and (QLinearConv) the fraction of outputs that moved at all
    and the largest move in output steps."""
    out = {}
    for kind in UNITS:
        model, x, step = qdq_unit(kind)
        off = create_session(model, optimize=False).run(None, {"x": x})[0].astype(np.float64)
        on = create_session(model, optimize=True).run(None, {"x": x})[0].astype(np.float64)
        err = np.abs(on - off)
        row = {"rel": float(err.max() / np.abs(off).max())}
        if step is not None:
            row["moved"] = float((err > 1e-6).mean())
            row["max_steps"] = float(err.max() / step)
        out[kind] = row
    return out


def check_units(errors: dict[str, dict[str, float]]) -> None:
    for kind, row in errors.items():
        if "max_steps" in row:  # float32 sum order may move a value on an output rounding edge by one step
            assert row["max_steps"] <= 1.0 + 1e-6, (kind, row)
            assert row["moved"] <= QDQ_OUTPUT_FLIP_MAX_FRACTION, (kind, row)
        else:  # exact integer GEMM, then a float32 scale: rounding only
            assert row["rel"] <= FUSED_KERNEL_MAX_REL_ERR, (kind, row)


def test_fused_units_compute_the_graph_on_this_cpu():
    check_units(unit_errors())


def test_the_probe_finds_what_the_fused_kernels_do_on_this_cpu():
    """Whatever this CPU is: the probe says "saturates" exactly when a default-option fused unit is
    wrong, and the project's options make every probe unit exact."""
    default = probe_errors(precision_mode=False)
    assert integer_kernels_saturate() == any(e > 1e-6 for e in default.values()), default
    for kind in ("u8", "s8"):
        for conv in (False, True) if kind == "u8" else (False,):
            top = 255.0 if kind == "u8" else 127.0
            shape = [1, 64, 8, 1] if conv else [8, 64]
            y = create_session(probe_model(kind, conv)).run(None, {"x": np.full(shape, top, np.float32)})[0]
            exact = top * 127 * 64
            exact = np.round(exact / 2.0**16) * 2.0**16 if conv else exact
            assert np.array_equal(y.astype(np.float64), np.full_like(y, exact, dtype=np.float64)), (kind, conv)


def test_session_options_keep_matmulnbits_exact_and_threads():
    so = session_options(optimize=False, threads=1)
    assert so.get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "0"
    assert so.intra_op_num_threads == 1
    assert session_options(integer_fusion=False).get_session_config_entry("session.disable_quant_qdq") == "1"


def _under_qemu(cpu: str, code: str) -> dict:
    qemu = shutil.which("qemu-x86_64")
    if platform.machine() != "x86_64" or qemu is None:
        pytest.skip("needs an x86_64 machine with qemu-x86_64 (apt-get install qemu-user)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [qemu, "-cpu", cpu, sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_QEMU_CODE = (
    "import json; from export.ort_session import probe_errors, integer_kernels_saturate; "
    "from tests.export.test_ort_session import unit_errors; "
    "print(json.dumps({'default': probe_errors(False), 'saturates': integer_kernels_saturate(), "
    "'units': unit_errors()}))"
)


@pytest.mark.slow
def test_avx2_kernels_saturate_and_the_project_runs_them_exactly():
    """Emulated Haswell (AVX2, no VNNI): ONNX Runtime's default u8/s8 kernels saturate (this also
    proves the emulation reached another kernel path than a VNNI host's), the probe sees it, and the
    project's sessions compute every unit as its graph says."""
    got = _under_qemu("Haswell-v4", _QEMU_CODE)
    assert got["saturates"], got
    assert min(got["default"].values()) > 0.1, got["default"]
    check_units(got["units"])


@pytest.mark.slow
def test_sse_kernels_are_exact():
    """Emulated Nehalem (SSE4.2): ONNX Runtime's 16-bit kernels do not saturate; nothing to switch."""
    got = _under_qemu("Nehalem-v2", _QEMU_CODE)
    assert not got["saturates"], got
    assert max(got["default"].values()) == 0.0, got["default"]
    check_units(got["units"])


def _shared_zero_point_graph() -> bytes:
    """Two int8 weight DQs and an activation Q/DQ that all read one zero-point initializer (what the
    exporter's deduplication of equal initializers makes)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(0, np.int8), "z"),
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(rng.integers(-127, 128, (16, 8)).astype(np.int8), "w1"),
        numpy_helper.from_array(rng.integers(-127, 128, (8, 4)).astype(np.int8), "w2"),
        numpy_helper.from_array(np.array(0.01, np.float32), "ws"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w1", "ws", "z"], ["w1d"]),
        helper.make_node("MatMul", ["xd", "w1d"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["hd"]),
        helper.make_node("DequantizeLinear", ["w2", "ws", "z"], ["w2d"]),
        helper.make_node("MatMul", ["hd", "w2d"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10).SerializeToString()


def _exact_path_session(model: bytes):
    import onnxruntime as ort

    from export.ort_session import PRECISION_MODE_KEY

    so = session_options(optimize=True)
    if not integer_kernels_saturate():  # a VNNI CPU: select the exact path anyway
        so.add_session_config_entry(PRECISION_MODE_KEY, "1")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def test_every_weight_owns_its_zero_point_so_the_exact_path_accepts_the_graph():
    import onnx

    from export.ort_session import EXACT_PATH_REFUSAL
    from export.qdq_export import own_weight_initializers

    model = _shared_zero_point_graph()
    with pytest.raises(Exception, match=EXACT_PATH_REFUSAL):
        _exact_path_session(model)
    m = onnx.load_from_string(model)
    assert own_weight_initializers(m) == 2
    weight_dqs = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w")]
    others = {i for n in m.graph.node if n not in weight_dqs for i in n.input}
    zps = [n.input[2] for n in weight_dqs]
    assert len(set(zps)) == 2 and not set(zps) & others
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    fixed = m.SerializeToString()
    got = _exact_path_session(fixed).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, create_session(fixed, optimize=False).run(None, {"x": x})[0], rtol=1e-5)


def test_dequantizers_without_zero_points_run_as_with_them():
    """The tensorrt target drops all-zero DequantizeLinear zero points (optional in ONNX): ONNX Runtime,
    fused, unfused and on its exact integer path, computes what it computed with them."""
    import onnx

    from export.qdq_export import drop_zero_points, own_weight_initializers

    m = onnx.load_from_string(_shared_zero_point_graph())
    own_weight_initializers(m)
    with_zp = m.SerializeToString()
    assert drop_zero_points(m) == 4
    assert all(len(n.input) == 2 for n in m.graph.node if n.op_type == "DequantizeLinear")
    assert all(len(n.input) == 3 for n in m.graph.node if n.op_type == "QuantizeLinear")  # int8 output type
    assert {t.name for t in m.graph.initializer} == {"z", "s", "w1", "w2", "ws"}  # the copies went unread
    without = m.SerializeToString()
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    ref = create_session(with_zp, optimize=False).run(None, {"x": x})[0]
    for got in (
        create_session(without, optimize=False).run(None, {"x": x})[0],
        create_session(without, optimize=True).run(None, {"x": x})[0],
        _exact_path_session(without).run(None, {"x": x})[0],
    ):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_identity_reads_are_bypassed():
    import onnx

    from export.qdq_export import bypass_identities

    inits = [numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "t")]
    nodes = [
        helper.make_node("Identity", ["t"], ["t1"]),
        helper.make_node("Identity", ["t1"], ["t2"]),
        helper.make_node("Add", ["x", "t2"], ["y"]),
        helper.make_node("Identity", ["y"], ["out"]),  # a graph output: stays
    ]
    graph = helper.make_graph(
        nodes,
        "ids",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    before = model.SerializeToString()
    assert bypass_identities(model) == 2
    assert [n.op_type for n in model.graph.node] == ["Add", "Identity"]
    assert list(model.graph.node[0].input) == ["x", "t"]
    onnx.checker.check_model(model)
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(
        create_session(model.SerializeToString(), optimize=False).run(None, {"x": x})[0],
        create_session(before, optimize=False).run(None, {"x": x})[0],
    )


def test_only_the_exact_paths_refusal_falls_back_to_unfused_qdq(monkeypatch):
    import onnxruntime as ort

    import export.ort_session as osess

    monkeypatch.setattr(osess, "integer_kernels_saturate", lambda: True)
    real = ort.InferenceSession
    seen = []

    def refusing(model, so, providers):
        seen.append("first" if not seen else so.get_session_config_entry(osess.DISABLE_QDQ_FUSION_KEY))
        if len(seen) == 1:
            raise RuntimeError(f"[ONNXRuntimeError] : 1 : FAIL : {osess.EXACT_PATH_REFUSAL}")
        return real(model, so, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", refusing)
    session = osess.create_session(probe_model("u8", False))
    assert seen == ["first", "1"] and session.get_inputs()[0].name == "x"
    monkeypatch.setattr(ort, "InferenceSession", real)
    with pytest.raises(Exception, match=r"(?i)protobuf|parse|invalid"):  # any other failure surfaces
        osess.create_session(b"not a model")
