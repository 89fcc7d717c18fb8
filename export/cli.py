"""Options and handler of ``dgq export``, also run standalone as ``scripts/export_onnx.py``."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from common.constants import BRANCH_GROUPS, DEFAULT_GUIDANCE, FAITHFUL_GROUPS, QUANT_TARGETS

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
  onnxruntime  what ONNX Runtime's CPU integer kernels run: each conv input channel group is a
             QLinearConv branch (uint8 activations with per-step ranges, int8 weights, a
             quantized output), Linear layers fuse to MatMulIntegerToFloat; attention stays float
  float      the float graphs only (baseline for size and speed)

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
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.add_argument("--wbits", type=int, choices=(8, 4), default=8, help="weight bits when calibrating (default 8)")
    p.add_argument(
        "--abits", type=int, choices=(8, 6, 4), default=8, help="activation bits when calibrating (default 8)"
    )
    p.add_argument(
        "--groups",
        type=int,
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
    p.add_argument("--num-prompts", type=int, default=64, help="calibration prompts (default 64)")
    p.add_argument(
        "--steps", type=int, default=25, help="calibration sampler steps; generate with the same (default 25)"
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=DEFAULT_GUIDANCE,
        help=f"calibration guidance (default {DEFAULT_GUIDANCE:g})",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; 21 for 4-bit weights)")
    p.add_argument(
        "--components",
        nargs="+",
        default=["unet", "text_encoder", "vae_decoder"],
        choices=["unet", "text_encoder", "vae_decoder"],
        help="networks to export (default all)",
    )
    p.add_argument(
        "--max-batch", type=int, default=4, help="largest number of images per call in the profiles (default 4)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for random-weight zoo models (default 0)")


def run(args: argparse.Namespace) -> int:
    from common.fsutil import check_writable_parent
    from dgq import zoo
    from export.qdq_export import export_onnx

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # e.g. exports/ on a fresh checkout
    except OSError as err:
        raise PermissionError(f"cannot create the folder {out.parent} for {out}: {err.strerror}") from err
    check_writable_parent(out)
    if args.recipe is not None and not args.recipe.is_file():
        raise FileNotFoundError(
            f"recipe {args.recipe} does not exist (run dgq calibrate, or leave --recipe out to calibrate now)"
        )
    model = args.model or zoo.DEFAULT_MODEL
    pipe = zoo.load_pipeline(model, seed=args.seed)
    pipe.set_progress_bar_config(disable=True)
    recipe = None
    if args.target != "float":
        if args.recipe is not None:
            from dgq.recipe import load

            recipe = load(args.recipe)
        else:
            recipe = _calibrate(pipe, model, args)
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
    )
    sys.stdout.write(summary.table() + "\n")
    sys.stdout.write(f"export folder: {out} ({time.perf_counter() - t0:.1f} s)\n")
    return 0


def _calibrate(pipe, model: str, args: argparse.Namespace):
    from dgq.calibrate import calibrate
    from dgq.prompts import calibration_prompts
    from export.qdq_export import target_config

    config = target_config(args.target, args.wbits, args.abits, args.groups, args.outlier_bits)
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
