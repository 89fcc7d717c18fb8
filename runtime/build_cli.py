"""Command-line options of the engine build, shared by ``scripts/build_engine.py`` and ``dgq build``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common import argtypes

log = logging.getLogger(__name__)

DESCRIPTION = """\
Build TensorRT engines from a dgq export folder (scripts/export_onnx.py writes one).

For each component (unet, text_encoder, vae_decoder) it verifies the folder's manifest hashes, parses
<component>.onnx strongly typed, adds one optimization profile from iospec.json, and writes
<component>.engine with <component>.engine.json (TensorRT flavour and version, GPU, recipe sha256,
IO spec, settings, build time) and <component>.engine.report.json (which Conv/MatMul layers take
INT8 / INT4-weight / FP8 Q/DQ inputs). Uses the tensorrt module when installed (desktop, Jetson
JetPack), else tensorrt_rtx, which builds ahead of time without a GPU.

Jetson Orin (8-16 GB shared memory): --workspace-gib 1 --optimization-level 2 and build one
component at a time (--components unet); FP8 graphs are refused there (SM 8.7 < 8.9).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", type=Path, help="export folder (manifest.json, iospec.json, <component>.onnx)")
    p.add_argument("--components", nargs="+", default=None, help="components to build (default: all in the manifest)")
    p.add_argument("--out", type=Path, default=None, help="engine folder (default: the export folder)")
    p.add_argument(
        "--workspace-gib",
        type=argtypes.real(0.0, "the builder needs some workspace memory", strict=True),
        default=4.0,
        help="workspace memory pool limit in GiB (default 4; 1 on an 8 GB Orin)",
    )
    p.add_argument(
        "--optimization-level",
        type=int,
        default=None,
        choices=range(6),
        metavar="0-5",
        help="builder_optimization_level (default: TensorRT's, 3); lower builds faster with less memory",
    )
    p.add_argument(
        "--timing-cache", type=Path, default=None, help="timing cache file, loaded if present and saved after the build"
    )
    p.add_argument(
        "--target-sm", default=None, help="compute capability an AOT build targets when no GPU is visible, e.g. 8.9"
    )
    p.add_argument(
        "--refit", action="store_true", help="build refittable engines (weights can be swapped without a rebuild)"
    )
    p.add_argument(
        "--weight-streaming", action="store_true", help="allow streaming weights from host memory at run time"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing engines (those dgq built, with their .engine.json)"
    )


def run(args: argparse.Namespace) -> int:
    from runtime.build import build_engines, report_table

    try:
        from tqdm import tqdm

        def progress(items):
            return tqdm(items, desc="build", unit="engine", disable=not sys.stderr.isatty())
    except ImportError:
        progress = None
    results = build_engines(
        args.export_dir,
        components=args.components,
        out_dir=args.out,
        workspace_gib=args.workspace_gib,
        timing_cache=args.timing_cache,
        refit=args.refit,
        weight_streaming=args.weight_streaming,
        overwrite=args.overwrite,
        optimization_level=args.optimization_level,
        target_sm=args.target_sm,
        progress=progress,
    )
    sys.stdout.write(report_table(results) + "\n")
    for res in results.values():
        sys.stdout.write(f"{res.engine}\n")
    return 0
