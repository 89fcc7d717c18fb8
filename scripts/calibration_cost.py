"""Measure what a DGQ calibration costs: time per phase, statistics memory and peak memory, and the
projection to a full calibration.

    python scripts/calibration_cost.py --model fashion --out results/calibration_cost_fashion.json
    python scripts/calibration_cost.py --model sd15 --size 512 --prompts 1 --steps 2 --batch-size 1 \\
        --out results/calibration_cost_sd15_512.json
    python scripts/calibration_cost.py --model sdxl --size 1024 --prompts 1 --steps 2 --batch-size 1 \\
        --weight-search skip --out results/calibration_cost_sdxl_1024.json
    python scripts/calibration_cost.py --footprint-only --out results/calibration_footprint.json

Phases, timed apart: loading the pipeline; the statistics pass (the float pipeline with observers;
reported per prompt x step); the group search (K-means per site and slot; reported per slot); the
weight MSE search (80 candidate ranges per output channel; depends on the weights only, so on neither
prompts, steps nor size; ``--weight-search skip`` leaves it out where it would take hours on a CPU).
The projection to ``--project-prompts`` x ``--project-steps`` (default 64 x 25) scales each phase by
what it depends on. Peak memory: the process's peak RSS, and torch's peak allocation on a GPU.

``--footprint-only``: no weights and no compute. The sd15, sd21 and sdxl UNets are built on torch's
``meta`` device and one call's shapes give the statistics a calibration keeps per step (exact: the
calibration's own hooks, counting), next to the weights' bytes.

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

from common import argtypes
from common.constants import DEFAULT_GUIDANCE

log = logging.getLogger("calibration_cost")

# The zoo's Stable Diffusion configs at their native sizes (latent = pixels / 8).
FOOTPRINT_MODELS = (("sd15", "SD15_UNET", 512), ("sd21", "SD21_UNET", 768), ("sdxl", "SDXL_UNET", 1024))


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def footprint(steps: int) -> dict:
    """Statistics bytes per slot and for ``steps`` slots, and weight bytes, of the SD configs (meta)."""
    import torch
    from diffusers import UNet2DConditionModel

    from dgq.calibrate import statistics_footprint
    from dgq.zoo import configs

    rows = []
    for name, attr, size in FOOTPRINT_MODELS:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**getattr(configs, attr))
        fp = statistics_footprint(unet, size // 8)
        params = sum(p.numel() for p in unet.parameters())
        rows.append(
            {
                "model": name,
                "size": size,
                "unet_params": params,
                "sites": fp["sites"],
                "statistics_mib_per_step": _mib(fp["bytes_per_slot"]),
                f"statistics_mib_{steps}_steps": _mib(fp["bytes_per_slot"] * steps),
                "weights_gib_float32": round(params * 4 / 2**30, 2),
                "weights_gib_float16": round(params * 2 / 2**30, 2),
            }
        )
    return {"steps": steps, "models": rows}


def measure(args: argparse.Namespace) -> dict:
    import torch

    from dgq import zoo
    from dgq.calibrate import (
        build_recipe,
        collect_statistics,
        layer_weight_quant,
        statistics_bytes,
        statistics_footprint,
    )
    from dgq.config import preset
    from dgq.device import place, resolve_device, resolve_dtype
    from dgq.prompts import calibration_prompts
    from dgq.sites import layer_sites

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    cuda = device.type == "cuda"
    model = args.model or zoo.DEFAULT_MODEL
    t0 = time.perf_counter()
    pipe = place(zoo.load_pipeline(model), device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if cuda:
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0
    load_peak = _peak_gib()
    progress = sys.stderr.isatty()

    t1 = time.perf_counter()
    stats = collect_statistics(
        pipe,
        calibration_prompts(model, args.prompts),
        args.steps,
        args.guidance,
        size=args.size,
        batch_size=args.batch_size,
        progress=progress,
    )
    stats_s = time.perf_counter() - t1
    size = stats.meta["size"]
    planned = statistics_footprint(pipe.unet, size // int(pipe.vae_scale_factor))

    config = preset("dgq", groups=args.groups)
    t2 = time.perf_counter()
    recipe = build_recipe(stats, pipe.unet, config.replace(weight_init="minmax"), progress=progress)
    search_s = time.perf_counter() - t2  # the min-max weight ranges in it take well under a second
    weight_s = None
    if args.weight_search == "mse":
        t3 = time.perf_counter()
        for site in layer_sites(pipe.unet, config):
            layer_weight_quant(pipe.unet, site, recipe.acts.get(site.input_key), config)
        if cuda:
            torch.cuda.synchronize(device)
        weight_s = time.perf_counter() - t3

    calls = args.prompts * args.steps
    slots = len(stats.slots)
    p_prompts, p_steps = args.project_prompts, args.project_steps
    projected = {
        "statistics_s": round(stats_s / calls * p_prompts * p_steps),
        "group_search_s": round(search_s / slots * p_steps),
        "weight_search_s": None if weight_s is None else round(weight_s),
    }
    projected["total_s"] = None if weight_s is None else sum(projected.values())
    return {
        "model": model,
        "device": str(device),
        "dtype": args.dtype,
        "torch_threads": torch.get_num_threads(),
        "unet_params": sum(p.numel() for p in pipe.unet.parameters()),
        "size": size,
        "prompts": args.prompts,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "slots": slots,
        "groups": args.groups,
        "activation_sites": len(recipe.acts),
        "quantized_layers": len(recipe.weights),
        "load_s": round(load_s, 1),
        "statistics_s": round(stats_s, 1),
        "statistics_s_per_prompt_step": round(stats_s / calls, 2),
        "group_search_s": round(search_s, 1),
        "group_search_s_per_slot": round(search_s / slots, 2),
        "weight_search_s": None if weight_s is None else round(weight_s, 1),
        "statistics_bytes": statistics_bytes(stats),
        "statistics_bytes_per_step_planned": planned["bytes_per_slot"],
        "statistics_mib": _mib(statistics_bytes(stats)),
        "peak_rss_gib_after_load": round(load_peak, 2),
        "peak_rss_gib": round(_peak_gib(), 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        f"projected_{p_prompts}x{p_steps}": projected,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="zoo name, folder or hub id (default: the default model)")
    parser.add_argument("--prompts", type=argtypes.integer(1), default=64, help="calibration prompts (default 64)")
    parser.add_argument("--steps", type=argtypes.integer(1), default=25, help="sampler steps (default 25)")
    parser.add_argument(
        "--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"guidance scale (default {DEFAULT_GUIDANCE:g})"
    )
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    parser.add_argument(
        "--batch-size", type=argtypes.integer(1), default=8, help="prompts per pipeline call (default 8)"
    )
    parser.add_argument("--groups", type=int, default=16, help="K (default 16)")
    parser.add_argument(
        "--weight-search",
        choices=("mse", "skip"),
        default="mse",
        help="time the weight MSE search (default), or skip it (hours for billions of weights on a CPU)",
    )
    parser.add_argument("--project-prompts", type=int, default=64, help="projection: prompts (default 64)")
    parser.add_argument("--project-steps", type=int, default=25, help="projection: steps (default 25)")
    parser.add_argument(
        "--footprint-only",
        action="store_true",
        help="no run: statistics and weight bytes of the sd15/sd21/sdxl configs from shapes (meta device)",
    )
    from dgq.device import add_arguments

    add_arguments(parser, "the pipeline")
    parser.add_argument("--out", type=Path, required=True, help="JSON output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = footprint(args.project_steps) if args.footprint_only else measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
