"""Accuracy and speed of the exported UNet graphs in ONNX Runtime, DGQ's targets beside ONNX Runtime's
own quantization (``quantize_static``), in one table.

    python scripts/graph_quality.py --model fashion --out results/graph_quality_fashion.json
    python scripts/graph_quality.py --model fashion-outliers --out results/graph_quality_fashion-outliers.json
    python scripts/graph_quality.py --render results/graph_quality_fashion.json

What is measured is what a CPU user runs: each graph in ONNX Runtime CPU with the project's session
options (optimizations on, integer kernels), on held-out UNet calls: the float pipeline's own
calls for ``--held-prompts`` of the yardstick's evaluation prompts (one seed each, classifier-free
guidance: batch 2), with the scheduler and steps the graphs were calibrated with. Per graph:

- noise SQNR (dB) of its noise prediction against the float32 graph's, over all held-out calls
  (signal and noise energies summed), and the median of the per-call SQNRs;
- the median latency per UNet call (runs interleaved over the graphs, ``--threads`` threads);
- the file size against the float32 graph.

Graphs: the float32 export (and, unless ``--no-fused-attention``, its twin with fused attention and
one of every ``onnxruntime`` graph, same recipe: the fused twin is that target's default graph);
DGQ's ``faithful``, ``tensorrt`` and ``onnxruntime`` targets at each of ``--bits`` (calibrated on
``--cal-prompts`` prompts x ``--steps`` steps, each target's default K);
ONNX Runtime's ``quantize_static`` (QDQ format, per-channel int8 weights, uint8 activations) with the
MinMax, Percentile and Entropy calibrators, fed UNet calls of the same calibration prompts
(``--peer-calls`` of them, evenly over the steps). This is a measurement, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("graph_quality")

PEERS = ("MinMax", "Percentile", "Entropy")
FUSED = "fused attention"
TARGETS = ("faithful", "tensorrt", "onnxruntime")


def _feeds(call, names: set[str]) -> dict[str, np.ndarray]:
    """The float graph's inputs of a recorded UNet call (sample, timestep, encoder_hidden_states)."""
    sample, t = call.args[0], call.args[1] if len(call.args) > 1 else call.kwargs["timestep"]
    ehs = call.args[2] if len(call.args) > 2 else call.kwargs["encoder_hidden_states"]
    f = {
        "sample": sample.float().numpy(),
        "timestep": np.array(float(t.flatten()[0]) if hasattr(t, "flatten") else float(t), np.float32),
        "encoder_hidden_states": ehs.float().numpy(),
    }
    return {k: v for k, v in f.items() if k in names}


def record_calls(pipe, prompts: list[str], steps: int, guidance: float, seed: int) -> list:
    """The float pipeline's UNet calls, one prompt at a time (batch 2 with guidance)."""
    import torch

    from dgq.eval.capture import record_unet_calls

    calls = []
    with record_unet_calls(pipe.unet) as rec, torch.inference_mode():
        for i, prompt in enumerate(prompts):
            pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed + i),
                output_type="latent",
            )
    calls.extend(rec)
    return calls


class _Reader:
    """onnxruntime.quantization's calibration data reader over recorded UNet calls."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):  # pragma: no cover - called by some calibrators
        pass


def quantize_peer(float_path: Path, out: Path, method: str, feeds: list[dict[str, np.ndarray]]) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(
        str(float_path),
        str(out),
        _Reader(feeds),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    return out


def export_graphs(pipe, model: str, args, work: Path, cal_calls: list) -> tuple[dict[str, Path], dict[str, int]]:
    """Every graph of the table, ``{row name: unet.onnx}``, and how many Conv/Linear layers each DGQ
    graph quantizes."""
    from dgq.calibrate import build_recipe, calibrate_outputs, collect_statistics
    from dgq.prompts import calibration_prompts
    from export.float_export import export_float
    from export.qdq_export import export_onnx, target_config

    graphs = {"float32": export_float(pipe, work / "float", components=["unet"])["unet"]}
    if args.fused_attention:
        graphs[f"float32, {FUSED}"] = export_float(
            pipe, work / "float_fused", components=["unet"], fused_attention=True
        )["unet"]
    layers: dict[str, int] = {}
    prompts = calibration_prompts(model, args.cal_prompts)
    stats = collect_statistics(
        pipe, prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, progress=False
    )
    for bits in args.bits:
        wbits, abits = int(bits[1]), int(bits[3])
        for target in args.targets:
            config = target_config(target, wbits, abits)
            configs = {f"DGQ {target} {bits}": config}
            if target == "onnxruntime" and args.every_layer:
                # the target without its speed rule (dgq.config.ORT_MIN_INTENSITY): every layer quantized
                configs[f"DGQ {target} {bits}, every layer"] = config.replace(min_intensity=0.0)
            for name, config in configs.items():
                log.info("calibrate and export %s", name)
                recipe = build_recipe(stats, pipe.unet, config, progress=False)
                if target == "onnxruntime":
                    recipe = calibrate_outputs(
                        pipe, recipe, prompts, args.steps, guidance_scale=args.guidance, progress=False
                    )
                fuse_twin = target == "onnxruntime" and args.fused_attention
                twins = [(name, False)] + ([(f"{name}, {FUSED}", True)] if fuse_twin else [])
                for row, fuse in twins:
                    folder = work / row.replace(" ", "_").replace(",", "")
                    export_onnx(
                        pipe,
                        folder,
                        recipe,
                        target,
                        components=["unet"],
                        compare_float=False,
                        inspect_ort=False,
                        fused_attention=fuse,
                    )
                    graphs[row] = folder / "unet.onnx"
                    layers[row] = len(recipe.weights)
    if args.peers:
        names = {"sample", "timestep", "encoder_hidden_states"}
        step = max(1, len(cal_calls) // args.peer_calls)
        feeds = [_feeds(c, names) for c in cal_calls[::step][: args.peer_calls]]
        for method in args.peers:
            name = f"ORT quantize_static {method} W8A8"
            log.info("%s on %d calibration calls", name, len(feeds))
            graphs[name] = quantize_peer(graphs["float32"], work / f"peer_{method}.onnx", method, feeds)
    return graphs, layers


def measure(graphs: dict[str, Path], held: list, args) -> dict[str, dict]:
    """Noise SQNR against the float32 graph on the held-out calls, and latency, per graph."""
    from export.manifest import read_manifest, step_index
    from export.ort_session import create_session

    sessions = {k: create_session(p, optimize=True, threads=args.threads) for k, p in graphs.items()}
    manifests = {}
    for k, p in graphs.items():
        try:
            manifests[k] = read_manifest(p.parent)
        except Exception:  # a peer graph has no export folder
            manifests[k] = {}

    def feeds(name, call):
        names = {i.name for i in sessions[name].get_inputs()}
        f = _feeds(call, names)
        if "step_index" in names:
            f["step_index"] = np.array(step_index(manifests[name], float(f["timestep"])), np.int64)
        return f

    ref = [sessions["float32"].run(None, feeds("float32", c))[0].astype(np.float64) for c in held]
    rows: dict[str, dict] = {}
    for name in graphs:
        signal = noise = 0.0
        per_call = []
        for r, c in zip(ref, held, strict=True):
            y = sessions[name].run(None, feeds(name, c))[0].astype(np.float64)
            s, n = float((r**2).sum()), float(((r - y) ** 2).sum())
            signal, noise = signal + s, noise + n
            per_call.append(float("inf") if n == 0 else 10 * np.log10(s / n))
        rows[name] = {
            "noise_sqnr_db": float("inf") if noise == 0 else float(10 * np.log10(signal / noise)),
            "median_call_sqnr_db": float(statistics.median(per_call)),
            "bytes": graphs[name].stat().st_size + sum(p.stat().st_size for p in graphs[name].parent.glob("*.data")),
        }
    timed = held[len(held) // 2]  # a mid-trajectory call, batch 2
    times: dict[str, list[float]] = {k: [] for k in graphs}
    for name in graphs:  # warm-up
        sessions[name].run(None, feeds(name, timed))
    for _ in range(args.runs):
        for name in graphs:
            f = feeds(name, timed)
            t0 = time.perf_counter()
            sessions[name].run(None, f)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["float32"])
    for name in graphs:
        ms = statistics.median(times[name])
        rows[name] |= {"median_ms": 1000 * ms, "speed_vs_float": base / ms}
        rows[name]["bytes_vs_float"] = rows[name]["bytes"] / rows["float32"]["bytes"]
    return rows


def render(result: dict) -> str:
    total = result.get("conv_linear_layers")
    lines = [
        f"Model `{result['model']}`, {result['held_calls']} held-out UNet calls, ONNX Runtime "
        f"{result['onnxruntime']} CPU, {result['threads']} thread(s):",
        "",
        "| graph | quantized Conv/Linear | noise SQNR vs float graph | median per call | per UNet call | vs float "
        "| file vs float |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        sq = "-" if name == "float32" else f"{r['noise_sqnr_db']:.2f} dB"
        med = "-" if name == "float32" else f"{r['median_call_sqnr_db']:.2f} dB"
        n = "-" if "quantized_layers" not in r else f"{r['quantized_layers']} of {total}"
        lines.append(
            f"| {name} | {n} | {sq} | {med} | {r['median_ms']:.1f} ms | {r['speed_vs_float']:.2f}x | "
            f"{r['bytes_vs_float']:.3f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fashion", help="zoo name or pipeline folder (default fashion)")
    p.add_argument("--bits", nargs="+", default=["W8A8", "W8A6"], help="DGQ bit widths (default W8A8 W8A6)")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="DGQ export targets")
    p.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS), help="quantize_static calibrators")
    p.add_argument("--cal-prompts", type=int, default=64, help="calibration prompts (default 64)")
    p.add_argument("--held-prompts", type=int, default=6, help="held-out prompts (default 6: 150 calls at 25 steps)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps, calibration and held-out (default 25)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the project's)")
    p.add_argument("--peer-calls", type=int, default=100, help="calibration calls fed to quantize_static")
    p.add_argument(
        "--no-every-layer",
        dest="every_layer",
        action="store_false",
        help="leave out the onnxruntime rows without the target's speed rule (every Conv/Linear quantized)",
    )
    p.add_argument(
        "--fused-attention",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the float graph and each onnxruntime graph with fused attention (one ONNX Runtime "
        "MultiHeadAttention per attention block, the onnxruntime target's default graph; rows '..., fused "
        "attention', the same recipes; the rows without it are exported with fused_attention=False). "
        "Default on; --no-fused-attention leaves them out",
    )
    p.add_argument("--runs", type=int, default=10, help="timed runs per graph (default 10)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--render", type=Path, default=None, help="print the table of an existing JSON file and exit")
    args = p.parse_args(argv)
    if args.render is not None:
        sys.stdout.write(render(json.loads(args.render.read_text())) + "\n")
        return 0
    for b in args.bits:
        if len(b) != 4 or b[0] != "W" or b[2] != "A" or not (b[1] + b[3]).isdigit():
            p.error(f"--bits takes W<w>A<a> like W8A8, got {b!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import onnxruntime as ort
    import torch

    from common.constants import DEFAULT_GUIDANCE
    from common.cpu import cpu_flags
    from common.fsutil import emit_json
    from dgq import zoo
    from dgq.config import QuantConfig
    from dgq.eval.data import default_prompts
    from dgq.prompts import calibration_prompts
    from dgq.sites import layer_sites

    torch.set_num_threads(args.threads)
    args.guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    pipe = zoo.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    held = record_calls(pipe, [q for q, _ in default_prompts(args.held_prompts)], args.steps, args.guidance, 1000)
    cal_calls = []
    if args.peers:
        cal_calls = record_calls(pipe, calibration_prompts(args.model, args.cal_prompts), args.steps, args.guidance, 0)
    with tempfile.TemporaryDirectory() as tmp:
        graphs, layers = export_graphs(pipe, args.model, args, Path(tmp), cal_calls)
        rows = measure(graphs, held, args)
    for name, n in layers.items():
        rows[name]["quantized_layers"] = n
    result = {
        "model": args.model,
        "onnxruntime": ort.__version__,
        "cpu_flags": cpu_flags(),
        "threads": args.threads,
        "held_calls": len(held),
        "conv_linear_layers": len(layer_sites(pipe.unet, QuantConfig(keep_float=()))),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "render")},
        "rows": rows,
    }
    result["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in result["settings"].items()}
    emit_json(result, args.out)
    sys.stdout.write(render(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
