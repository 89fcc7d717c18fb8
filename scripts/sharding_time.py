"""Time one calibration in 1 process and in N processes (torchrun), and compare the recipes' bytes.

    python scripts/sharding_time.py --model fashion --num-prompts 16 --processes 2 \\
        --out results/sharding_fashion.json

Each run is the real command, ``dgq calibrate`` (``python -m app.cli calibrate``), the N-process one
under ``python -m torch.distributed.run --standalone --nproc-per-node N``, timed from outside
(process start to exit, model load included). Threads: the single process gets ``--threads`` torch
threads and each of the N processes ``--threads // N`` (at least 1), so both runs use the same cores;
the recipes are byte-identical when every process runs one thread (torch's CPU kernels round
differently with another thread count), and the JSON says whether they were.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import argtypes

REPO = Path(__file__).resolve().parents[1]


def _calibrate(args: argparse.Namespace, out: Path, processes: int, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    launcher = (
        [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    )
    cmd = [sys.executable, *launcher, "-m", "app.cli", "calibrate", "--model", args.model, "--out", str(out)]
    cmd += ["--num-prompts", str(args.num_prompts), "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    cmd += ["--device", "cpu", *args.extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fashion", help="zoo name or pipeline folder (default fashion)")
    parser.add_argument("--num-prompts", type=int, default=16, help="calibration prompts (default 16)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call (default 4)")
    parser.add_argument("--processes", type=argtypes.integer(2), default=2, help="N (default 2)")
    parser.add_argument(
        "--threads", type=argtypes.integer(1), default=os.cpu_count() or 1, help="cores to use (default: all)"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON output")
    parser.add_argument("extra", nargs="*", help="more dgq calibrate options, after --")
    args = parser.parse_args(argv)
    per_process = max(1, args.threads // args.processes)
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one.safetensors", Path(tmp) / "many.safetensors"
        one_s = _calibrate(args, one, 1, args.threads)
        many_s = _calibrate(args, many, args.processes, per_process)
        identical = one.read_bytes() == many.read_bytes()
    result = {
        "model": args.model,
        "prompts": args.num_prompts,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "options": args.extra,
        "cpu_count": os.cpu_count(),
        "one_process": {"threads": args.threads, "seconds": round(one_s, 1)},
        f"{args.processes}_processes": {"threads_each": per_process, "seconds": round(many_s, 1)},
        "speedup": round(one_s / many_s, 2),
        "recipes_byte_identical": identical,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
