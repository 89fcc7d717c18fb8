"""The ``dgq`` console entry point. Each subcommand is a thin layer over one library call.

Heavy imports (torch, diffusers) happen inside the handlers so ``dgq --help`` answers at once. Every
command, and the standalone scripts built with :func:`script_main`, runs through :func:`run_command`,
the one place that turns an error a user can act on into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from common import argtypes
from common.constants import DEFAULT_GUIDANCE, DEFAULT_STEPS, QUANT_TARGETS
from common.errors import DGQError

log = logging.getLogger("dgq")

# What a user can act on from its message: the project's own errors, the argument checks of library
# functions (plain ValueErrors: a bad --steps, an unknown preset) and unusable paths. Anything else is
# a bug and keeps its traceback.
USER_ERRORS = (DGQError, ValueError, FileNotFoundError, FileExistsError, PermissionError)
# Exit status of a command stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


DEFAULT_PROMPT = "a photo of a dress"


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="zoo name (see `dgq zoo list`), a diffusers pipeline folder, or a hub id "
        "(default: the built-in default model)",
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed for random-weight zoo models (default 0)")


def _add_size_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--size",
        type=argtypes.image_size,
        default=None,
        help=f"image size in pixels, a multiple of {argtypes.SIZE_MULTIPLE} up to {argtypes.MAX_SIZE} "
        "(default: the model's)",
    )


def _add_scheduler_arg(p: argparse.ArgumentParser, what: str, default: str = "the model's own") -> None:
    from dgq.schedulers import add_argument

    add_argument(p, what, default)


# ---- dgq zoo ---------------------------------------------------------------------------------


def _zoo_list(args: argparse.Namespace) -> int:
    from dgq import zoo

    for name, entry in zoo.ZOO.items():
        mark = "*" if name == zoo.DEFAULT_MODEL else " "
        sys.stdout.write(f"{mark} {name:8s} {entry.description}\n")
    return 0


def _zoo_save(args: argparse.Namespace) -> int:
    from common.fsutil import claim_output
    from dgq import zoo

    with claim_output(args.out, args.overwrite, zoo.is_saved_model, "model folder"):
        pipe = zoo.build_pipeline(args.name, seed=args.seed)
        zoo.save_model(pipe, args.out, args.name, args.seed, overwrite=args.overwrite)
    log.info("saved %s to %s", args.name, args.out)
    sys.stdout.write(f"{args.out}\n")
    return 0


def _add_zoo(sub) -> None:
    p = sub.add_parser("zoo", help="list or save the offline model zoo", description="The offline model zoo.")
    zsub = p.add_subparsers(dest="zoo_cmd", required=True)
    zl = zsub.add_parser("list", help="list zoo models (* marks the default)")
    zl.set_defaults(func=_zoo_list)
    zs = zsub.add_parser("save", help="write a zoo model as a diffusers pipeline folder (save_pretrained)")
    zs.add_argument("name", help="zoo name")
    zs.add_argument("out", type=Path, help="output folder (written atomically)")
    zs.add_argument("--seed", type=int, default=0, help="weight seed for random-weight models")
    zs.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder (one dgq zoo save wrote)"
    )
    zs.set_defaults(func=_zoo_save)


# ---- dgq generate ----------------------------------------------------------------------------


def _generate(args: argparse.Namespace) -> int:
    from dgq.generate import generate, save_images

    seeds = list(range(args.image_seed, args.image_seed + args.num_images))
    if args.onnx is not None:
        from app.generate import generate_from_export, save_timings

        if args.model is not None:
            raise ValueError("--model and --onnx both name what to run; give one")
        if args.steps is None:
            from export.manifest import read_manifest

            calibrated = read_manifest(args.onnx)["steps"]
            args.steps = DEFAULT_STEPS if calibrated is None else calibrated
        images, timings = generate_from_export(
            args.onnx,
            [args.prompt] * len(seeds),
            seeds,
            args.steps,
            args.guidance,
            args.size,
            backend=args.backend,
            scheduler=args.scheduler,
        )
        sys.stdout.write(f"backend: {timings['backend']}\n")
        for i, call in enumerate(timings["calls"]):
            sys.stdout.write(
                f"call {i} ({call['images']} image(s)): text encoder {call['text_encoder_s'] * 1e3:.1f} ms, "
                f"UNet {call['unet_median_s'] * 1e3:.1f} ms/step median over {len(call['unet_step_s'])} steps, "
                f"VAE decoder {call['vae_decoder_s'] * 1e3:.1f} ms, total {call['total_s']:.2f} s\n"
            )
    else:
        if args.backend != "auto":
            raise ValueError("--backend applies to --onnx export folders; the PyTorch pipeline has no backend choice")
        from dgq import schedulers, zoo

        pipe = schedulers.use(zoo.load_pipeline(args.model, seed=args.seed), args.scheduler)
        pipe.set_progress_bar_config(disable=not sys.stderr.isatty())
        images, timings = (
            generate(
                pipe,
                [args.prompt] * len(seeds),
                seeds,
                DEFAULT_STEPS if args.steps is None else args.steps,
                args.guidance,
                args.size,
            ),
            None,
        )
    for path in save_images(images, args.out):
        sys.stdout.write(f"{path}\n")
    if timings is not None:
        sys.stdout.write(f"{save_timings(timings, args.out)}\n")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images with the float PyTorch pipeline or an ONNX/TensorRT export",
        description="Generate PNG images from a prompt with a diffusers pipeline on CPU or GPU, or (--onnx) "
        "with an export folder through ONNX Runtime or TensorRT engines (timings.json is written next to the PNGs).",
    )
    _add_model_arg(p)
    p.add_argument(
        "--onnx",
        type=Path,
        default=None,
        metavar="DIR",
        help="export folder (export_onnx output) to run instead of a PyTorch pipeline",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "onnxruntime", "tensorrt"),
        default="auto",
        help="with --onnx: TensorRT engines (<component>.engine in DIR), ONNX Runtime, or auto: "
        "TensorRT when engines, CUDA and TensorRT are all there, else ONNX Runtime (default auto)",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"text prompt (default: {DEFAULT_PROMPT!r})")
    p.add_argument(
        "--num-images",
        type=argtypes.integer(1, why="at least one image"),
        default=1,
        help="how many images (default 1)",
    )
    p.add_argument("--image-seed", type=int, default=0, help="noise seed of the first image (default 0)")
    p.add_argument(
        "--steps",
        type=argtypes.steps,
        default=None,
        help=f"denoising steps, 1..{argtypes.MAX_STEPS} (default {DEFAULT_STEPS}; with --onnx of a quantized export: "
        "the steps it was calibrated with). A quantized export runs any count: a timestep it was not calibrated "
        "at uses the parameters of the nearest calibrated one",
    )
    _add_scheduler_arg(p, "to generate with", "the model's own; with --onnx, the export's")
    p.add_argument(
        "--guidance",
        type=argtypes.guidance,
        default=DEFAULT_GUIDANCE,
        help=f"classifier-free guidance scale >= 0; up to 1 turns guidance off (default {DEFAULT_GUIDANCE:g})",
    )
    _add_size_arg(p)
    p.add_argument("--out", type=Path, default=Path("outputs/images"), help="output folder (default outputs/images)")
    p.set_defaults(func=_generate)


# ---- dgq quickstart --------------------------------------------------------------------------


def _quickstart(args: argparse.Namespace) -> int:
    from app.quickstart import format_report, run_quickstart

    summary = run_quickstart(
        args.out,
        model=args.model,
        num_images=args.num_images,
        calibration_prompts=args.calibration_prompts,
        steps=args.steps,
        engines=not args.no_engines,
    )
    sys.stdout.write(format_report(summary) + "\n")
    return 0


def _add_quickstart(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="the main job on the built-in default model, offline: calibrate, export, build, generate, compare",
        description="The main job end to end on the default model, offline: build the pipeline and reload it "
        "with from_pretrained; calibrate DGQ on a small prompt set; export the float, onnxruntime and "
        "tensorrt graphs; build the tensorrt export's UNet engine where a TensorRT module is installed; "
        "generate the same prompts and seeds with the float PyTorch pipeline and from every export through "
        "the runtime; write an image grid (float | onnxruntime | tensorrt), PSNR and judge flips against "
        "float, UNet milliseconds per call, file sizes and paths.",
    )
    p.add_argument("--model", default=None, help="zoo name, pipeline folder or hub id (default: the default model)")
    p.add_argument(
        "--num-images",
        type=argtypes.integer(1, 64, why="one image per prompt and seed"),
        default=4,
        help="images per pipeline, one per class prompt and seed (default 4)",
    )
    p.add_argument(
        "--calibration-prompts",
        type=argtypes.integer(1, why="calibration needs a prompt"),
        default=8,
        help="DGQ calibration prompts (default 8, a quick run; the paper and dgq calibrate use 64)",
    )
    p.add_argument(
        "--steps",
        type=argtypes.steps,
        default=DEFAULT_STEPS,
        help=f"denoising steps, calibrated and generated (default {DEFAULT_STEPS})",
    )
    p.add_argument("--no-engines", action="store_true", help="skip the TensorRT engine build")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/quickstart"),
        help="output folder, replaced when an earlier quickstart wrote it (default outputs/quickstart)",
    )
    p.set_defaults(func=_quickstart)


# ---- dgq calibrate / inspect -------------------------------------------------------------------


def _calibrate(args: argparse.Namespace) -> int:
    from common.fsutil import claim_output
    from dgq import distributed
    from dgq.device import resolve_device
    from dgq.recipe import is_recipe_file

    device = resolve_device(args.device)
    # Launched as several processes (torchrun / accelerate launch): each runs its share of the
    # batches; rank 0 claims, searches and writes.
    # (A process that fails exits; the launcher then stops the others.)
    shard = distributed.init(device)
    if not shard.is_main:
        status = _calibrate_into(args, device)
    else:
        # Claimed before the work: an existing output is refused now, not after calibrating, and a
        # second run to the same file fails at once instead of replacing this one's recipe.
        with claim_output(args.out, args.overwrite, is_recipe_file, "recipe", parents=False):
            status = _calibrate_into(args, device)
    distributed.finish()
    return status


def _calibrate_into(args: argparse.Namespace, device) -> int:
    import time

    from dgq import distributed, zoo
    from dgq.calibrate import calibrate
    from dgq.config import ORT_MIN_INTENSITY, preset
    from dgq.device import place, resolve_dtype
    from dgq.prompts import calibration_prompts
    from dgq.summary import recipe_summary

    overrides = {
        k: v
        for k, v in dict(
            wbits=args.wbits,
            abits=args.abits,
            groups=args.groups,
            profile=args.profile,
            act_axis=args.act_axis,
            attn_probs=args.attn_probs,
            attn_scale=args.attn_scale,
            weight_init=args.weight_init,
            weight_granularity=args.weight_granularity,
            outlier_bits=args.outlier_bits,
        ).items()
        if v is not None
    }
    if args.no_bos_fp:
        overrides["bos_fp"] = False
    if args.no_fold_groups:
        overrides["fold_groups"] = False
    if args.keep_float is not None:
        overrides["keep_float"] = tuple(args.keep_float)
    if args.min_intensity is not None:
        overrides["min_intensity"] = args.min_intensity
    elif args.profile == "onnxruntime":
        overrides["min_intensity"] = ORT_MIN_INTENSITY
    config = preset(args.preset, **overrides)
    if args.no_fold_groups and config.profile != "tensorrt":
        raise ValueError("--no-fold-groups applies to --profile tensorrt (the profile with channel-group branches)")
    model = args.model or zoo.DEFAULT_MODEL
    prompts = calibration_prompts(model, args.num_prompts, args.prompts)
    from dgq import schedulers

    pipe = place(zoo.load_pipeline(model, seed=args.seed), device, resolve_dtype(args.dtype))
    schedulers.use(pipe, args.scheduler)
    t0 = time.perf_counter()
    recipe = calibrate(
        pipe,
        prompts,
        config,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        size=args.size,
        batch_size=args.batch_size,
    )
    if not distributed.current().is_main:
        return 0
    # No wall-clock time in the recipe: the same inputs give the same bytes, however many processes.
    recipe.meta["model_spec"] = model
    recipe.save(args.out, overwrite=args.overwrite)
    sys.stdout.write(recipe_summary(recipe, top=5) + "\n")
    sys.stdout.write(f"calibrated in {time.perf_counter() - t0:.1f} s on {distributed.current().world} process(es)\n")
    sys.stdout.write(f"recipe: {args.out}\n")
    return 0


def _add_calibrate(sub) -> None:
    from dgq.config import (
        ACT_AXES,
        ATTN_PROBS,
        ATTN_SCALES,
        LINEAR_RULE_FACTOR,
        ORT_MIN_INTENSITY,
        PRESETS,
        WEIGHT_GRANULARITIES,
        WEIGHT_INITS,
    )

    p = sub.add_parser(
        "calibrate",
        help="calibrate a UNet with DGQ (or a baseline) and write a recipe",
        description="Run the float pipeline on calibration prompts, collect per-timestep activation "
        "statistics, search DGQ groups, and write the recipe (safetensors + JSON header). Options left "
        "unset keep the preset's value. Several processes or GPUs share one calibration when launched "
        "with torchrun or accelerate launch (e.g. `accelerate launch --multi_gpu --num_processes 8 -m "
        "app.cli calibrate ...`): each runs its share of the prompt batches, the statistics merge "
        "exactly, and the recipe equals a single process's.",
    )
    _add_model_arg(p)
    p.add_argument("--out", type=Path, required=True, help="recipe file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing recipe file (not any other file)")
    p.add_argument("--preset", default="dgq", choices=sorted(PRESETS), help="method or baseline (default dgq)")
    p.add_argument("--wbits", type=int, choices=(8, 4), help="weight bits (default 8)")
    p.add_argument("--abits", type=int, choices=(8, 6, 4), help="activation bits (default 8)")
    p.add_argument(
        "--groups",
        type=argtypes.integer(1, why="K counts groups; 1 is one layer-wise range"),
        help="K, groups per activation (default 16; 1 = layer-wise)",
    )
    p.add_argument(
        "--profile",
        choices=QUANT_TARGETS,
        help="faithful (paper semantics), tensorrt or onnxruntime (what those runtimes execute; default faithful)",
    )
    p.add_argument("--act-axis", choices=ACT_AXES, help="grouping axis rule (default auto = spread rule)")
    p.add_argument(
        "--attn-probs",
        choices=ATTN_PROBS,
        help="attention-probability quantizer (default uniform; log2 is the paper's, preset dgq-paper)",
    )
    p.add_argument("--attn-scale", choices=ATTN_SCALES, help="probability scale: per prompt, per batch, static")
    p.add_argument("--no-bos-fp", action="store_true", help="quantize the BOS column/key row too (ablation)")
    p.add_argument("--weight-init", choices=WEIGHT_INITS, help="weight range search (default mse)")
    p.add_argument("--weight-granularity", choices=WEIGHT_GRANULARITIES, help="per channel, block (Linear), tensor")
    p.add_argument(
        "--outlier-bits",
        type=int,
        choices=(4, 6, 8, 16),
        help="tensorrt profile: bits of the widest group (16 = float)",
    )
    p.add_argument(
        "--no-fold-groups",
        action="store_true",
        help="tensorrt profile: one GEMM branch per channel group instead of the groups (all but the "
        "outlier group) folded into the weights (the graph before folding; more layers, ablation)",
    )
    p.add_argument("--keep-float", nargs="*", help="module-name patterns kept in float (default: conv_in conv_out)")
    p.add_argument(
        "--min-intensity",
        type=argtypes.real(0.0),
        help="keep float every Conv/Linear with fewer multiply-adds per element read or written than this "
        f"(too small for integer kernels to gain; default {ORT_MIN_INTENSITY:g} with --profile onnxruntime, "
        "measured on ONNX Runtime CPU; a conv run as K branches, below W8A8, needs K/2 times it, a Linear of that "
        f"profile {LINEAR_RULE_FACTOR:g} times it; 0 elsewhere; 0 "
        "quantizes every layer)",
    )
    p.add_argument("--prompts", type=Path, help="prompt file, one per line (default: built-in list)")
    p.add_argument(
        "--num-prompts",
        type=argtypes.integer(1, why="calibration needs a prompt"),
        default=64,
        help="calibration prompts (default 64, as the paper)",
    )
    p.add_argument(
        "--steps", type=argtypes.steps, default=DEFAULT_STEPS, help=f"sampler steps (default {DEFAULT_STEPS})"
    )
    _add_scheduler_arg(p, "to calibrate with")
    p.add_argument(
        "--guidance",
        type=argtypes.guidance,
        default=DEFAULT_GUIDANCE,
        help=f"classifier-free guidance >= 0; up to 1 turns guidance off (default {DEFAULT_GUIDANCE:g})",
    )
    _add_size_arg(p)
    p.add_argument(
        "--batch-size",
        type=argtypes.integer(1, why="a pipeline call takes one prompt at least"),
        default=8,
        help="prompts per pipeline call (default 8); several processes share the calls",
    )
    from dgq.device import add_arguments as add_device_arguments

    add_device_arguments(p, "the float pipeline")
    p.set_defaults(func=_calibrate)


def _inspect(args: argparse.Namespace) -> int:
    from dgq.recipe import load
    from dgq.summary import recipe_summary

    sys.stdout.write(recipe_summary(load(args.recipe), top=args.top) + "\n")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarize a recipe",
        description="Print a recipe's settings, the axis chosen per site, group counts and the largest outlier groups.",
    )
    p.add_argument("recipe", type=Path, help="recipe file")
    p.add_argument("--top", type=argtypes.integer(0), default=10, help="how many outlier groups to list (default 10)")
    p.set_defaults(func=_inspect)


def _report(args: argparse.Namespace) -> int:
    from dgq import zoo
    from dgq.eval.metrics import first_divergence
    from dgq.recipe import load
    from dgq.report import layer_errors, write_layer_report

    recipe = load(args.recipe)
    pipe = zoo.load_pipeline(args.model or recipe.meta.get("model_spec"), seed=args.seed)
    pipe.set_progress_bar_config(disable=True)
    recipe.check_model(pipe.unet)
    steps = recipe.meta.get("num_inference_steps", 25)
    errors = layer_errors(
        pipe,
        recipe,
        args.prompt,
        seed=args.image_seed,
        steps=steps,
        guidance=recipe.meta.get("guidance_scale", DEFAULT_GUIDANCE),
        size=recipe.meta.get("size"),
    )
    paths = write_layer_report(errors, recipe, args.out)
    for e in sorted(errors, key=lambda e: e.sqnr_db)[: args.top]:
        sys.stdout.write(f"{e.sqnr_db:7.2f} dB  {e.name}\n")
    first = first_divergence(errors, args.threshold)
    sys.stdout.write(f"first layer below {args.threshold:g} dB: {first.name if first else 'none'}\n")
    for path in paths.values():
        sys.stdout.write(f"{path}\n")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="per-layer error of a recipe against the float UNet, with plots",
        description="Run one float generation, replay its UNet calls through the simulated "
        "UNet, and report every quantized layer's output SQNR (layers.json, layer_sqnr.png, "
        "group_ranges.png).",
    )
    p.add_argument("recipe", type=Path, help="recipe file")
    _add_model_arg(p)
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt (default {DEFAULT_PROMPT!r})")
    p.add_argument("--image-seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--threshold", type=float, default=20.0, help="SQNR (dB) that counts as diverged (default 20)")
    p.add_argument("--top", type=argtypes.integer(0), default=10, help="how many worst layers to print (default 10)")
    p.add_argument("--out", type=Path, default=Path("outputs/report"), help="output folder")
    p.set_defaults(func=_report)


def _add_export(sub) -> None:
    from export.cli import DESCRIPTION, add_arguments, run

    p = sub.add_parser(
        "export",
        help="export the pipeline (with DGQ Q/DQ) to ONNX",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def _add_build(sub) -> None:
    from runtime.build_cli import DESCRIPTION, add_arguments, run

    p = sub.add_parser(
        "build",
        help="build TensorRT engines from an export folder",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="dgq",
        description="DGQ (Distribution-aware Group Quantization) for Stable Diffusion: calibrate, export "
        "to QDQ ONNX, build TensorRT engines, generate and evaluate.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quickstart(sub)
    _add_zoo(sub)
    _add_generate(sub)
    _add_calibrate(sub)
    _add_inspect(sub)
    _add_report(sub)
    _add_export(sub)
    _add_build(sub)
    try:
        from dgq.eval import cli as eval_cli
    except ImportError:  # the evaluation extras are optional at import time
        eval_cli = None
    if eval_cli is not None:
        eval_cli.add_parser(sub)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """``func(args)``'s exit status; 2 with the message logged on one line for a :data:`USER_ERRORS` or
    an allocation that failed for lack of memory; :data:`INTERRUPTED` with one line for Ctrl-C (the
    writers' context managers have removed what was half-written by then)."""
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        log.error("interrupted; nothing half-written was left behind")
        return INTERRUPTED
    except USER_ERRORS as err:
        log.error("%s", err)
        return 2
    except (MemoryError, RuntimeError) as err:
        from dgq.device import is_out_of_memory

        if not is_out_of_memory(err):
            raise
        log.error(
            "out of memory: %s (a smaller --size, --num-images or --batch-size needs less)",
            str(err).strip().splitlines()[-1][:200] or type(err).__name__,
        )
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    return run_command(args.func, args)


def script_main(
    prog: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int | None],
    argv: list[str] | None = None,
    verbose_help: str = "debug logging",
) -> int:
    """A standalone script with one command's options (``scripts/export_onnx.py`` is ``dgq export``)."""
    parser = OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
