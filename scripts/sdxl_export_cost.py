"""What exporting and building the full-size SDXL UNet (2.6B parameters) costs on this machine.

    python scripts/sdxl_export_cost.py --work /tmp/sdxl --out results/sdxl_export_cost.json

Two phases, each in a fresh process so its peak RSS is its own: (1) build the ``sdxl`` zoo UNet
(random weights, the published config) and export it with ``export_float`` (float32 or, with
``--fp16``, float16 with the timestep path in float32; weights in ``unet.onnx.data``); (2) build
its TensorRT engine ahead of time with ``runtime.build.build_engines`` (TensorRT-RTX builds without
a GPU). Reports seconds, peak RSS and file sizes per phase, and writes a JSON document. ``--work``
holds the export and the engine (tens of GB); ``--keep`` leaves them there.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import resource
import shutil
import sys
import time
from pathlib import Path

from common import argtypes
from common.fsutil import atomic_file


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _export(folder: str, fp16: bool, queue) -> None:
    import torch

    from dgq import zoo
    from export.float_export import export_float

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    pipe = zoo.build_pipeline("sdxl", components=["unet"])
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    export_float(pipe, folder, components=("unet",), fp16=fp16)
    queue.put(
        {
            "build_unet_s": round(built, 1),
            "export_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gib": round(_peak_gib(), 2),
        }
    )


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _engine(folder: str, workspace: float, queue) -> None:
    from runtime.build import EngineBuildError, build_engines

    errors = _Errors()
    logging.getLogger().addHandler(errors)
    t0 = time.perf_counter()
    try:
        res = build_engines(folder, components=["unet"], workspace_gib=workspace)["unet"]
    except EngineBuildError as err:
        # TensorRT's own errors (e.g. an allocation larger than the machine) go to the log; keep them.
        queue.put(
            {
                "error": str(err),
                "tensorrt_errors": errors.messages,
                "seconds_to_failure": round(time.perf_counter() - t0, 1),
                "peak_rss_gib": round(_peak_gib(), 2),
            }
        )
        return
    meta = json.loads(res.metadata.read_text())
    queue.put(
        {
            "build_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gib": round(_peak_gib(), 2),
            "engine_bytes": res.engine_bytes,
            "network": json.loads(res.report.read_text())["network"]["summary"],
            "tensorrt": meta["tensorrt"],
            "gpu": meta["gpu"],
        }
    )


def _run(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{target.__name__} exited with status {proc.exitcode} (killed for memory if -9)")
    return queue.get()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="scratch folder for the export and the engine")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--fp16", action="store_true", help="export a float16 graph (default float32)")
    p.add_argument("--no-engine", action="store_true", help="export only")
    p.add_argument("--workspace-gib", type=argtypes.real(0.0, strict=True), default=8.0, help="builder workspace")
    p.add_argument("--keep", action="store_true", help="keep the export and the engine in --work")
    args = p.parse_args(argv)
    if args.out.suffix != ".json":
        p.error(f"--out must be a .json file, got {args.out}")
    folder = args.work / "sdxl_unet"
    if folder.exists():
        p.error(f"{folder} exists; remove it or pick another --work")
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        doc = {"model": "sdxl", "precision": "float16" if args.fp16 else "float32"}
        doc["export"] = _run(_export, str(folder), args.fp16)
        doc["export"]["files_bytes"] = {q.name: q.stat().st_size for q in sorted(folder.iterdir()) if q.is_file()}
        print(json.dumps(doc["export"], indent=2), flush=True)
        if not args.no_engine:
            doc["engine"] = _run(_engine, str(folder), args.workspace_gib)
            print(json.dumps(doc["engine"], indent=2), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out) as f:
        f.write((json.dumps(doc, indent=2) + "\n").encode())
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
