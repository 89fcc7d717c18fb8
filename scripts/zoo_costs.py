"""Measure what each zoo model costs to build on this machine: parameters, seconds, peak memory.

Each model is built in a fresh subprocess so peak RSS is its own. Writes a markdown table (the one
in the README) and a JSON file.

    python scripts/zoo_costs.py --out outputs/zoo_costs.json
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import resource
import time
from pathlib import Path

log = logging.getLogger("zoo_costs")


def _measure(name: str, queue) -> None:
    import torch

    from dgq import zoo

    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    pipe = zoo.build_pipeline(name)
    seconds = time.perf_counter() - t0
    params = {
        comp: sum(p.numel() for p in getattr(pipe, comp).parameters())
        for comp in ("unet", "text_encoder", "text_encoder_2", "vae")
        if getattr(pipe, comp, None) is not None
    }
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
    queue.put({"model": name, "build_s": round(seconds, 1), "peak_rss_gib": round(peak_gib, 2), "params": params})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "sd15", "sd21", "sdxl"], help="zoo names")
    parser.add_argument("--out", type=Path, default=Path("outputs/zoo_costs.json"), help="JSON output path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    ctx = mp.get_context("spawn")
    rows = []
    for name in args.models:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(name, queue))
        proc.start()
        row = queue.get()
        proc.join()
        log.info("%s: %s", name, row)
        rows.append(row)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    lines = ["| model | UNet params | all params | fp32 weights | build time | peak RSS |", "|---|---|---|---|---|---|"]
    for r in rows:
        total = sum(r["params"].values())
        lines.append(
            f"| {r['model']} | {r['params'].get('unet', 0) / 1e6:.1f} M | {total / 1e6:.1f} M | "
            f"{total * 4 / 2**30:.2f} GiB | {r['build_s']} s | {r['peak_rss_gib']} GiB |"
        )
    print("\n".join(lines))  # the table is this script's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
