"""scripts/benchmark_onnx.py's table: recorded results render as before, an OpenVINO row adds the
column against the faster float runtime; scripts/graph_quality.py's fused-attention rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.benchmark_onnx import FUSED, OPENVINO_ROW, export_jobs, markdown
from tests.tolerances import QDQ_ORT_TARGET_GRAPH_MIN_SQNR_DB

REPO = Path(__file__).resolve().parents[1]


def _row(ms: float, vs: float, best: float | None = None) -> dict:
    row = {"median_ms": ms, "bytes": 2**20, "size_vs_float": 1.0, "speedup_vs_float": vs}
    row["integer_kernels_after_optimization"] = {}
    if best is not None:
        row["speedup_vs_best_float"] = best
    return row


def test_results_without_openvino_render_without_its_column():
    result = {"wbits": 4, "results": {"float": _row(100, 1.0), "faithful": _row(50, 2.0)}}
    lines = markdown(result).splitlines()
    assert "vs best float" not in lines[0] and lines[1].count("---") == 6
    assert lines[2].startswith("| float32 | 100 ms | 1.00x") and lines[3].startswith("| faithful W4A8 | 50 ms | 2.00x")


def test_recorded_results_render():
    for name in ("benchmark_onnx_sdshape_w8.json", "benchmark_onnx_sdshape_w4.json"):
        table = markdown(json.loads((REPO / "results" / name).read_text()))
        assert table.splitlines()[2].startswith("| float32 |")


def test_openvino_row_adds_the_best_float_column():
    result = {
        "wbits": 8,
        "results": {"float": _row(100, 1.0, 0.8), OPENVINO_ROW: _row(80, 1.25, 1.0), "faithful": _row(50, 2.0, 1.6)},
    }
    lines = markdown(result).splitlines()
    assert lines[0].endswith("| vs best float |") and lines[1].count("---") == 7
    assert lines[3].startswith(f"| {OPENVINO_ROW} | 80 ms | 1.25x") and lines[3].endswith("| 1.00x |")
    assert lines[4].startswith("| faithful W8A8 |") and lines[4].endswith("| 1.60x |")


def test_fused_attention_twins_the_float_and_onnxruntime_rows_and_counts_as_float():
    """--fused-attention: a fused float row and a fused twin of each onnxruntime row (not of the
    tensorrt row, whose graph TensorRT must parse); a fused float row is a float graph in the table
    and in the best-float column."""
    jobs = export_jobs({"tensorrt": "tensorrt", "onnxruntime K=4": "onnxruntime"}, fused_attention=True)
    assert jobs == {
        "float": ("float", None, False),
        "tensorrt": ("tensorrt", "tensorrt", False),
        "onnxruntime K=4": ("onnxruntime", "onnxruntime K=4", False),
        f"float, {FUSED}": ("float", None, True),
        f"onnxruntime K=4, {FUSED}": ("onnxruntime", "onnxruntime K=4", True),
    }
    assert list(export_jobs({"tensorrt": "tensorrt"}, fused_attention=False)) == ["float", "tensorrt"]
    result = {
        "wbits": 8,
        "results": {
            "float": _row(100, 1.0, 0.9),
            f"float, {FUSED}": _row(90, 1.11, 1.0),
            f"onnxruntime K=4, {FUSED}": dict(_row(45, 2.22, 2.0), sites={"branch_layers": 3, "branches": 3}),
        },
    }
    lines = markdown(result).splitlines()
    assert lines[3].startswith(f"| float32, {FUSED} | 90 ms | 1.11x")
    assert lines[4].startswith(f"| onnxruntime K=4, {FUSED} W8A8 (3 convs, 3 conv branches) | 45 ms")


def _save_graph(path, nodes, x_shape, y_shape, w):
    """A float graph of ``nodes`` on input ``x`` with one weight ``w``, saved at ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_openvino_runs_a_float_graph_in_float32(tmp_path):
    pytest.importorskip("openvino")
    import numpy as np
    from onnx import helper

    from scripts.benchmark_onnx import openvino_float

    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    _save_graph(tmp_path / "unet.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"])], [4, 16], [4, 8], w)
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    request = openvino_float(tmp_path / "unet.onnx", threads=1)
    y = request.infer({"x": x})[0]
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)  # float32, not a bf16/f16 hint


def test_profile_lists_the_graphs_op_types_largest_first(tmp_path):
    """ONNX Runtime's profile, by op type: the graph's op types and nothing else, each with time."""
    import numpy as np
    from onnx import helper

    from scripts.benchmark_onnx import profile_ops

    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Softmax", ["h"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "w"], ["y"]),
    ]
    _save_graph(tmp_path / "g.onnx", nodes, [256, 64], [256, 64], w)
    x = np.random.default_rng(1).standard_normal((256, 64)).astype(np.float32)
    by_op = profile_ops(tmp_path / "g.onnx", {"x": x}, threads=1, runs=2)
    assert set(by_op) == {"MatMul", "Softmax"}
    assert all(v > 0 for v in by_op.values()) and list(by_op.values()) == sorted(by_op.values(), reverse=True)


def test_the_attention_forms_compute_the_exported_core(tmp_path):
    """scripts/ort_attention_kernels.py times three forms of one attention core; they must compute
    the same thing (the fused op to float rounding, the integer form to its quantizers' step) and the
    integer form must reach ONNX Runtime's integer kernel, or the timings compare nothing."""
    import numpy as np
    import torch

    from scripts.ort_attention_kernels import attention_graph
    from scripts.ort_branch_kernels import session

    b, n, m, heads, d = 2, 24, 7, 2, 8
    rng = np.random.default_rng(0)
    feeds = {x: rng.standard_normal((b, t, heads * d)).astype(np.float32) for x, t in (("q", n), ("k", m), ("v", m))}
    q, k, v = (torch.from_numpy(feeds[x]).reshape(b, -1, heads, d).transpose(1, 2) for x in "qkv")
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, heads * d).numpy()
    step = {"step": np.array(3, np.int64)}
    got, ops = {}, {}
    for kind in ("float", "fused", "integer BMMs"):
        s, ops[kind] = session(attention_graph(kind, b, n, m, heads, d), 1, tmp_path, kind.replace(" ", "_"))
        got[kind] = s.run(None, feeds if kind == "float" else feeds | step)[0]
    np.testing.assert_allclose(got["float"], want, atol=1e-5)
    np.testing.assert_allclose(got["fused"], want, atol=1e-5)
    assert ops["fused"] == {"MultiHeadAttention": 1}
    assert ops["integer BMMs"] == {"MatMulIntegerToFloat": 2}
    # q, k, v on a 0.05 grid (|x| < 6.4 stays inside uint8 around 128), probabilities on 1/255 from
    # zero: rounding moves the output by a few hundredths; probabilities clipped at 0.5 (zero point
    # 128) moved it by 0.42
    assert np.abs(got["integer BMMs"] - want).max() < 0.1


def test_the_linear_gap_sweep_takes_shapes(capsys):
    from scripts.ort_branch_kernels import SWEEP_TOKENS, linear_shape, main, sweep_layers

    layers = sweep_layers(linear_shapes=[(192, 192), (384, 128)])
    assert len(layers) == 2 * len(SWEEP_TOKENS)
    assert all(kind == "matmul" for kind, *_ in layers.values())
    assert layers["linear 384->128, 2x16x384"] == ("matmul", 384, 128, [2, 16, 384])
    assert linear_shape("160:160") == (160, 160)
    for bad in ("160", "a:b", "0:5"):
        with pytest.raises(Exception, match="features"):
            linear_shape(bad)
    for argv in (["--sweep-linears", "160:160"], ["--sweep", "--sweep-kernel", "1", "--sweep-linears", "160:160"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "--sweep-linears goes with --sweep" in capsys.readouterr().err


def test_the_onnxruntime_rows_cover_each_variant_once():
    from dgq.config import ORT_MIN_INTENSITY
    from scripts.benchmark_onnx import ort_variants

    assert ort_variants([4], False, False, False) == [(4, None, ORT_MIN_INTENSITY, True)]
    rows = ort_variants([1, 4], True, True, True)
    assert len(rows) == len(set(rows)) == 3 * 3  # default K=1, K=4, conv branches K=4; x rule, every, off
    assert (4, False, ORT_MIN_INTENSITY, True) in rows and (1, False, ORT_MIN_INTENSITY, True) not in rows
    assert {(k, fold) for k, fold, least, _ in rows if least == 0.0} == {(1, None), (4, None), (4, False)}
    assert {(k, fold, least) for k, fold, least, rule in rows if not rule} == {
        (1, None, ORT_MIN_INTENSITY),
        (4, None, ORT_MIN_INTENSITY),
        (4, False, ORT_MIN_INTENSITY),
    }


def test_cpu_flags_are_the_kernel_choosing_ones():
    from common.cpu import KERNEL_FLAGS, cpu_flags

    flags = cpu_flags()
    assert flags == sorted(flags) and all(f.startswith(KERNEL_FLAGS) for f in flags)


def test_graph_quality_fused_attention_rows_cost_only_float_rounding(tmp_path):
    """scripts/graph_quality.py --fused-attention on the tiny model: a fused twin of the float graph and
    of the onnxruntime graph (same recipe). Fused attention changes float32 rounding only, so the fused
    float graph is far closer to the float graph than the quantized graph is, and the fused quantized
    graph computes the same quantized network (its noise within what a float32 rounding difference
    upstream of the quantizers may flip)."""
    from scripts import graph_quality

    out = tmp_path / "gq.json"
    argv = ["--model", "tiny", "--bits", "W8A8", "--targets", "onnxruntime", "--peers", "--no-every-layer"]
    argv += ["--cal-prompts", "2", "--held-prompts", "1", "--steps", "3", "--runs", "1", "--fused-attention"]
    assert graph_quality.main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    fused = f"DGQ onnxruntime W8A8, {graph_quality.FUSED}"
    assert list(rows) == ["float32", f"float32, {graph_quality.FUSED}", "DGQ onnxruntime W8A8", fused]
    plain = rows["DGQ onnxruntime W8A8"]["noise_sqnr_db"]
    assert rows[f"float32, {graph_quality.FUSED}"]["noise_sqnr_db"] > max(plain, QDQ_ORT_TARGET_GRAPH_MIN_SQNR_DB)
    # The twins differ by at most the graph-vs-lowering bound (same quantized network, another float32
    # rounding); by the triangle inequality on noise amplitudes, their SQNRs against float then differ
    # by at most that difference's amplitude.
    amp = [10 ** (-db / 20) for db in (plain, rows[fused]["noise_sqnr_db"], QDQ_ORT_TARGET_GRAPH_MIN_SQNR_DB)]
    assert abs(amp[0] - amp[1]) <= amp[2]
    assert rows[fused]["quantized_layers"] == rows["DGQ onnxruntime W8A8"]["quantized_layers"] > 0
