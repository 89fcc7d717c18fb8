"""The GPU check in one command: the default model's FP16 / INT8 / INT4 engines, built with the installed
TensorRT, held to ONNX Runtime and the PyTorch simulator, and timed.

    python scripts/gpu_check.py --out outputs/gpu_check

1. Environment: which TensorRT module and version (a supported major), which CUDA device torch sees.
   Without a CUDA GPU or a TensorRT runtime the script says so, writes the environment with status
   "skipped" and exits 0: nothing on this machine can run an engine (TensorRT-RTX still builds them
   ahead of time with scripts/build_engine.py).
2. Exports of the model into --out: ``fp16`` (the float graphs converted to float16), ``int8`` (the
   tensorrt target, DGQ W8A8) and ``int4`` (DGQ W4A8: INT4 weights on the GEMMs), calibrated with
   --num-prompts prompts x --steps steps (--reuse keeps export folders that verify).
3. Engines for every component of every export (runtime.build.build_engines, whatever TensorRT is
   installed; rebuilt on every run, since building is part of what is checked).
4. Parity of one UNet call at the profile's opt shapes (a calibrated timestep, its step_index): the
   engine against ONNX Runtime on the same graph, the engine and ONNX Runtime against PyTorch (the
   float model for fp16, the DGQ simulator of the export's recipe for int8/int4), SQNR in dB; and the
   images of the whole pipeline on the engines against ONNX Runtime's (PSNR, --images prompts).
5. Latency: median ms per UNet call of each variant's engine, interleaved (scripts/benchmark_engines.py).

Writes ``<out>/gpu_check.json`` and prints a table. Exit status: 1 when a parity figure is under its
floor (:data:`PARITY_FLOORS_DB`) or a variant could not be built or run, 0 otherwise.

``--torch-only``: no TensorRT needed, a CUDA GPU is. Runs the TensorRT runner's stream handling and
CUDA-graph capture on the real device with a torch-implemented stand-in engine
(tests/runtime/trt_standins.py, so from a repository checkout): feeds written late on a side
stream, numpy and torch feeds in fp16 and fp32, capture and replay across shapes, re-activation with
a shared memory pool. Writes ``<out>/gpu_check_torch.json``; exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("gpu_check")

VARIANTS = ("fp16", "int8", "int4")
# Floors of the parity figures (dB). NOT YET MEASURED: no GPU has run an engine of this project, so
# these are estimates to be replaced by the first GPU run's figures. What they rest on: the exported
# Q/DQ graphs hold the simulator to about 30 dB per UNet call in ONNX Runtime (tests/tolerances.py,
# QDQ_TENSORRT_VS_SIM_MIN_SQNR_DB); TensorRT fuses Q/DQ into its own INT8 kernels (TensorRT-RTX runs INT8
# activations in FP16), which moves values across rounding edges much as a second float runtime does;
# FP16 graphs sit at ~7e-4 relative error from float32 PyTorch (FP16_ONNX_MAX_REL_ERR measurements),
# about 60 dB, and FP16 kernels of two runtimes differ in accumulation order.
PARITY_FLOORS_DB = {
    "fp16": {"engine_vs_onnxruntime_db": 40.0, "engine_vs_torch_db": 35.0, "image_psnr_db": 35.0},
    "int8": {"engine_vs_onnxruntime_db": 25.0, "engine_vs_torch_db": 20.0, "image_psnr_db": 28.0},
    "int4": {"engine_vs_onnxruntime_db": 25.0, "engine_vs_torch_db": 20.0, "image_psnr_db": 28.0},
}
WBITS = {"int8": 8, "int4": 4}


# ---- environment ------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """What this machine offers: ``{"ready": bool, "reason": str, "tensorrt": ..., "torch": ..., "gpu": ...}``."""
    import torch

    from runtime.build import gpu_info, unsupported_tensorrt
    from runtime.runners import tensorrt_module_name

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "gpu": gpu_info()}
    module = tensorrt_module_name()
    if module is not None:
        import importlib

        try:
            trt = importlib.import_module(module)
            env["tensorrt"] = {"module": module, "version": getattr(trt, "__version__", "?")}
        except ImportError as err:
            env["tensorrt"] = {"module": module, "error": str(err)}
    problems = []
    if not env["cuda"]:
        problems.append("torch sees no CUDA GPU")
    if module is None:
        problems.append("neither tensorrt nor tensorrt_rtx is installed")
    elif "error" in env["tensorrt"]:
        problems.append(f"{module} does not import: {env['tensorrt']['error']}")
    elif (problem := unsupported_tensorrt(module, env["tensorrt"]["version"])) is not None:
        problems.append(problem)
    if env["cuda"]:
        env["device"] = torch.cuda.get_device_name(0)
    env["ready"] = not problems
    env["reason"] = "; ".join(problems) or "CUDA GPU and a supported TensorRT runtime"
    return env


# ---- exports and engines -----------------------------------------------------------------------------


def make_export(variant: str, folder: Path, args: argparse.Namespace) -> Path:
    """The export folder of ``variant`` (kept with --reuse when its manifest verifies)."""
    from export.manifest import ManifestError, read_manifest

    if args.reuse and folder.is_dir():
        try:
            read_manifest(folder, verify=True)
            log.info("%s: reusing %s", variant, folder)
            return folder
        except (ManifestError, FileNotFoundError) as err:
            log.info("%s: %s does not verify (%s); exporting again", variant, folder, err)
    t0 = time.perf_counter()
    if variant == "fp16":
        from dgq import zoo
        from export.float_export import export_float

        pipe = zoo.load_pipeline(args.model)
        export_float(pipe, folder, fp16=True, batch=(1, 1, args.max_batch), overwrite=True)
    else:
        from scripts.export_onnx import main as export_main

        argv = ["--model", args.model, "--target", "tensorrt", "--wbits", str(WBITS[variant]), "--abits", "8"]
        argv += ["--num-prompts", str(args.num_prompts), "--steps", str(args.steps), "--guidance", str(args.guidance)]
        argv += ["--max-batch", str(args.max_batch), "--out", str(folder), "--overwrite"]
        if export_main(argv) != 0:
            raise RuntimeError(f"{variant}: the export failed (see the log above)")
    log.info("%s: exported to %s in %.1f s", variant, folder, time.perf_counter() - t0)
    return folder


def build(variant: str, folder: Path) -> dict[str, Any]:
    from runtime import build as trt_build

    results = trt_build.build_engines(folder, overwrite=True)
    return {
        c: {"engine_mb": round(r.engine_bytes / 1e6, 2), "build_s": round(r.build_seconds, 2)}
        for c, r in results.items()
    }


# ---- parity ------------------------------------------------------------------------------------------


def _parity_feed(spec, manifest) -> dict:
    """One UNet feed at the opt shapes; a calibrated timestep (the middle slot) and its step_index."""
    import torch

    from export.float_export import example_inputs

    feed = example_inputs(spec, seed=0)
    slots = manifest.get("slots")
    if slots:
        k = len(slots) // 2
        feed["timestep"] = torch.tensor(float(slots[k]), dtype=torch.float32)
        if "step_index" in feed:
            feed["step_index"] = torch.tensor(k, dtype=torch.int64)
    return feed


def _torch_unet(variant: str, folder: Path, model: str):
    """The PyTorch reference: the float UNet (fp16) or the DGQ simulator of the export's recipe."""
    from dgq import zoo
    from export.float_export import UNetForExport

    pipe = zoo.load_pipeline(model)
    if variant != "fp16":
        from dgq.recipe import load
        from dgq.simulate import simulate

        pipe = simulate(pipe, load(folder / "recipe.safetensors"))
    return UNetForExport(pipe.unet).eval()


def unet_parity(variant: str, folder: Path, model: str) -> dict[str, float]:
    import torch

    from dgq.eval.metrics import sqnr_db
    from export.iospec import read_specs
    from export.manifest import read_manifest
    from runtime.build import check_engine_loadable, read_engine_meta
    from runtime.runners import OnnxRuntimeRunner, TensorRTRunner, to_numpy

    spec, manifest = read_specs(folder)["unet"], read_manifest(folder)
    feed = _parity_feed(spec, manifest)
    engine = folder / "unet.engine"
    module = check_engine_loadable(read_engine_meta(engine))
    with TensorRTRunner(engine, spec, module=module) as runner:
        got = torch.from_numpy(to_numpy(runner.infer(feed)["noise_pred"])).double()
    with OnnxRuntimeRunner(folder / "unet.onnx", spec, optimization="off") as ort_runner:
        ort = torch.from_numpy(to_numpy(ort_runner.infer(feed)["noise_pred"])).double()
    unet = _torch_unet(variant, folder, model)
    with torch.inference_mode():  # float32 PyTorch, whatever the graph's IO precision
        ref = unet(feed["sample"].float(), feed["timestep"], feed["encoder_hidden_states"].float()).double()
    return {
        "engine_vs_onnxruntime_db": float(sqnr_db(ort, got)),
        "engine_vs_torch_db": float(sqnr_db(ref, got)),
        "onnxruntime_vs_torch_db": float(sqnr_db(ref, ort)),
    }


def image_parity(folder: Path, prompts: list[str], steps: int, guidance: float) -> dict[str, Any]:
    import numpy as np

    from runtime.pipeline import Text2ImagePipeline

    engines = Text2ImagePipeline.from_export(folder, backend="tensorrt", cuda_graph=True)
    reference = Text2ImagePipeline.from_export(folder, backend="onnxruntime")
    seeds = list(range(len(prompts)))
    with engines:
        got = engines(prompts, seed=seeds, steps=steps, guidance=guidance)
    want = reference(prompts, seed=seeds, steps=steps, guidance=guidance)
    mse = float(np.mean((got.images.astype(np.float64) - want.images.astype(np.float64)) ** 2))
    return {
        "image_psnr_db": math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse),
        "graph_mode": engines.unet.graph_mode,
        "unet_ms_per_step": round(got.timings.unet_median_s * 1e3, 3),
    }


def check_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    from export.manifest import read_manifest

    result: dict[str, Any] = {"floors_db": PARITY_FLOORS_DB[variant], "failures": []}
    try:
        folder = make_export(variant, args.out / variant, args)
        result["export"] = str(folder)
        result["engines"] = build(variant, folder)
        result.update(unet_parity(variant, folder, args.model))
        manifest = read_manifest(folder)
        steps = int(manifest.get("steps") or args.steps)
        result.update(image_parity(folder, _prompts(args), steps, args.guidance))
    except Exception as err:  # one variant's failure is reported and the others still run
        log.exception("%s failed", variant)
        result["failures"].append(f"{type(err).__name__}: {err}")
        return result
    for key, floor in PARITY_FLOORS_DB[variant].items():
        if not result[key] >= floor:
            result["failures"].append(f"{key} {result[key]:.2f} dB is under its floor {floor} dB")
    return result


def _prompts(args: argparse.Namespace) -> list[str]:
    from dgq.eval.data import default_prompts

    return [text for text, _ in default_prompts(args.images)]  # the evaluation prompts, not the calibration's


# ---- report -------------------------------------------------------------------------------------------


def table(results: dict[str, dict[str, Any]]) -> str:
    def db(value):
        return "-" if value is None else ("inf" if math.isinf(value) else f"{value:.1f}")

    rows = [("variant", "UNet MB", "UNet ms", "engine~ORT dB", "engine~torch dB", "ORT~torch dB", "image dB", "result")]
    for variant, r in results.items():
        rows.append(
            (
                variant,
                f"{r['engines']['unet']['engine_mb']:.2f}" if "engines" in r else "-",
                f"{r['latency']['median_ms']:.3f}" if "latency" in r else "-",
                db(r.get("engine_vs_onnxruntime_db")),
                db(r.get("engine_vs_torch_db")),
                db(r.get("onnxruntime_vs_torch_db")),
                db(r.get("image_psnr_db")),
                "FAIL" if r["failures"] else "ok",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    log.info("wrote %s", path)


# ---- torch-only: streams and CUDA graphs on the real device -----------------------------------------


def torch_checks() -> dict[str, Any]:
    """The TensorRT runner on a real CUDA device with the torch-implemented stand-in engine."""
    import contextlib
    import tempfile

    import numpy as np
    import torch

    from runtime.runners import DeviceMemoryPool, TensorRTRunner

    try:
        from tests.runtime import trt_standins as standins
    except ImportError as err:
        raise RuntimeError(f"--torch-only needs the repository's tests/ (a checkout, not an install): {err}") from err

    fake = standins.make_tensorrt("tensorrt")
    checks: dict[str, Any] = {}

    def expect(feed) -> np.ndarray:
        return standins.as_numpy(
            standins.unet_like_compute({k: torch.as_tensor(v) for k, v in feed.items()})["noise_pred"]
        )

    def close(got, feed, dtype: str) -> bool:
        want = expect(feed).astype(np.float64)
        tol = 1e-2 if dtype == "float16" else 1e-5  # the device's kernels against CPU's, one elementwise op
        return bool(np.allclose(standins.as_numpy(got).astype(np.float64), want, rtol=tol, atol=tol))

    saved = sys.modules.get("tensorrt")
    sys.modules["tensorrt"] = fake
    try:
        with tempfile.TemporaryDirectory() as tmp, standins.address_registry():

            def runner(dtype="float32", **kwargs):
                network = standins.FakeNetwork(standins.unet_like_spec(dtype), standins.unet_like_compute)
                path = Path(tmp) / f"unet-{len(list(Path(tmp).iterdir()))}.engine"
                path.write_bytes(fake.plan_for(network))
                return TensorRTRunner(path, network.spec, module="tensorrt", **kwargs)

            for dtype in ("float32", "float16"):
                for numpy_feed in (False, True):
                    for graph in (False, True):
                        key = f"feed {dtype} {'numpy' if numpy_feed else 'torch'} cuda_graph={graph}"
                        with runner(dtype, cuda_graph=graph) as r:
                            ok = True
                            for seed in range(3):
                                feed = standins.unet_like_feed(r.spec, seed=seed, numpy=numpy_feed)
                                ok &= close(r.infer(feed)["noise_pred"], feed, dtype)
                        checks[key] = ok
            # Inputs written late on a side stream: the runner must wait for that stream.
            with runner() as r:
                side = torch.cuda.Stream()
                feed = standins.unet_like_feed(r.spec, seed=7)
                device_feed = {k: torch.zeros_like(v, device=r.device) for k, v in feed.items()}
                with torch.cuda.stream(side):
                    if r.device.startswith("cuda"):
                        torch.cuda._sleep(50_000_000)  # keep the side stream busy before the inputs are written
                    for k, v in feed.items():
                        device_feed[k].copy_(v, non_blocking=True)
                    got = r.infer(device_feed)["noise_pred"]
                checks["waits for the caller's stream"] = close(got, feed, "float32")
            # Capture and replay across alternating shapes.
            with runner(cuda_graph=True) as r:
                ok = True
                for i in range(6):
                    feed = standins.unet_like_feed(r.spec, seed=i, batch=1 + i % 2)
                    ok &= close(r.infer(feed)["noise_pred"], feed, "float32")
                checks["graphs replay across shapes"] = ok and r.graph_mode == "manual"
            # Re-activation with a shared memory pool.
            pool = DeviceMemoryPool()
            r = runner(memory_pool=pool, cuda_graph=True)
            ok = True
            for _ in range(2):
                with r:
                    feed = standins.unet_like_feed(r.spec)
                    ok &= close(r.infer(feed)["noise_pred"], feed, "float32")
            checks["re-activation with a memory pool"] = ok and pool.nbytes == 0
    finally:
        with contextlib.suppress(KeyError):
            del sys.modules["tensorrt"]
        if saved is not None:
            sys.modules["tensorrt"] = saved
    return {"checks": checks, "failures": [k for k, ok in checks.items() if not ok]}


# ---- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_check"), help="folder for exports and results")
    parser.add_argument("--model", default=None, help="zoo name or pipeline folder (default: the default model)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to check")
    parser.add_argument("--num-prompts", type=int, default=16, help="calibration prompts (default 16)")
    parser.add_argument("--steps", type=int, default=25, help="calibration and sampling steps (default 25)")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance (default 5)")
    parser.add_argument("--max-batch", type=int, default=2, help="images per call in the profiles (default 2)")
    parser.add_argument("--images", type=int, default=2, help="prompts for the image comparison (default 2)")
    parser.add_argument("--runs", type=int, default=50, help="timed UNet calls per variant (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    parser.add_argument("--reuse", action="store_true", help="keep export folders in --out that verify")
    parser.add_argument(
        "--torch-only", action="store_true", help="only the runner's streams and CUDA graphs (no TensorRT)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    if args.torch_only:
        if not torch.cuda.is_available():
            sys.stdout.write("no CUDA GPU here: the torch-side check needs one; nothing was run\n")
            _write(args.out / "gpu_check_torch.json", {"status": "skipped", "reason": "torch sees no CUDA GPU"})
            return 0
        result = torch_checks()
        result["status"] = "failed" if result["failures"] else "passed"
        result["device"] = torch.cuda.get_device_name(0)
        for name, ok in result["checks"].items():
            sys.stdout.write(f"{'ok  ' if ok else 'FAIL'}  {name}\n")
        _write(args.out / "gpu_check_torch.json", result)
        return 1 if result["failures"] else 0

    env = environment()  # first: without a GPU nothing else is worth loading
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    doc: dict[str, Any] = {"environment": env, "model": args.model or "default", "settings": settings}
    if not env["ready"]:
        sys.stdout.write(
            f"GPU check skipped: {env['reason']}. Engines can still be built ahead of time "
            "(scripts/build_engine.py); running them needs a CUDA GPU with TensorRT.\n"
        )
        _write(args.out / "gpu_check.json", doc | {"status": "skipped"})
        return 0
    log.info("%s %s on %s", env["tensorrt"]["module"], env["tensorrt"]["version"], env.get("device"))
    from dgq import zoo

    args.model = doc["model"] = args.model or zoo.DEFAULT_MODEL

    results = {variant: check_variant(variant, args) for variant in args.variants}
    built = {v: Path(r["export"]) / "unet.engine" for v, r in results.items() if "engines" in r}
    if built:
        from scripts.benchmark_engines import measure_latency

        try:
            for variant, latency in measure_latency(built, "unet", args.runs, args.warmup).items():
                results[variant]["latency"] = latency
        except Exception as err:  # the parity figures are still worth writing
            log.exception("latency measurement failed")
            for variant in built:
                results[variant]["failures"].append(f"latency: {type(err).__name__}: {err}")
    failed = [v for v, r in results.items() if r["failures"]]
    doc |= {"status": "failed" if failed else "passed", "variants": results}
    sys.stdout.write(table(results) + "\n")
    for variant in failed:
        for failure in results[variant]["failures"]:
            sys.stdout.write(f"{variant}: {failure}\n")
    _write(args.out / "gpu_check.json", doc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
