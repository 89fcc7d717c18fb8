"""Per-UNet-call latency, engine size and network layers of engine variants (FP16 vs INT8 vs INT4).

    python scripts/benchmark_engines.py fp16=outputs/export_fp16 int8=outputs/export_int8 int4=outputs/export_int4

Layers are those of the parsed network (``<component>.engine.report.json``: every ONNX node and
every constant, cast and broadcast TensorRT's parser adds), with ratios against ``--baseline``, and
how many of them the parser added and how many are attention ops (``runtime.engine_report``).

Each argument is ``label=folder`` with ``<component>.engine`` (+ ``.engine.json``) built by
scripts/build_engine.py. Sizes are always reported. Latency needs a CUDA GPU and a TensorRT runtime:
the variants run interleaved (one call of each per round, so clock and thermal drift hit all alike)
at the IO spec's ``opt`` shapes with random inputs, after warm-up calls, and the median per variant is
reported. Without a GPU the script says so plainly and exits 0 after the sizes: TensorRT-RTX builds
engines ahead of time on a CPU-only machine, but cannot run them there.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger("benchmark_engines")


def _variant(text: str) -> tuple[str, Path]:
    label, sep, folder = text.partition("=")
    if not sep or not label or not folder:
        raise argparse.ArgumentTypeError(f"{text!r} is not label=folder (e.g. int8=outputs/export_int8)")
    return label, Path(folder)


def _random_feed(spec, torch, device: str, generator) -> dict:
    feed = {}
    for name, shape in spec.example_shapes().items():
        dtype = getattr(torch, spec.input(name).dtype)
        if dtype.is_floating_point:
            feed[name] = torch.randn(shape, generator=generator).to(device, dtype)
        else:  # step_index and token ids: zeros are valid everywhere
            feed[name] = torch.zeros(shape, dtype=dtype, device=device)
    if "timestep" in feed:
        feed["timestep"].fill_(500.0)
    return feed


def measure_latency(engines: dict[str, Path], component: str, runs: int, warmup: int) -> dict[str, dict]:
    """Median seconds per call of each engine, interleaved rounds; needs CUDA and TensorRT."""
    import torch

    from export.iospec import NetworkSpec
    from runtime.build import check_engine_loadable, read_engine_meta
    from runtime.runners import TensorRTRunner

    runners, feeds = {}, {}
    gen = torch.Generator().manual_seed(0)
    for label, path in engines.items():
        meta = read_engine_meta(path)
        module = check_engine_loadable(meta)  # the module that built it, not the first one installed
        spec = NetworkSpec.from_dict(meta["iospec"])
        runners[label] = TensorRTRunner(path, spec, module=module).activate()
        feeds[label] = _random_feed(spec, torch, runners[label].device, gen)
    times: dict[str, list[float]] = {label: [] for label in engines}
    try:
        for _ in range(warmup):
            for label, runner in runners.items():
                runner.infer(feeds[label])
        for _ in range(runs):
            for label, runner in runners.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                runner.infer(feeds[label], check=False)
                torch.cuda.synchronize()
                times[label].append(time.perf_counter() - t0)
    finally:
        for runner in runners.values():
            runner.deactivate()
    return {
        label: {
            "median_ms": round(statistics.median(t) * 1e3, 3),
            "min_ms": round(min(t) * 1e3, 3),
            "runs": len(t),
            "shapes": {k: list(v) for k, v in runners[label].spec.example_shapes().items()},
        }
        for label, t in times.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", type=_variant, metavar="LABEL=FOLDER", help="engine folders to compare")
    parser.add_argument("--component", default="unet", help="which engine to time (default unet)")
    parser.add_argument("--runs", type=int, default=50, help="timed rounds (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    parser.add_argument(
        "--baseline", default=None, help="variant the layer and size ratios are taken against (default: the first)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    engines = {label: folder / f"{args.component}.engine" for label, folder in args.variants}
    missing = [str(p) for p in engines.values() if not p.is_file()]
    if missing:
        log.error("no engine at %s (build with scripts/build_engine.py)", ", ".join(missing))
        return 2
    results = {label: {"engine": str(p), "engine_mb": round(p.stat().st_size / 1e6, 2)} for label, p in engines.items()}
    for label, p in engines.items():
        meta_path = Path(f"{p}.json")
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            results[label]["tensorrt"] = f"{meta['tensorrt']['flavour']} {meta['tensorrt']['version']}"
            results[label]["export_target"] = meta["export"]["target"]
        report_path = Path(f"{p}.report.json")
        if report_path.is_file():  # the parsed network, as build_engine.py wrote it
            net = json.loads(report_path.read_text())["network"]
            results[label]["network_layers"] = net["num_layers"]
            results[label]["gemm_layers"] = net["quantized"]["total"] + net["quantized"]["float"]
            results[label]["quantized"] = net["summary"]
            results[label]["layer_origins"] = net.get("layer_origins", {})
    if args.baseline is not None and args.baseline not in results:
        log.error("--baseline %s is not one of the variants %s", args.baseline, list(results))
        return 2
    base = results[args.baseline or next(iter(results))]

    from runtime.runners import tensorrt_available

    if tensorrt_available():
        for label, lat in measure_latency(engines, args.component, args.runs, args.warmup).items():
            results[label].update(lat)
    else:
        sys.stdout.write(
            "no CUDA GPU with a TensorRT runtime here: reporting engine sizes only (latency needs a GPU)\n"
        )

    def ratio(r: dict, key: str) -> str:
        if key not in r or key not in base:
            return "-"
        return f"{r[key] / base[key]:.2f}x"

    rows = [
        (
            "variant",
            "network layers",
            "vs base",
            "parser-added",
            "attention",
            "Conv/MatMul",
            "engine MB",
            "vs base",
            f"{args.component} ms/call",
        )
    ]
    rows += [
        (
            label,
            str(r.get("network_layers", "-")),
            ratio(r, "network_layers"),
            str(r.get("layer_origins", {}).get("parser", "-")),
            str(r.get("layer_origins", {}).get("attention", "-")),
            str(r.get("gemm_layers", "-")),
            f"{r['engine_mb']:.2f}",
            ratio(r, "engine_mb"),
            f"{r['median_ms']:.2f}" if "median_ms" in r else "-",
        )
        for label, r in results.items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    sys.stdout.write(
        "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows) + "\n"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
