"""ONNX Runtime CPU latency per UNet call and file size: float graph vs each Q/DQ export target.

    python scripts/benchmark_onnx.py --out results/benchmark_onnx_sdshape.json

Default network: an SD-shaped UNet (SD v1.5's UNet config with block_out_channels
(128, 256, 512, 512), cross_attention_dim 768; random seeded weights) at latent 32x32, batch 2
(classifier-free guidance), calibrated on a few prompts (statistics only matter for the graph
structure here, not for quality). ``--model fashion`` (or any zoo name/folder) benchmarks that
model's UNet instead. The ``onnxruntime`` target is exported once per ``--ort-groups`` value (rows
``onnxruntime K=...``; at W8A8 its conv input groups folded into the weights, one QLinearConv per
conv), and with ``--conv-branches`` also with a QLinearConv branch per group (``..., conv
branches``, the default at 4-bit weights): K=1 has no groups, so the rows show what DGQ's channel
groups cost in each form.
One process; sessions created once; runs interleaved (float, faithful,
tensorrt, float, ...) so machine-load drift hits every graph alike; median per graph. This is a
benchmark, not a test: nothing asserts a speed.

Where OpenVINO is installed (extra ``peers``; ``pip install openvino``), its CPU plugin runs the float graph too (row
``float32 (OpenVINO)``, float32 precision, the same thread count), interleaved with the others: every
row's ``vs best float`` is against the fastest float run. A float graph and a twin of every
``onnxruntime`` row have each attention block as ONNX Runtime's MultiHeadAttention (rows ``..., fused
attention``: the ``onnxruntime`` target's default graph; the rows without the suffix are exported
with ``fused_attention=False``; ``--no-fused-attention`` leaves the twins out; OpenVINO runs only the
plain float graph).
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
import torch

log = logging.getLogger("benchmark_onnx")
# Calibration guidance of this benchmark, not the project default: the network is SD v1.5-shaped and
# calibrated on SD prompts, so it takes SD v1.5's usual scale. Only the ranges depend on it, not the
# timed shapes; it stays what produced the recorded results.
SD_GUIDANCE = 7.5


def sd_shaped_pipeline(seed: int = 0):
    from diffusers import PNDMScheduler

    from dgq.zoo import configs
    from dgq.zoo.builders import TINY_VAE, build_sd

    unet = dict(configs.SD15_UNET, block_out_channels=(128, 256, 512, 512), sample_size=32)
    text = dict(configs.CLIP_L_TEXT, num_hidden_layers=2)  # hidden 768: the UNet's cross-attention width
    vae = dict(TINY_VAE)  # 2x spatial factor: 64 px images for 32x32 latents
    return build_sd(unet, text, vae, PNDMScheduler(**configs.SD15_SCHEDULER), seed)


OPENVINO_ROW = "float32 (OpenVINO)"
FUSED = "fused attention"


def is_float_row(name: str) -> bool:
    """A row of a float graph: ONNX Runtime's (plain or fused attention) or OpenVINO's."""
    return name in ("float", f"float, {FUSED}", OPENVINO_ROW)


PROFILE_RUNS = 3


def profile_ops(path: Path, feeds: dict, threads: int, runs: int = PROFILE_RUNS) -> dict[str, float]:
    """ONNX Runtime's own profile of ``runs`` calls of the graph at ``path`` (after one warm-up call,
    left out): kernel milliseconds per call by op type, after its optimizer (QLinearConv,
    MatMulIntegerToFloat, ...), largest first."""
    import onnxruntime as ort

    from export.ort_session import session_options

    with tempfile.TemporaryDirectory(prefix="dgq-profile-") as tmp:
        so = session_options(optimize=True, threads=threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    calls = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(calls) != runs + 1:
        raise RuntimeError(f"ONNX Runtime's profile holds {len(calls)} calls, not {runs + 1}")
    warm_end = calls[0]["ts"] + calls[0]["dur"]
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= warm_end:
            op = e["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1000 / runs
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def openvino_float(path: Path, threads: int):
    """An OpenVINO CPU request for the float graph at float32 precision, or None without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        log.info("OpenVINO is not installed: no %s row", OPENVINO_ROW)
        return None
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    return core.compile_model(str(path), "CPU", config).create_infer_request()


def markdown(result: dict) -> str:
    """The results file as the README's table: one row per graph."""
    best = "vs best float" if any(r.get("speedup_vs_best_float") for r in result["results"].values()) else None
    lines = [
        "| graph | median per UNet call | vs float | file | vs float32 graph | integer kernels after ORT's optimizer |"
        + (f" {best} |" if best else ""),
        "|---|---|---|---|---|---|" + ("---|" if best else ""),
    ]
    for name, r in result["results"].items():
        if is_float_row(name):
            label = name.replace("float", "float32", 1) if name != OPENVINO_ROW else name
        else:
            label = f"{name} W{result['wbits']}A8"
        sites = r.get("sites") or {}
        if name.startswith("onnxruntime"):
            label += f" ({sites['branch_layers']} convs, {sites['branches']} conv branches)"
        elif sites.get("branch_layers"):
            label += f" ({sites['branch_layers']} branched layers, {sites['branches']} branches)"
        kernels = ", ".join(f"{k} {v}" for k, v in r["integer_kernels_after_optimization"].items()) or "-"
        lines.append(
            f"| {label} | {r['median_ms']:,.0f} ms | {r['speedup_vs_float']:.2f}x | {r['bytes'] / 2**20:.1f} MiB | "
            f"{r['size_vs_float']:.3f}x | {kernels} |" + (f" {r['speedup_vs_best_float']:.2f}x |" if best else "")
        )
    return "\n".join(lines) + "\n"


def export_jobs(targets: dict[str, str], fused_attention: bool) -> dict[str, tuple[str, str | None, bool]]:
    """Row name -> (export target, recipe row or None, fused attention): the float graph, then each
    quantized row of ``targets`` (row -> target); with ``fused_attention`` a fused twin of the float
    row and of every onnxruntime row (the targets whose graphs may carry ONNX Runtime's contrib op)."""
    jobs = {"float": ("float", None, False)} | {row: (t, row, False) for row, t in targets.items()}
    if fused_attention:
        jobs |= {f"{row}, {FUSED}": (t, r, True) for row, (t, r, _) in jobs.items() if t in ("float", "onnxruntime")}
    return jobs


def ort_variants(
    groups: list[int], conv_branches: bool, every_layer: bool, linear_rule_off: bool
) -> list[tuple[int, bool | None, float, bool]]:
    """The onnxruntime rows' configs as (K, fold_conv, min_intensity, linear_rule): per K the target's
    default (folded at W8A8, its speed rule), then with conv branches (K > 1), every layer, and the
    rule with Linears at min_intensity, each of those for every default and conv-branch row."""
    from dgq.config import ORT_MIN_INTENSITY

    variants = [(k, None, ORT_MIN_INTENSITY, True) for k in groups]
    if conv_branches:
        variants += [(k, False, least, True) for k, _, least, _ in variants if k > 1]
    rule = list(variants)
    if every_layer:
        variants += [(k, fold, 0.0, True) for k, fold, _, _ in rule]
    if linear_rule_off:
        variants += [(k, fold, least, False) for k, fold, least, _ in rule]
    return variants


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="zoo name or pipeline folder (default: the SD-shaped UNet)")
    p.add_argument(
        "--targets",
        nargs="+",
        default=["faithful", "tensorrt", "onnxruntime"],
        choices=["faithful", "tensorrt", "onnxruntime"],
    )
    p.add_argument(
        "--ort-groups",
        nargs="+",
        type=int,
        default=None,
        help="K values for the onnxruntime target (default: --groups only), e.g. 1 2 4",
    )
    p.add_argument(
        "--conv-branches",
        action="store_true",
        help="also an onnxruntime row per K > 1 with a QLinearConv branch per conv input group "
        "(fold_conv=False) instead of the groups folded into the weights",
    )
    p.add_argument(
        "--every-layer",
        action="store_true",
        help="also an onnxruntime row per K with every Conv/Linear quantized (min_intensity 0), besides the "
        "target's default speed rule (small layers float, dgq.config.ORT_MIN_INTENSITY)",
    )
    p.add_argument(
        "--linear-rule-off",
        action="store_true",
        help="also an onnxruntime row per K with the speed rule's Linear threshold at min_intensity "
        "(QuantConfig.linear_rule off, the rule as recipes stored before it read), to time the lower Linear "
        "threshold against it in one process",
    )
    p.add_argument(
        "--fused-attention",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a float row and a twin of every onnxruntime row with fused attention (one "
        "com.microsoft.MultiHeadAttention per attention block: the onnxruntime target's default graph; "
        "the rows without the suffix are exported with fused_attention=False). Default on; "
        "--no-fused-attention leaves the twins out",
    )
    p.add_argument("--wbits", type=int, default=8, choices=(8, 4))
    p.add_argument("--groups", type=int, default=4, help="DGQ's K for both targets (default 4)")
    p.add_argument("--cal-prompts", type=int, default=4, help="calibration prompts (default 4)")
    p.add_argument("--steps", type=int, default=4, help="calibration steps (default 4)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (default 2: guidance doubles one image)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per graph (default 10)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--keep", type=Path, default=None, help="keep the export folders here")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument(
        "--profile",
        action="store_true",
        help=f"also ONNX Runtime's profile of each graph ({PROFILE_RUNS} calls after the timed runs): kernel "
        "milliseconds per call by op type, in the results file",
    )
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="only print an earlier results file as a markdown table (no export, no timing)",
    )
    args = p.parse_args(argv)
    if args.render is not None:
        sys.stdout.write(markdown(json.loads(args.render.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import onnxruntime as ort

    from common.cpu import cpu_flags
    from dgq import zoo
    from dgq.calibrate import build_recipe, calibrate_outputs, collect_statistics
    from dgq.config import preset
    from dgq.prompts import calibration_prompts
    from export.ort_session import session_options
    from export.qdq_export import ORT_INTEGER_OPS, ORT_PRESET, export_onnx

    torch.set_num_threads(args.threads)
    pipe = sd_shaped_pipeline() if args.model is None else zoo.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    name = args.model or "sd-shaped (128,256,512,512), cross 768"
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    t0 = time.perf_counter()
    prompts = calibration_prompts(args.model or "sd15", args.cal_prompts)
    stats = collect_statistics(pipe, prompts, args.steps, SD_GUIDANCE, progress=False)
    recipes = {
        "faithful": build_recipe(stats, pipe.unet, preset("dgq", wbits=args.wbits, groups=args.groups), progress=False),
        "tensorrt": build_recipe(
            stats,
            pipe.unet,
            preset("dgq", wbits=args.wbits, groups=args.groups, profile="tensorrt", outlier_bits=16),
            progress=False,
        ),
    }
    targets = {t: t for t in args.targets if t != "onnxruntime"}  # row name -> export target
    if "onnxruntime" in args.targets:
        variants = ort_variants(
            args.ort_groups or [args.groups], args.conv_branches, args.every_layer, args.linear_rule_off
        )
        for k, fold, least, linear_rule in variants:
            config = preset(
                "dgq",
                wbits=args.wbits,
                groups=k,
                **ORT_PRESET,
                fold_conv=fold,
                min_intensity=least,
                linear_rule=linear_rule,
            )
            row = f"onnxruntime K={k}" + ("" if config.folds_conv or k == 1 else ", conv branches")
            row += "" if least else ", every layer"
            row += "" if linear_rule else f", Linears from {least:g}"
            if row in targets:
                continue  # branches are already the default at these bits
            recipe = build_recipe(stats, pipe.unet, config, progress=False)
            recipes[row] = calibrate_outputs(pipe, recipe, prompts, args.steps, SD_GUIDANCE, progress=False)
            targets[row] = "onnxruntime"
    log.info("calibrated in %.0f s", time.perf_counter() - t0)
    scratch = None if args.keep else tempfile.TemporaryDirectory(prefix="dgq-bench-")  # removed on exit
    root = Path(args.keep) if args.keep else Path(scratch.name)
    folders, summaries = {}, {}
    for row, (t, r, fused) in export_jobs(targets, args.fused_attention).items():
        folders[row] = root / row.replace(", ", "_").replace(" ", "_").replace("=", "")
        summary = export_onnx(
            pipe,
            folders[row],
            None if r is None else recipes[r],
            t,
            components=("unet",),
            batch=(1, args.batch // 2, args.batch // 2),
            overwrite=True,
            compare_float=False,
            fused_attention=fused,
        )
        if t != "float":
            summaries[row] = summary
    sessions, feeds = {}, {}
    g = torch.Generator().manual_seed(0)
    latent = pipe.unet.config.sample_size
    sample = torch.randn(args.batch, pipe.unet.config.in_channels, latent, latent, generator=g).numpy()
    ehs = torch.randn(
        args.batch, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim, generator=g
    ).numpy()
    for k, folder in folders.items():
        so = session_options(optimize=True, threads=args.threads)  # as the runtime runs it
        so.optimized_model_filepath = str(folder / "unet.optimized.onnx")
        sessions[k] = ort.InferenceSession(str(folder / "unet.onnx"), so, providers=["CPUExecutionProvider"])
        names = {i.name for i in sessions[k].get_inputs()}
        f = {
            "sample": sample,
            "timestep": np.array(recipes["faithful"].slots[0], np.float32),
            "encoder_hidden_states": ehs,
        }
        if "step_index" in names:
            f["step_index"] = np.array(0, np.int64)
        feeds[k] = f
        sessions[k].run(None, f)  # warm-up
    ov_request = openvino_float(folders["float"] / "unet.onnx", args.threads)
    if ov_request is not None:
        ov_request.infer(feeds["float"])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in sessions} | ({OPENVINO_ROW: []} if ov_request else {})
    for _ in range(args.runs):
        for k, s in sessions.items():
            t1 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - t1)
        if ov_request is not None:
            t1 = time.perf_counter()
            ov_request.infer(feeds["float"])
            times[OPENVINO_ROW].append(time.perf_counter() - t1)
    profiles = {}
    if args.profile:
        profiles = {k: profile_ops(folder / "unet.onnx", feeds[k], args.threads) for k, folder in folders.items()}
    import onnx

    rows = {}
    for k, folder in folders.items():
        opt = onnx.load(str(folder / "unet.optimized.onnx"), load_external_data=False)
        ops = {}
        for n in opt.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        fused = {o: ops[o] for o in ORT_INTEGER_OPS if o in ops}
        size = sum(p.stat().st_size for p in folder.glob("unet.onnx*") if "optimized" not in p.name)
        rows[k] = {
            "median_ms": 1000 * statistics.median(times[k]),
            "min_ms": 1000 * min(times[k]),
            "bytes": size,
            "integer_kernels_after_optimization": fused,
            "nodes": sum(ops.values()),
        }
        if k in profiles:
            rows[k]["profile_ms_per_call_by_op"] = profiles[k]
    if ov_request is not None:
        import openvino

        rows[OPENVINO_ROW] = {
            "median_ms": 1000 * statistics.median(times[OPENVINO_ROW]),
            "min_ms": 1000 * min(times[OPENVINO_ROW]),
            "bytes": rows["float"]["bytes"],
            "integer_kernels_after_optimization": {},
            "openvino": openvino.__version__,
        }
    base = rows["float"]
    best_float = min(r["median_ms"] for k, r in rows.items() if is_float_row(k))
    for r in rows.values():
        r["speedup_vs_float"] = base["median_ms"] / r["median_ms"]
        r["speedup_vs_best_float"] = best_float / r["median_ms"]
        r["size_vs_float"] = r["bytes"] / base["bytes"]
    for t, s in summaries.items():
        rows[t]["sites"] = s.sites
    if scratch is not None:
        sessions.clear()
        scratch.cleanup()
    result = {
        "network": name,
        "unet_params": n_params,
        "latent": latent,
        "batch": args.batch,
        "wbits": args.wbits,
        "groups": args.groups,
        "threads": args.threads,
        "runs": args.runs,
        "onnxruntime": ort.__version__,
        "cpu_flags": cpu_flags(),
        "results": rows,
    }
    from common.fsutil import emit_json

    sys.stdout.write(emit_json(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
