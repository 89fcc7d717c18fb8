"""What DGQ's channel-group branches cost in ONNX Runtime CPU's integer kernels, one layer at a time.

    python scripts/ort_branch_kernels.py --out results/ort_branch_kernels.json

Two layers of an SD-shaped UNet at latent 32x32, batch 2: a 3x3 conv (320 -> 320 channels, 2 x 320
x 32 x 32) and a token Linear (2 x 1024 tokens x 640 -> 640). Each as a float32 graph and as the
``onnxruntime`` export target writes it with K = 1, 2, 4 input-channel branches: per branch a
Gather of the group's channels (none for K=1), uint8 Q/DQ with per-step scale/zero-point tables
selected by a ``step`` input, the int8 weight slice's DQ, the conv (bias-free) or MatMul, and for
the conv a uint8 Q/DQ of the output; branches summed, float bias added. ONNX Runtime's optimizer
fuses each conv branch into QLinearConv and each MatMul branch into MatMulIntegerToFloat (the
fused op counts are reported). Median of interleaved runs in one process. Random weights and
ranges: only the speed is measured.

    python scripts/ort_branch_kernels.py --sweep --out results/ort_layer_sweep.json
    python scripts/ort_branch_kernels.py --sweep --sweep-kernel 1 --out results/ort_layer_sweep_1x1.json

``--sweep`` times the folded unit (K groups folded into the weights: one branch behind a per-channel
Mul, and a Sub for a Linear; a conv's output times its per-channel gamma) against float over a range
of 3x3 conv and Linear sizes (or 1x1 convs), and groups the speed-ups by ``dgq.sites.intensity``,
the measure of the ``onnxruntime`` target's speed rule (``dgq.config.ORT_MIN_INTENSITY``).

    python scripts/ort_branch_kernels.py --sweep --sweep-branches 4 --out results/ort_layer_sweep_branches.json
    python scripts/ort_branch_kernels.py --sweep --sweep-nonsquare --out results/ort_layer_sweep_nonsquare.json

``--sweep-branches K`` times the conv as the target writes it below W8A8 instead: K gathered
QLinearConv branches, summed, times the per-channel gamma, plus the bias (Linears are always folded,
so only convs are swept), for the rule's threshold of branched convs (``QuantConfig.conv_min_intensity``).
``--sweep-nonsquare`` sweeps the folded unit on Linears whose in and out features differ (SD's
feed-forward and cross-attention shapes), which the square sweep does not cover;
``--sweep-linears IN:OUT ...`` on Linears of the shapes given (the Linear threshold's gap:
``--sweep-linears 160:160 192:192 224:224 256:256 384:128 128:512``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

STEPS = 25


def _const(name: str, value: np.ndarray, inits: list) -> str:
    inits.append(numpy_helper.from_array(value, name))
    return name


def _qdq(x: str, tag: str, nodes: list, inits: list, scale: float, zero_point: int = 128) -> str:
    """uint8 Q/DQ of ``x`` with per-step tables gathered by the ``step`` input."""
    s = _const(f"{tag}_s_table", np.full(STEPS, scale, np.float32), inits)
    z = _const(f"{tag}_z_table", np.full(STEPS, zero_point, np.uint8), inits)
    nodes += [
        helper.make_node("Gather", [s, "step"], [f"{tag}_s"], axis=0),
        helper.make_node("Gather", [z, "step"], [f"{tag}_z"], axis=0),
        helper.make_node("QuantizeLinear", [x, f"{tag}_s", f"{tag}_z"], [f"{tag}_q"]),
        helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_s", f"{tag}_z"], [f"{tag}_dq"]),
    ]
    return f"{tag}_dq"


def layer_graph(
    kind: str,
    k: int | None,
    c: int,
    o: int,
    x_shape: list[int],
    seed: int = 0,
    kernel: int = 3,
    gamma: bool = False,
) -> onnx.ModelProto:
    """``kind`` "conv" or "matmul"; ``k`` branches, 0 for one folded unit (the input normalized by a
    per-channel Mul, and for a MatMul a Sub of the centre, in front of a single branch; a conv's
    output multiplied by its per-channel gamma), or None for the float32 graph. ``gamma``: a conv's
    branch sum is multiplied by a per-channel gamma too (the export's ``norm_outputs``)."""
    rng = np.random.default_rng(seed)
    conv = kind == "conv"
    w_shape = (o, c, kernel, kernel) if conv else (c, o)
    pads = [kernel // 2] * 4
    out_shape = [x_shape[0], o, *x_shape[2:]] if conv else [*x_shape[:-1], o]
    nodes: list = []
    inits: list = []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    bias_shape = (1, o, 1, 1) if conv else (o,)
    bias = _const("bias", rng.standard_normal(bias_shape).astype(np.float32), inits)
    w_scale = (rng.random(o).astype(np.float32) + 0.5) * 0.01
    w_int = rng.integers(-127, 128, w_shape).astype(np.int8)
    if k is None:
        view = w_scale[:, None, None, None] if conv else w_scale[None, :]
        w = _const("w", w_int.astype(np.float32) * view, inits)
        op = (
            helper.make_node("Conv", ["x", w], ["y"], pads=pads)
            if conv
            else helper.make_node("MatMul", ["x", w], ["y"])
        )
        nodes += [op, helper.make_node("Add", ["y", bias], ["out"])]
    else:
        inputs.append(helper.make_tensor_value_info("step", TensorProto.INT64, []))
        groups = np.array_split(rng.permutation(c), max(k, 1))
        outs = []
        for g, idx in enumerate(groups):
            x = "x"
            if k == 0:  # folded: normalize the input per channel instead of gathering groups
                view = (1, c, 1, 1) if conv else (c,)
                if not conv:
                    centre = _const("centre", rng.standard_normal(view).astype(np.float32), inits)
                    nodes.append(helper.make_node("Sub", [x, centre], ["centred"]))
                    x = "centred"
                inverse = _const("inverse", (rng.random(view) + 0.5).astype(np.float32), inits)
                nodes.append(helper.make_node("Mul", [x, inverse], ["normalized"]))
                x = "normalized"
            if k > 1:
                nodes.append(
                    helper.make_node(
                        "Gather",
                        ["x", _const(f"b{g}_idx", np.sort(idx).astype(np.int64), inits)],
                        [f"b{g}_x"],
                        axis=1 if conv else len(x_shape) - 1,
                    )
                )
                x = f"b{g}_x"
            xdq = _qdq(x, f"b{g}_in", nodes, inits, 0.02)
            w_slice = w_int[:, np.sort(idx)] if conv else w_int[np.sort(idx), :]
            wq = _const(f"b{g}_w", np.ascontiguousarray(w_slice), inits)
            ws = _const(f"b{g}_ws", w_scale, inits)
            wz = _const(f"b{g}_wz", np.zeros(o, np.int8), inits)
            nodes.append(helper.make_node("DequantizeLinear", [wq, ws, wz], [f"b{g}_wdq"], axis=0 if conv else 1))
            if conv:
                nodes.append(helper.make_node("Conv", [xdq, f"b{g}_wdq"], [f"b{g}_y"], pads=pads))
                outs.append(_qdq(f"b{g}_y", f"b{g}_out", nodes, inits, 0.05))
            else:
                nodes.append(helper.make_node("MatMul", [xdq, f"b{g}_wdq"], [f"b{g}_y"]))
                outs.append(f"b{g}_y")
        if k == 0 and conv:
            gamma_c = _const("gamma", (rng.random((1, o, 1, 1)) + 0.5).astype(np.float32), inits)
            nodes.append(helper.make_node("Mul", [outs[0], gamma_c], ["restored"]))
            outs = ["restored"]
        nodes.append(helper.make_node("Sum", outs, ["sum"]))
        total = "sum"
        if gamma and conv and k != 0:
            gamma_c = _const("gamma", (rng.random((1, o, 1, 1)) + 0.5).astype(np.float32), inits)
            nodes.append(helper.make_node("Mul", ["sum", gamma_c], ["restored"]))
            total = "restored"
        nodes.append(helper.make_node("Add", [total, bias], ["out"]))
    graph = helper.make_graph(
        nodes, kind, inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def session(model: onnx.ModelProto, threads: int, tmp: Path, name: str) -> tuple[ort.InferenceSession, dict[str, int]]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp / f"{name}.onnx")
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    kept = (
        "QLinearConv",
        "MatMulIntegerToFloat",
        "QLinearMatMul",
        "MatMulInteger",
        "Conv",
        "MatMul",
        "Gemm",
        "MultiHeadAttention",
    )
    return s, {op: ops[op] for op in kept if ops.get(op)}


def time_graphs(
    graphs: dict[str, onnx.ModelProto],
    shape: list[int] | None,
    runs: int,
    threads: int,
    tmp: Path,
    feeds: dict[str, np.ndarray] | None = None,
) -> dict:
    """Median time of each graph (interleaved runs, one process), its speed-up over ``graphs["float"]``
    and the integer/float kernels ONNX Runtime's optimizer left. Input ``x`` of ``shape`` (random), or
    ``feeds``; every graph but "float" also takes the ``step`` input."""
    if feeds is None:
        feeds = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    sessions, fused = {}, {}
    for name, model in graphs.items():
        sessions[name], fused[name] = session(model, threads, tmp, name.replace("=", ""))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    step = {"step": np.array(3, np.int64)}
    for name, s in sessions.items():  # warm-up
        s.run(None, feeds if name == "float" else feeds | step)
    for _ in range(runs):
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds if name == "float" else feeds | step)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["float"])
    return {
        name: {
            "median_ms": 1000 * statistics.median(t),
            "speedup_vs_float": base / statistics.median(t),
            "ops_after_optimization": fused[name],
        }
        for name, t in times.items()
    }


# The size sweep: 3x3 convs (channels in = out, square maps) and token Linears (in = out), batch 2
# (classifier-free guidance), up to SD v1.5's largest layers at 512 px.
SWEEP_CONV = [(c, hw) for c in (32, 64, 128, 320, 640, 1280) for hw in (4, 8, 16, 32, 64)]
SWEEP_CONV_1X1 = [(c, hw) for c in (64, 128, 256, 320, 512, 640, 1280) for hw in (8, 16, 32, 64)]
SWEEP_LINEAR = [(c, n) for c in (32, 64, 128, 320, 640, 1280) for n in (16, 64, 256, 1024, 4096)]
# --sweep-nonsquare: Linears whose in and out differ, as SD's feed-forward (in -> 8 * in with GEGLU,
# 4 * in -> in) and cross-attention (768 / 2048 -> in) layers are, on 256 to 4096 tokens.
SWEEP_LINEAR_NONSQUARE = [
    (i, o, n)
    for i, o in ((128, 1024), (512, 128), (768, 128), (320, 2560), (1280, 320), (768, 320))
    for n in (256, 1024, 4096)
]
SWEEP_TOKENS = (16, 64, 256, 1024, 4096)  # --sweep-linears: token counts per shape
SWEEP_MAX_MACS = 4e9  # per call; larger ones take seconds and are far past break-even


def sweep_layers(
    kernel: int = 3,
    linears: bool = True,
    nonsquare: bool = False,
    linear_shapes: list[tuple[int, int]] | None = None,
) -> dict[str, tuple[str, int, int, list[int]]]:
    """label -> (kind, in, out, input shape): ``kernel`` x ``kernel`` convs, and with 3 (and
    ``linears``) the Linears; ``nonsquare``: only the Linears whose in and out differ;
    ``linear_shapes``: only Linears of these (in, out) features, on ``SWEEP_TOKENS`` tokens."""
    if linear_shapes or nonsquare:
        cases = [(i, o, n) for i, o in linear_shapes for n in SWEEP_TOKENS] if linear_shapes else SWEEP_LINEAR_NONSQUARE
        return {
            f"linear {i}->{o}, 2x{n}x{i}": ("matmul", i, o, [2, n, i])
            for i, o, n in cases
            if 2 * n * i * o <= SWEEP_MAX_MACS
        }
    layers = {}
    for c, hw in SWEEP_CONV if kernel == 3 else SWEEP_CONV_1X1:
        if 2 * hw * hw * c * c * kernel * kernel <= SWEEP_MAX_MACS:
            layers[f"conv {kernel}x{kernel} {c}->{c}, 2x{c}x{hw}x{hw}"] = ("conv", c, c, [2, c, hw, hw])
    if kernel == 3 and linears:
        for c, n in SWEEP_LINEAR:
            if 2 * n * c * c <= SWEEP_MAX_MACS:
                layers[f"linear {c}->{c}, 2x{n}x{c}"] = ("matmul", c, c, [2, n, c])
    return layers


def by_intensity(rows: list[dict]) -> dict[str, dict]:
    """The swept unit's speed-up over float per layer kind and intensity (``dgq.sites.intensity``:
    multiply-adds per element read or written), slowest and fastest over the sizes swept."""
    out: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: (r["kind"], r["intensity"])):
        key = f"{r['kind']} {r['intensity']:g}"
        cell = out.setdefault(key, {"layers": 0, "slowest": float("inf"), "fastest": 0.0})
        cell["layers"] += 1
        cell["slowest"] = min(cell["slowest"], r["speedup_vs_float"])
        cell["fastest"] = max(cell["fastest"], r["speedup_vs_float"])
    return out


def linear_shape(text: str) -> tuple[int, int]:
    """``IN:OUT`` -> (in, out) features, both positive."""
    try:
        i, o = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IN:OUT features, e.g. 192:192, got {text!r}") from None
    if i < 1 or o < 1:
        raise argparse.ArgumentTypeError(f"features must be positive, got {text!r}")
    return i, o


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--branches", nargs="+", type=int, default=[1, 2, 4], help="K values (default 1 2 4)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per graph (default 20)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="instead: time the folded unit (K groups folded into the weights) against float over a range "
        "of conv and Linear sizes, and report where it starts to pay",
    )
    p.add_argument(
        "--sweep-kernel",
        type=int,
        choices=(1, 3),
        default=3,
        help="--sweep: 3 (3x3 convs and Linears, default) or 1 (1x1 convs, e.g. projections and shortcuts)",
    )
    p.add_argument(
        "--sweep-branches",
        type=int,
        default=None,
        metavar="K",
        help="--sweep: time convs as K gathered QLinearConv branches (the target below W8A8) instead of the "
        "folded unit; Linears, always folded, are left out",
    )
    p.add_argument(
        "--sweep-nonsquare",
        action="store_true",
        help="--sweep: only Linears whose in and out features differ (feed-forward and cross-attention shapes)",
    )
    p.add_argument(
        "--sweep-linears",
        nargs="+",
        type=linear_shape,
        default=None,
        metavar="IN:OUT",
        help="--sweep: only Linears of these in:out features (e.g. 192:192 384:128), each on "
        f"{', '.join(map(str, SWEEP_TOKENS))} tokens",
    )
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = p.parse_args(argv)
    if args.sweep_linears and (
        not args.sweep or args.sweep_branches is not None or args.sweep_nonsquare or args.sweep_kernel != 3
    ):
        p.error("--sweep-linears goes with --sweep, without --sweep-branches, --sweep-nonsquare or --sweep-kernel 1")
    if args.sweep_nonsquare and (not args.sweep or args.sweep_branches is not None):
        p.error("--sweep-nonsquare goes with --sweep (the folded unit; Linears are never branched)")
    if args.sweep_branches is not None and (not args.sweep or args.sweep_branches < 2):
        p.error("--sweep-branches takes K >= 2 and goes with --sweep")
    from common.cpu import cpu_flags

    result: dict = {
        "onnxruntime": ort.__version__,
        "cpu_flags": cpu_flags(),  # the integer kernels ONNX Runtime picks, and so the speed-ups, follow them
        "threads": args.threads,
        "runs": args.runs,
        "layers": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.sweep:
            import torch

            from dgq.sites import intensity

            rows = []
            kernel, k = args.sweep_kernel, args.sweep_branches
            unit = "folded" if k is None else f"K={k}"
            result["unit"] = unit
            layers = sweep_layers(
                kernel, linears=k is None, nonsquare=args.sweep_nonsquare, linear_shapes=args.sweep_linears
            )
            for label, (kind, c, o, shape) in tqdm(layers.items(), desc="sizes", unit="layer"):
                graphs = {
                    "float": layer_graph(kind, None, c, o, shape, kernel=kernel),
                    unit: layer_graph(kind, k or 0, c, o, shape, kernel=kernel, gamma=True),
                }
                timed = time_graphs(graphs, shape, args.runs, args.threads, Path(tmp))
                result["layers"][label] = timed
                meta = {"device": "meta"}
                layer = torch.nn.Conv2d(c, o, kernel, **meta) if kind == "conv" else torch.nn.Linear(c, o, **meta)
                speedup = timed[unit]["speedup_vs_float"]
                rows.append({"kind": kind, "intensity": intensity(layer), "speedup_vs_float": speedup})
            result["by_intensity"] = by_intensity(rows)
        else:
            layers = {
                "conv 3x3 320->320, 2x320x32x32": ("conv", 320, 320, [2, 320, 32, 32]),
                "linear 640->640, 2x1024x640": ("matmul", 640, 640, [2, 1024, 640]),
            }
            for label, (kind, c, o, shape) in layers.items():
                graphs = {"float": layer_graph(kind, None, c, o, shape)}
                graphs |= {f"K={k}": layer_graph(kind, k, c, o, shape) for k in args.branches}
                result["layers"][label] = time_graphs(graphs, shape, args.runs, args.threads, Path(tmp))
    from common.fsutil import emit_json

    sys.stdout.write(emit_json(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
