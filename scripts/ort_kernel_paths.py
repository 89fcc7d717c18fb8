"""Do ONNX Runtime's integer kernels compute what the exported Q/DQ graphs say, on every x86 CPU?

    python scripts/ort_kernel_paths.py --out results/ort_kernel_paths.json

ONNX Runtime's CPU provider picks its int8 GEMM kernels by instruction set (AVX512-VNNI/AMX,
AVX2, SSE4.1), so one machine exercises one kernel path. This script forces the others by running
itself under QEMU's user-mode emulator with an older CPU model (``qemu-x86_64 -cpu Haswell-v4``:
AVX2 without VNNI; ``-cpu Nehalem-v2``: SSE4.2), which changes what CPUID reports and hence which
kernels ONNX Runtime selects. Debian/Ubuntu: ``apt-get install qemu-user``.

Per CPU path it reports (1) the saturation probe of ``export.ort_session`` (relative error of a
fused u8/s8 MatMul and a QLinearConv against their exact integer result, with ONNX Runtime's
defaults and with its exact path) and (2) for the tiny model's exports of every target (the
test suite's recipes), per calibrated step: SQNR in dB of the graph with optimizations off against
the float UNet (the quantization noise), of the optimized graph against float, and of the optimized
graph against the unoptimized one, with ONNX Runtime's default options and with the project's
(``export.ort_session.session_options``). Emulated runs are slow (minutes per CPU); timings mean
nothing there, only the numbers computed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("ort_kernel_paths")

CAL = ["a photo of a cat", "a red car on a street"]
STEPS = 3
TARGETS = {  # name -> (target, recipe settings): the test suite's tiny exports
    "faithful": ("faithful", {"groups": 8}),
    "faithful_w4": ("faithful", {"groups": 8, "wbits": 4, "weight_granularity": "block", "weight_block": 32}),
    "tensorrt": ("tensorrt", {"groups": 4, "profile": "tensorrt", "outlier_bits": 16}),
    "tensorrt_w4": ("tensorrt", {"groups": 4, "profile": "tensorrt", "outlier_bits": 16, "wbits": 4}),
    "onnxruntime": ("onnxruntime", {"groups": 4}),
}
DEFAULT_CPUS = ("Haswell-v4", "Nehalem-v2")


def build_exports(folder: Path) -> None:
    """Float and quantized exports of the tiny model, feeds and the float UNet's outputs."""
    import torch

    from dgq import zoo
    from dgq.calibrate import build_recipe, calibrate_outputs, collect_statistics
    from dgq.config import preset
    from export.float_export import export_float
    from export.qdq_export import ORT_PRESET, export_onnx

    torch.set_num_threads(1)
    pipe = zoo.build_pipeline("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    stats = collect_statistics(pipe, CAL, num_inference_steps=STEPS, progress=False)
    g = torch.Generator().manual_seed(1)
    x, e = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    np.save(folder / "sample.npy", x.numpy())
    np.save(folder / "encoder_hidden_states.npy", e.numpy())
    for name, (target, kw) in TARGETS.items():
        log.info("export %s", name)
        extra = ORT_PRESET if target == "onnxruntime" else {}
        recipe = build_recipe(stats, pipe.unet, preset("dgq", weight_init="minmax", **kw, **extra), progress=False)
        if target == "onnxruntime":
            recipe = calibrate_outputs(pipe, recipe, CAL, STEPS, progress=False)
        export_onnx(pipe, folder / name, recipe, target, components=["unet"], compare_float=False, inspect_ort=False)
        np.save(folder / f"{name}.slots.npy", np.array(recipe.slots, np.float32))
    export_float(pipe, folder / "float", components=["unet"])
    refs = []
    with torch.no_grad():
        for t in np.load(folder / "faithful.slots.npy"):  # every recipe has the same steps
            refs.append(pipe.unet(x, torch.tensor(float(t)), e).sample.numpy())
    np.save(folder / "float_out.npy", np.stack(refs))


def _sqnr(ref: np.ndarray, x: np.ndarray) -> float:
    noise = float(((ref - x) ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * float(np.log10(float((ref**2).sum()) / noise))


def measure(folder: Path) -> dict:
    """The numbers of one CPU path (run natively or under QEMU)."""
    import onnxruntime as ort

    from export.ort_session import create_session, integer_kernels_saturate, probe_errors

    def raw(path: Path, optimize: bool):
        so = ort.SessionOptions()
        so.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    x, e = np.load(folder / "sample.npy"), np.load(folder / "encoder_hidden_states.npy")
    float_out = np.load(folder / "float_out.npy").astype(np.float64)
    out: dict = {
        "probe_default": probe_errors(False),
        "probe_exact_path": probe_errors(True),
        "saturates": integer_kernels_saturate(),
        "graphs": {},
    }
    for name in TARGETS:
        path = folder / name / "unet.onnx"
        sessions = {"off": raw(path, False), "on (ORT defaults)": raw(path, True), "on (project)": create_session(path)}
        rows = []
        for slot, t in enumerate(np.load(folder / f"{name}.slots.npy")):
            feeds = {"sample": x, "timestep": np.array(t, np.float32), "encoder_hidden_states": e}
            feeds["step_index"] = np.array(slot, np.int64)
            got = {k: s.run(None, feeds)[0].astype(np.float64) for k, s in sessions.items()}
            ref = float_out[slot]
            row = {"slot": slot, "off_vs_float_db": _sqnr(ref, got["off"])}
            for k in ("on (ORT defaults)", "on (project)"):
                row[f"{k} vs float_db"] = _sqnr(ref, got[k])
                row[f"{k} vs off_db"] = _sqnr(got["off"], got[k])
            rows.append(row)
        out["graphs"][name] = rows
    return out


def run_path(folder: Path, cpu: str | None) -> dict:
    """``measure`` in a child process, natively (``cpu`` None) or under ``qemu-x86_64 -cpu cpu``."""
    cmd = [sys.executable, __file__, "--worker", str(folder)]
    if cpu is not None:
        cmd = [shutil.which("qemu-x86_64"), "-cpu", cpu, *cmd]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{cpu or 'native'} run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(result: dict) -> str:
    lines = [
        "| CPU path | graph | off vs float | on vs float, ORT defaults | on vs float, project | "
        "on vs off, ORT defaults | on vs off, project |",
        "|---|---|---|---|---|---|---|",
    ]
    for cpu, r in result["paths"].items():
        for name, rows in r["graphs"].items():

            def worst(key, rows=rows):
                return min(row[key] for row in rows)

            lines.append(
                f"| {cpu} | {name} | {worst('off_vs_float_db'):.1f} | {worst('on (ORT defaults) vs float_db'):.1f} | "
                f"{worst('on (project) vs float_db'):.1f} | {worst('on (ORT defaults) vs off_db'):.1f} | "
                f"{worst('on (project) vs off_db'):.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument(
        "--cpus",
        nargs="*",
        default=list(DEFAULT_CPUS),
        help=f"QEMU CPU models to emulate besides the native CPU (default {' '.join(DEFAULT_CPUS)})",
    )
    p.add_argument("--render", type=Path, default=None, help="print the table of an existing JSON file and exit")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        sys.stdout.write(json.dumps(measure(args.worker)) + "\n")
        return 0
    if args.render is not None:
        sys.stdout.write(render(json.loads(args.render.read_text())) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cpus and (platform.machine() != "x86_64" or shutil.which("qemu-x86_64") is None):
        p.error("emulating other CPUs needs an x86_64 machine with qemu-x86_64 (apt-get install qemu-user)")
    import onnxruntime as ort

    from common.cpu import cpu_flags
    from common.fsutil import emit_json

    result: dict = {"onnxruntime": ort.__version__, "native_cpu_flags": cpu_flags(), "paths": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_exports(folder)
        for cpu in [None, *args.cpus]:
            label = "native" if cpu is None else f"qemu -cpu {cpu}"
            log.info("measuring on %s", label)
            result["paths"][label] = run_path(folder, cpu)
    emit_json(result, args.out)
    sys.stdout.write(render(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
