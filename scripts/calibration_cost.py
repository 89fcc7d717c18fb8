"""Measure what a DGQ calibration costs: wall time per phase and peak memory (RSS).

    python scripts/calibration_cost.py --model fashion --out outputs/calibration_cost_fashion.json
    python scripts/calibration_cost.py --model sd15 --size 256 --prompts 2 --steps 4 \
        --out outputs/calibration_cost_sd15.json

Random-weight zoo models (sd15, ...) measure structure and cost only; their recipes mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

from common.constants import DEFAULT_GUIDANCE

log = logging.getLogger("calibration_cost")


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="zoo name, folder or hub id (default: the default model)")
    parser.add_argument("--prompts", type=int, default=64, help="calibration prompts (default 64)")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    parser.add_argument(
        "--guidance",
        type=float,
        default=DEFAULT_GUIDANCE,
        help=f"guidance scale (default {DEFAULT_GUIDANCE:g})",
    )
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call (default 8)")
    parser.add_argument("--groups", type=int, default=16, help="K (default 16)")
    parser.add_argument("--out", type=Path, required=True, help="JSON output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from dgq import zoo
    from dgq.calibrate import build_recipe, collect_statistics
    from dgq.config import preset
    from dgq.prompts import calibration_prompts

    model = args.model or zoo.DEFAULT_MODEL
    t0 = time.perf_counter()
    pipe = zoo.load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    load_peak = _peak_gib()
    t1 = time.perf_counter()
    stats = collect_statistics(
        pipe,
        calibration_prompts(model, args.prompts),
        args.steps,
        args.guidance,
        size=args.size,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty(),
    )
    stats_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    recipe = build_recipe(stats, pipe.unet, preset("dgq", groups=args.groups), progress=sys.stderr.isatty())
    build_s = time.perf_counter() - t2
    result = {
        "model": model,
        "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
        "size": stats.meta["size"],
        "prompts": args.prompts,
        "steps": args.steps,
        "slots": len(stats.slots),
        "groups": args.groups,
        "activation_sites": len(recipe.acts),
        "quantized_layers": len(recipe.weights),
        "torch_threads": torch.get_num_threads(),
        "load_s": round(load_s, 1),
        "statistics_s": round(stats_s, 1),
        "search_and_weights_s": round(build_s, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gib_after_load": round(load_peak, 2),
        "peak_rss_gib": round(_peak_gib(), 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
