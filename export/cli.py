"""Options and handler of ``dgq export``, also run standalone as ``scripts/export_onnx.py``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from common import argtypes
from common.constants import (
    BRANCH_GROUPS,
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    FAITHFUL_GROUPS,
    QUANT_TARGETS,
    SUPPORTED_OPSETS,
)
from dgq.config import LINEAR_RULE_FACTOR, ORT_MIN_INTENSITY

log = logging.getLogger(__name__)

DESCRIPTION = """\
Export a diffusers Stable Diffusion pipeline to ONNX for ONNX Runtime and TensorRT.

Writes one folder: unet.onnx (with DGQ's Q/DQ nodes for a quantized target), text_encoder.onnx and
vae_decoder.onnx (float), iospec.json, recipe.safetensors, tokenizer/, scheduler/, summary.json and
manifest.json (hashes binding it all). The folder appears only when everything succeeded.

Targets:
  faithful   the paper's DGQ semantics (asymmetric per-group, per-step tables chosen by a
             step_index input); the reference graph, runs in ONNX Runtime
  tensorrt   what TensorRT executes: symmetric INT8, constant Q/DQ scales, channel groups as
             branches, per-step scales as x/s -> unit Q/DQ -> *s; linted against TensorRT's rules
  onnxruntime  what ONNX Runtime's CPU integer kernels run: each conv is a QLinearConv (uint8
             activations with per-step ranges, int8 weights, a quantized output) with its input
             channel groups folded into the weights at W8A8 (a branch per group at other bits),
             Linear layers fuse to MatMulIntegerToFloat; attention stays float, one ONNX Runtime
             MultiHeadAttention kernel per block (--no-fused-attention: the plain attention ops)
  float      the float graphs only (baseline for size and speed; --fused-attention for a float
             graph meant for ONNX Runtime)

Without --recipe the model is calibrated first (DGQ preset with the target's profile), which takes
minutes on CPU for the default model; the onnxruntime target also observes the conv outputs on the
quantized model (a second pass).

Examples:
  python scripts/export_onnx.py --out exports/fashion-trt --target tensorrt
  python scripts/export_onnx.py --model ./sd15 --recipe sd15.safetensors --target faithful --out exports/sd15
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="zoo name, diffusers pipeline folder or hub id (default: the built-in default model)",
    )
    p.add_argument("--recipe", type=Path, default=None, help="recipe from dgq calibrate (default: calibrate now)")
    p.add_argument(
        "--target",
        choices=(*QUANT_TARGETS, "float"),
        default="tensorrt",
        help="export target (default tensorrt)",
    )
    p.add_argument("--out", type=Path, required=True, help="export folder to create")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing export folder (never a folder dgq did not write)"
    )
    p.add_argument("--wbits", type=int, choices=(8, 4), default=8, help="weight bits when calibrating (default 8)")
    p.add_argument(
        "--abits", type=int, choices=(8, 6, 4), default=8, help="activation bits when calibrating (default 8)"
    )
    p.add_argument(
        "--groups",
        type=argtypes.integer(1, why="K counts groups; 1 is one layer-wise range"),
        default=None,
        help=f"DGQ's K when calibrating (default {FAITHFUL_GROUPS}; for the tensorrt and "
        f"onnxruntime targets, where every group of a channel-grouped layer is a branch, {BRANCH_GROUPS})",
    )
    p.add_argument(
        "--outlier-bits",
        type=int,
        choices=(8, 16),
        default=16,
        help="tensorrt target when calibrating: bits of the outlier group (default 16 = float branch)",
    )
    p.add_argument(
        "--min-intensity",
        type=argtypes.real(0.0),
        default=None,
        help="when calibrating: keep float every Conv/Linear with fewer multiply-adds per element read or "
        f"written than this (default {ORT_MIN_INTENSITY:g} for the onnxruntime target, measured on ONNX Runtime "
        "CPU: smaller layers run no faster quantized; a conv run as K branches, below W8A8, needs K/2 times it, "
        f"a Linear of the onnxruntime target {LINEAR_RULE_FACTOR:g} times it; 0 "
        "for the others, and 0 quantizes every layer)",
    )
    p.add_argument(
        "--num-prompts",
        type=argtypes.integer(1, why="calibration needs a prompt"),
        default=64,
        help="calibration prompts (default 64)",
    )
    from dgq import schedulers

    schedulers.add_argument(p, "to calibrate with and to save with the export", "the recipe's, else the model's")
    p.add_argument(
        "--steps",
        type=argtypes.steps,
        default=DEFAULT_STEPS,
        help=f"calibration sampler steps: the most accurate to generate with; other counts and samplers run with "
        f"the nearest calibrated timestep's parameters (default {DEFAULT_STEPS})",
    )
    p.add_argument(
        "--guidance",
        type=argtypes.guidance,
        default=DEFAULT_GUIDANCE,
        help=f"calibration guidance >= 0; up to 1 turns guidance off (default {DEFAULT_GUIDANCE:g})",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=None,
        choices=SUPPORTED_OPSETS,
        help="ONNX opset, one the exporter is tested at (default 17; 21 for 4-bit weights and the faithful target)",
    )
    p.add_argument(
        "--components",
        nargs="+",
        default=["unet", "text_encoder", "vae_decoder"],
        choices=["unet", "text_encoder", "vae_decoder"],
        help="networks to export (default all)",
    )
    p.add_argument(
        "--max-batch",
        type=argtypes.integer(1, why="a profile holds one image at least"),
        default=4,
        help="largest number of images per call in the profiles (default 4)",
    )
    p.add_argument(
        "--fused-attention",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="targets float and onnxruntime: each UNet attention block as one ONNX Runtime MultiHeadAttention "
        "node (a contrib op: faster in ONNX Runtime, but TensorRT cannot build the graph). Default: on for "
        "--target onnxruntime where the attention is float and diffusers' plain processors, off otherwise",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random-weight zoo models (default 0)")
    from dgq.device import add_arguments as add_device_arguments

    add_device_arguments(p, "the calibration without --recipe (the graphs are traced on the CPU in float32)")


def run(args: argparse.Namespace) -> int:
    from common.fsutil import claim_output
    from export.float_export import is_export_output

    # Claimed before the work (parent folders created, e.g. exports/ on a fresh checkout): an existing
    # output is refused now, not after calibrating and exporting, and a second export to the same
    # folder fails at once instead of replacing this one's.
    with claim_output(args.out, args.overwrite, is_export_output, "export folder"):
        return _export(args)


def _export(args: argparse.Namespace) -> int:
    import torch

    from dgq import zoo
    from dgq.device import place, resolve_device, resolve_dtype
    from export.qdq_export import INT4_OPSET, export_onnx

    out = Path(args.out)
    if args.recipe is not None and not args.recipe.is_file():
        raise FileNotFoundError(
            f"recipe {args.recipe} does not exist (run dgq calibrate, or leave --recipe out to calibrate now)"
        )
    if args.min_intensity is not None and (args.recipe is not None or args.target == "float"):
        raise ValueError(
            "--min-intensity chooses the layers a calibration quantizes; "
            + ("a float export quantizes none" if args.target == "float" else "the recipe already fixes them")
            + " (leave it out, or calibrate again with it)"
        )
    if args.fused_attention is True and args.target not in ("float", "onnxruntime"):
        raise ValueError(
            f"--fused-attention writes an ONNX Runtime contrib op, which the {args.target} target's runtime cannot "
            "run; use it with --target onnxruntime or float"
        )
    recipe = None
    if args.target != "float" and args.recipe is not None:
        from dgq.recipe import load

        recipe = load(args.recipe)  # before the model: a damaged recipe is refused at once
    wbits = args.wbits if recipe is None else recipe.config.wbits
    needs_21 = args.target == "faithful" or (wbits <= 4 and args.target in ("tensorrt",))
    if args.opset is not None and args.opset < INT4_OPSET and needs_21:
        raise ValueError(
            f"--opset {args.opset} is too old for a {args.target} export with {wbits}-bit weights: INT4 tensors "
            f"and the faithful target's INT16 zero points need opset {INT4_OPSET} (leave --opset out)"
        )
    model = args.model or zoo.DEFAULT_MODEL
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    # The sampler saved with the export (the runtime's default) is the one the recipe was calibrated
    # with: --scheduler, else the recipe's own record, else the model's.
    sampler = args.scheduler or (recipe.meta.get("scheduler") if recipe is not None else None)

    def load():
        from dgq import schedulers

        pipe = zoo.load_pipeline(model, seed=args.seed)
        pipe.set_progress_bar_config(disable=True)
        if sampler is not None and sampler != type(pipe.scheduler).__name__:
            schedulers.use(pipe, sampler)
            log.info("sampler of this export: %s", type(pipe.scheduler).__name__)
        return pipe

    pipe = load()
    if args.target != "float" and recipe is None:
        recipe = _calibrate(place(pipe, device, dtype), model, args)
        # The graphs are traced on the CPU in float32: back from the device, or reloaded when the
        # calibration cast the weights (a cast back would export rounded weights).
        if dtype == torch.float32:
            pipe.to("cpu")
        else:
            pipe = load()
    t0 = time.perf_counter()
    summary = export_onnx(
        pipe,
        out,
        recipe,
        args.target,
        opset=args.opset,
        components=args.components,
        batch=(1, 1, args.max_batch),
        overwrite=args.overwrite,
        progress=sys.stderr.isatty(),
        fused_attention=args.fused_attention,
    )
    sys.stdout.write(summary.table() + "\n")
    sys.stdout.write(f"export folder: {out} ({time.perf_counter() - t0:.1f} s)\n")
    return 0


def _calibrate(pipe, model: str, args: argparse.Namespace):
    from dgq.calibrate import calibrate
    from dgq.prompts import calibration_prompts
    from export.qdq_export import target_config

    config = target_config(args.target, args.wbits, args.abits, args.groups, args.outlier_bits)
    if args.min_intensity is not None:
        config = config.replace(min_intensity=args.min_intensity)
    log.info(
        "no --recipe: calibrating %s with %s (%d prompts, %d steps)",
        model,
        config.profile,
        args.num_prompts,
        args.steps,
    )
    recipe = calibrate(
        pipe,
        calibration_prompts(model, args.num_prompts),
        config,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        progress=sys.stderr.isatty(),
    )
    recipe.meta["model_spec"] = model
    return recipe
