"""``dgq eval``: the yardstick from the command line (a thin layer over ``dgq.eval.yardstick``).

Wire it into a parent parser with ``add_parser(subparsers)``; the parser's ``func`` is :func:`run`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common import argtypes
from common.constants import DEFAULT_GUIDANCE, DEFAULT_STEPS
from dgq import schedulers
from dgq.device import add_arguments as add_device_arguments

log = logging.getLogger(__name__)

SAME = "same"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="measure a candidate pipeline against its float reference (SQNR, PSNR/SSIM, FID, judge)",
        description="The yardstick: generate the same prompts and seeds with a float reference and a "
        "candidate pipeline and report noise-prediction SQNR per step, paired PSNR/SSIM, FID against "
        "real Fashion-MNIST test images and against the reference, judge accuracy and label flips. "
        "Writes results.json, summary.txt and plots to --out. Launched with torchrun or accelerate launch, "
        "the processes (GPUs) share the samples and rank 0 scores and writes: the numbers of one process.",
    )
    p.add_argument(
        "--model", default=None, help="reference: zoo name, pipeline folder or hub id (default: the default model)"
    )
    p.add_argument(
        "--candidate",
        default=SAME,
        help=f"candidate: another model spec, or {SAME!r} for the reference itself (a self-check: "
        "infinite SQNR/PSNR, SSIM 1, zero flips) (default: same)",
    )
    p.add_argument(
        "--recipe",
        type=Path,
        default=None,
        help="a DGQ recipe: the candidate is the reference with its UNet quantized by the PyTorch simulator "
        "(overrides --candidate)",
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed for random-weight zoo models (default 0)")
    p.add_argument(
        "--num-prompts",
        type=argtypes.integer(1, why="nothing to evaluate otherwise"),
        default=20,
        help="evaluation prompts, class-balanced (default 20)",
    )
    p.add_argument(
        "--seeds",
        type=argtypes.integer(1, why="nothing to evaluate otherwise"),
        default=2,
        help="image seeds per prompt (default 2)",
    )
    p.add_argument("--seed-start", type=int, default=0, help="first image seed (default 0)")
    p.add_argument(
        "--steps", type=argtypes.steps, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})"
    )
    schedulers.add_argument(p, "of both pipelines")
    p.add_argument(
        "--guidance",
        type=argtypes.guidance,
        default=DEFAULT_GUIDANCE,
        help=f"classifier-free guidance scale >= 0; up to 1 turns guidance off (default {DEFAULT_GUIDANCE:g})",
    )
    p.add_argument(
        "--batch-size",
        type=argtypes.integer(1, why="a pipeline call takes one image at least"),
        default=8,
        help="images per pipeline call (default 8)",
    )
    p.add_argument(
        "--num-real",
        type=argtypes.integer(0),
        default=500,
        help="real test images for FID vs real; 0 skips it (default 500)",
    )
    p.add_argument("--no-fid", action="store_true", help="skip FID (the slowest part on a CPU)")
    p.add_argument("--no-judge", action="store_true", help="skip judge accuracy and label flips")
    p.add_argument("--no-noise", action="store_true", help="skip per-step noise-prediction metrics")
    p.add_argument("--out", type=Path, default=Path("outputs/eval"), help="output folder (default outputs/eval)")
    add_device_arguments(p, "both pipelines")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from dgq import distributed, zoo
    from dgq.device import place, resolve_device, resolve_dtype
    from dgq.eval.data import default_prompts, real_images
    from dgq.eval.yardstick import YardstickConfig, evaluate, format_table, write_report

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    config = YardstickConfig(
        seeds=tuple(range(args.seed_start, args.seed_start + args.seeds)),
        steps=args.steps,
        guidance=args.guidance,
        batch_size=args.batch_size,
        noise_fidelity=not args.no_noise,
        fid=not args.no_fid,
        judge=not args.no_judge,
        progress=sys.stderr.isatty(),
    )
    prompts = default_prompts(args.num_prompts)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    # Launched as several processes (torchrun / accelerate launch): the samples are shared out,
    # rank 0 scores and writes.
    shard = distributed.init(device)
    reference = schedulers.use(place(zoo.load_pipeline(args.model, seed=args.seed), device, dtype), args.scheduler)
    if args.recipe is not None:
        from dgq.recipe import load
        from dgq.simulate import simulate

        candidate = simulate(reference, load(args.recipe))
        args.candidate = f"recipe {args.recipe}"
    else:
        candidate = (
            reference
            if args.candidate == SAME
            else schedulers.use(place(zoo.load_pipeline(args.candidate, seed=args.seed), device, dtype), args.scheduler)
        )
    for pipe in {id(reference): reference, id(candidate): candidate}.values():
        pipe.set_progress_bar_config(disable=True)  # one bar for the whole run, not one per image batch
    real = real_images(args.num_real)[0] if config.fid and args.num_real > 0 else None
    reference_name = args.model or zoo.DEFAULT_MODEL
    log.info(
        "evaluating %s against %s: %d prompts x %d seeds, %d steps, guidance %g",
        args.candidate,
        reference_name,
        len(prompts),
        len(config.seeds),
        config.steps,
        config.guidance,
    )
    result = evaluate(reference, candidate, prompts, config, real_images=real)
    if not shard.is_main:
        distributed.finish()
        return 0
    result.results["models"] = {"reference": reference_name, "candidate": args.candidate}
    paths = write_report(result, args.out, title=f"{args.candidate} vs {reference_name}")
    sys.stdout.write(format_table(result.results) + "\n")
    for path in paths.values():
        sys.stdout.write(f"{path}\n")
    sys.stdout.write(f"sampled on {shard.world} process(es)\n")
    distributed.finish()
    return 0
