"""Which integer conv form ONNX Runtime CPU runs fast: float Conv vs QLinearConv vs ConvInteger.

    python scripts/ort_conv_kernels.py --out results/ort_conv_kernels.json

One 3x3 conv (256 -> 256 channels, 2 x 32 x 32 input, random INT8 weights) as three graphs:
float32 ``Conv``; ``QuantizeLinear -> QLinearConv -> DequantizeLinear`` (the full Q/DQ node unit,
whose *output* is quantized too); ``QuantizeLinear -> ConvInteger -> Cast -> Mul`` (integer inputs,
float output, no output quantization). Median of interleaved runs. It measures why a DGQ
``onnxruntime`` target needs quantized conv outputs to be fast; nothing here is DGQ-specific.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper


def graphs(c: int, o: int, hw: int, batch: int, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (o, c, 3, 3)).astype(np.int8)
    x_info = helper.make_tensor_value_info("x", 1, [batch, c, hw, hw])
    y_info = helper.make_tensor_value_info("y", 1, [batch, o, hw, hw])
    common = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(128, np.uint8), "zp"),
    ]
    w_scale = rng.random(o).astype(np.float32) * 0.01
    pads = {"pads": [1, 1, 1, 1]}
    nodes = {
        "float Conv": (
            [helper.make_node("Conv", ["x", "wf"], ["y"], **pads)],
            [numpy_helper.from_array(w.astype(np.float32) * w_scale[:, None, None, None], "wf")],
        ),
        "QLinearConv (output quantized)": (
            [
                helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
                helper.make_node("QLinearConv", ["xq", "s", "zp", "w", "ws", "wzp", "ys", "zp"], ["yq"], **pads),
                helper.make_node("DequantizeLinear", ["yq", "ys", "zp"], ["y"]),
            ],
            [
                *common,
                numpy_helper.from_array(w, "w"),
                numpy_helper.from_array(w_scale, "ws"),
                numpy_helper.from_array(np.zeros(o, np.int8), "wzp"),
                numpy_helper.from_array(np.array(0.3, np.float32), "ys"),
            ],
        ),
        "ConvInteger (float output)": (
            [
                helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
                helper.make_node("ConvInteger", ["xq", "w", "zp", "wzp"], ["acc"], **pads),
                helper.make_node("Cast", ["acc"], ["accf"], to=1),
                helper.make_node("Mul", ["accf", "ws"], ["y"]),
            ],
            [
                *common,
                numpy_helper.from_array(w, "w"),
                numpy_helper.from_array(np.array(0, np.int8), "wzp"),
                numpy_helper.from_array((w_scale * 0.05).reshape(1, o, 1, 1), "ws"),
            ],
        ),
    }
    out = {}
    for name, (ns, inits) in nodes.items():
        g = helper.make_graph(ns, "conv", [x_info], [y_info], inits)
        out[name] = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    sessions = {
        k: ort.InferenceSession(m, so, providers=["CPUExecutionProvider"])
        for k, m in graphs(args.channels, args.channels, args.size, args.batch).items()
    }
    x = np.random.default_rng(1).standard_normal((args.batch, args.channels, args.size, args.size)).astype(np.float32)
    times = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"x": x})
    for _ in range(args.runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"x": x})
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["float Conv"])
    result = {
        "onnxruntime": ort.__version__,
        "channels": args.channels,
        "size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "runs": args.runs,
        "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
        "speedup_vs_float": {k: base / statistics.median(v) for k, v in times.items()},
    }
    from common.fsutil import emit_json

    sys.stdout.write(emit_json(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
