"""What the float attention of the ``onnxruntime`` target costs in ONNX Runtime CPU, and what the two
faster forms ONNX Runtime offers would save, one attention core at a time.

    python scripts/ort_attention_kernels.py --out results/ort_attention_kernels.json

The target keeps attention float (q/k/v and probabilities; ``ORT_PRESET``), and on the SD-shaped
benchmark UNet that float attention is over a third of the quantized graph's kernel time
(``benchmark_onnx.py --profile``). Per attention core of SD-shaped sizes (self-attention over the
latent's tokens, cross-attention over 77 text tokens; batch 2), three graphs from the projected
q, k, v ``(B, tokens, heads * d)`` to the merged output:

- ``float``: the core as the export traces it (``export.qdq.attention``: heads to batch as
  Transpose -> Reshape -> Transpose, ``MatMul(q, Transpose(k)) -> Mul(scale)``, Softmax, MatMul with v,
  batch to heads);
- ``fused``: ONNX Runtime's contrib ``com.microsoft.MultiHeadAttention`` (one node, same numbers to
  float rounding; not an ONNX standard op, so not in a graph meant for TensorRT);
- ``integer BMMs``: the float graph with uint8 Q/DQ (per-step scale tables, as the target writes
  its other quantizers) on q, the transposed k, the probabilities and v, for ONNX Runtime's optimizer
  to fuse the two batched MatMuls into integer kernels (the fused op counts are reported). A best
  case: DGQ's default probability scale is taken per prompt at run time (``attn_scale="prompt"``),
  which ONNX Runtime does not fuse; static tables are what a fusable export would need.

Median of interleaved runs in one process, 1 thread by default. Random inputs and ranges: only the
speed is measured (the fused graph's largest difference from float is reported as a check).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cpu import cpu_flags
from scripts.ort_branch_kernels import _const, _qdq, session, time_graphs

TEXT_TOKENS = 77
# (label, tokens, heads, head dim): the SD-shaped benchmark UNet at latent 32x32 (block widths 128,
# 256, 512 with 8 heads) and SD v1.5 at 512 px (latent 64x64: 320, 640, 1280 with 8 heads).
SIZES = [
    ("sd-shaped 128", 1024, 8, 16),
    ("sd-shaped 256", 256, 8, 32),
    ("sd-shaped 512", 64, 8, 64),
    ("sd15 320", 4096, 8, 40),
    ("sd15 640", 1024, 8, 80),
    ("sd15 1280", 256, 8, 160),
]
GRAPHS = ("float", "fused", "integer BMMs")


def attention_graph(kind: str, batch: int, n: int, m: int, heads: int, d: int) -> onnx.ModelProto:
    """The attention core ``kind`` (one of ``GRAPHS``) from q ``(batch, n, heads * d)`` and k, v
    ``(batch, m, heads * d)`` to the output ``(batch, n, heads * d)``."""
    width = heads * d
    inputs = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, [batch, n, width]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, [batch, m, width]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, [batch, m, width]),
    ]
    if kind != "float":
        inputs.append(helper.make_tensor_value_info("step", TensorProto.INT64, []))
    nodes: list = []
    inits: list = []
    scale = float(d) ** -0.5
    if kind == "fused":
        nodes.append(
            helper.make_node(
                "MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft", num_heads=heads, scale=scale
            )
        )
    else:
        quantize = kind == "integer BMMs"

        def split(x: str) -> str:  # (B, N, heads * d) -> (B * heads, N, d)
            shape = _const(f"{x}_split", np.array([-1, d, 0], np.int64), inits)
            nodes.extend(
                [
                    helper.make_node("Transpose", [x], [f"{x}_t"], perm=[0, 2, 1]),
                    helper.make_node("Reshape", [f"{x}_t", shape], [f"{x}_r"]),
                    helper.make_node("Transpose", [f"{x}_r"], [f"{x}_h"], perm=[0, 2, 1]),
                ]
            )
            return f"{x}_h"

        q, k, v = split("q"), split("k"), split("v")
        nodes.append(helper.make_node("Transpose", [k], ["kt"], perm=[0, 2, 1]))
        kt = "kt"
        if quantize:
            q, kt, v = (
                _qdq(q, "q", nodes, inits, 0.05),
                _qdq(kt, "kt", nodes, inits, 0.05),
                _qdq(v, "v", nodes, inits, 0.05),
            )
        probs = "p"
        nodes += [
            helper.make_node("MatMul", [q, kt], ["s0"]),
            helper.make_node("Mul", ["s0", _const("scale", np.array(scale, np.float32), inits)], ["s"]),
            helper.make_node("Softmax", ["s"], [probs], axis=-1),
        ]
        if quantize:
            probs = _qdq(probs, "p", nodes, inits, 1.0 / 255, zero_point=0)  # [0, 1] on the uint8 grid
        merge = _const("merge", np.array([-1, width, 0], np.int64), inits)
        nodes += [
            helper.make_node("MatMul", [probs, v], ["o"]),
            helper.make_node("Transpose", ["o"], ["o_t"], perm=[0, 2, 1]),
            helper.make_node("Reshape", ["o_t", merge], ["o_r"]),
            helper.make_node("Transpose", ["o_r"], ["out"], perm=[0, 2, 1]),
        ]
    graph = helper.make_graph(
        nodes,
        kind.replace(" ", "_"),
        inputs,
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, n, width])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="timed runs per graph (default 20)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--batch", type=int, default=2, help="batch (default 2: guidance doubles one image)")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = p.parse_args(argv)
    result: dict = {
        "onnxruntime": ort.__version__,
        "cpu_flags": cpu_flags(),
        "threads": args.threads,
        "runs": args.runs,
        "batch": args.batch,
        "cores": {},
    }
    rng = np.random.default_rng(0)
    cases = [
        (f"{label} {kind}", n, m, h, d) for label, n, h, d in SIZES for kind, m in (("self", n), ("cross", TEXT_TOKENS))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for label, n, m, heads, d in tqdm(cases, desc="attention cores", unit="core"):
            width = heads * d
            feeds = {
                "q": rng.standard_normal((args.batch, n, width)).astype(np.float32),
                "k": rng.standard_normal((args.batch, m, width)).astype(np.float32),
                "v": rng.standard_normal((args.batch, m, width)).astype(np.float32),
            }
            graphs = {kind: attention_graph(kind, args.batch, n, m, heads, d) for kind in GRAPHS}
            timed = time_graphs(graphs, None, args.runs, args.threads, Path(tmp), feeds=feeds)
            plain, _ = session(graphs["float"], args.threads, Path(tmp), "check_float")
            fused, _ = session(graphs["fused"], args.threads, Path(tmp), "check_fused")
            ref = plain.run(None, feeds)[0]
            got = fused.run(None, feeds | {"step": np.array(3, np.int64)})[0]
            timed["fused_max_abs_difference"] = float(np.abs(ref - got).max())
            timed["shape"] = {"tokens": n, "context": m, "heads": heads, "head_dim": d}
            result["cores"][label] = timed
    from common.fsutil import emit_json

    sys.stdout.write(emit_json(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
