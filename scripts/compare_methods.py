"""DGQ against its baselines at W8A8, W4A8, W8A6 and W4A6, measured with the yardstick.

One float calibration pass collects the statistics; every method and bit width is then built from
them (``build_recipe``) and evaluated against the float model on the same prompts and seeds:
noise-prediction SQNR over the sampling steps, paired image PSNR/SSIM, judge accuracy and label flips
(and FID with --fid). Writes ``results.json`` and ``table.md`` to --out; the README's table is
``table.md``.

``--modelopt`` adds NVIDIA ModelOpt's own INT8 and INT8 SmoothQuant configs as peers at W8A8 (their
width): ``mtq.quantize`` on a copy of the UNet, calibrated by running the pipeline on the same
calibration prompts and seeds, evaluated by the same yardstick. It needs ``nvidia-modelopt``
(``pip install nvidia-modelopt ninja nvidia-ml-py omegaconf "pulp<4" scipy``; fake quantization runs
on CPU).

    python scripts/compare_methods.py --model fashion --out outputs/compare
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from common.constants import DEFAULT_GUIDANCE

log = logging.getLogger("compare_methods")

METHODS = {
    "DGQ": ("dgq", {}),
    "DGQ K=1 (time-aware, Q-Diffusion-like)": ("dgq-k1", {}),
    "naive per-tensor min-max": ("naive", {}),
    "TensorRT demo / ModelOpt INT8": ("trt-demo", {}),
}
# The onnxruntime export target's calibration fields (export.qdq_export.ORT_PRESET, which this script
# does not import at module level: that pulls in torch and onnx before --help).
ORT_FIELDS = {"profile": "onnxruntime", "quantize_qkv": False, "attn_probs": "float"}


def _ort(groups: int, **changed) -> tuple[str, dict]:
    """An ablation on the onnxruntime target's semantics with K=``groups`` and ``changed`` fields."""
    return "dgq", {**ORT_FIELDS, "groups": groups, **changed}


# Ablations of DGQ (--ablations): one config field changed each.
ABLATIONS = {
    "DGQ, channel groups only": ("dgq", {"act_axis": "channel"}),
    "DGQ, pixel groups only": ("dgq", {"act_axis": "pixel"}),
    "DGQ, log2 attention probs (paper)": ("dgq", {"attn_probs": "log2"}),
    "DGQ, float attention probs": ("dgq", {"attn_probs": "float"}),
    "DGQ, BOS quantized": ("dgq", {"bos_fp": False}),
    "DGQ, static probs scale": ("dgq", {"attn_scale": "static"}),
    "DGQ, batch-wide probs scale": ("dgq", {"attn_scale": "batch"}),
    "DGQ, tensorrt profile (outlier group float)": ("dgq", {"profile": "tensorrt", "outlier_bits": 16}),
    # The tensorrt export target's default K=4: its channel groups (all but the outlier group) folded
    # into the weights with 8-bit weights (the default), at every weight width, or one GEMM branch per
    # group (the target before fold_groups; recipes stored without the field load this way).
    "DGQ, tensorrt profile K=4": ("dgq", {"profile": "tensorrt", "outlier_bits": 16, "groups": 4}),
    "DGQ, tensorrt profile K=4, groups folded": (
        "dgq",
        {"profile": "tensorrt", "outlier_bits": 16, "groups": 4, "fold_groups": True},
    ),
    "DGQ, tensorrt profile K=4, groups as branches": (
        "dgq",
        {"profile": "tensorrt", "outlier_bits": 16, "groups": 4, "fold_groups": False},
    ),
    # The onnxruntime export target's semantics (quantized conv outputs, float attention), with its
    # default K=4 channel groups per conv and without groups.
    "DGQ, onnxruntime profile K=4": _ort(4),
    "DGQ, onnxruntime profile K=1": _ort(1),
    # The same K=4 target with its Linear inputs at one range per step (no folded channel groups).
    "DGQ, onnxruntime profile K=4, Linear unfolded": _ort(4, fold_linear=False),
    # The same K=4 target folding the whole group widths into the weights at every weight width
    # (the default folds half of them, in log scale, below 8-bit weights).
    "DGQ, onnxruntime profile K=4, fold strength 1": _ort(4, fold_strength=1.0),
    # The same K=4 target with a QLinearConv branch per conv input group instead of the groups folded
    # into the weights (the target before fold_conv; the default below W8A8)...
    "DGQ, onnxruntime profile K=4, conv branches": _ort(4, fold_conv=False),
    # ... and with them folded at every bit width (the default folds them at W8A8 only).
    "DGQ, onnxruntime profile K=4, conv folded": _ort(4, fold_conv=True),
    # More groups cost nothing at run time once folded (one QLinearConv per conv either way).
    "DGQ, onnxruntime profile K=8, conv folded": _ort(8, fold_conv=True),
    "DGQ, onnxruntime profile K=16, conv folded": _ort(16, fold_conv=True),
    # The same K=4 target without folded Linear and conv input groups and per-channel conv output
    # scales (the profile before those fields; recipes stored without them load this way).
    "DGQ, onnxruntime profile K=4, unfolded": _ort(4, fold_linear=False, norm_outputs=False, fold_conv=False),
}
BITS = [(8, 8), (4, 8), (8, 6), (4, 6)]
# NVIDIA ModelOpt's configs (--modelopt), as its users run them: row name -> mtq config name.
MODELOPT_PEERS = {
    "ModelOpt INT8 (mtq.INT8_DEFAULT_CFG)": "INT8_DEFAULT_CFG",
    "ModelOpt INT8 SmoothQuant (mtq.INT8_SMOOTHQUANT_CFG)": "INT8_SMOOTHQUANT_CFG",
}
MODELOPT_BITS = (8, 8)
MODELOPT_CAL_BATCH = 8


def modelopt_pipeline(pipe, config_name: str, prompts: list[str], steps: int, guidance: float, seed: int):
    """A pipeline of the same class whose UNet is a copy quantized by ModelOpt's ``config_name``,
    calibrated on ``prompts`` (seeds ``seed``, ``seed + 1``, ...) through the whole pipeline."""
    import copy

    import torch

    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise SystemExit(
            "compare_methods: --modelopt needs nvidia-modelopt "
            '(pip install nvidia-modelopt ninja nvidia-ml-py omegaconf "pulp<4" scipy)'
        ) from e
    unet = copy.deepcopy(pipe.unet)
    calib = type(pipe)(**{**pipe.components, "unet": unet})
    calib.set_progress_bar_config(disable=True)

    def forward_loop(model):
        with torch.no_grad():
            for i in range(0, len(prompts), MODELOPT_CAL_BATCH):
                batch = prompts[i : i + MODELOPT_CAL_BATCH]
                gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(batch))]
                calib(batch, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="latent")

    unet = mtq.quantize(unet, getattr(mtq, config_name), forward_loop)
    qpipe = type(pipe)(**{**pipe.components, "unet": unet})
    qpipe.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return qpipe


NOISE_FLOOR = "float, other seeds (noise floor)"
NOISE_FLOOR_SEED_OFFSET = 1000


class SeedShifted:
    """The float pipeline drawing its initial noise from ``seed + offset``: a second, independent
    sample of the float model's output distribution, to read distribution-level distances against."""

    def __init__(self, pipe, offset: int):
        self.pipe, self.offset = pipe, offset
        self.scheduler, self.unet = pipe.scheduler, pipe.unet

    def __call__(self, *args, generator, **kwargs):
        import torch

        shifted = [torch.Generator().manual_seed(g.initial_seed() + self.offset) for g in generator]
        return self.pipe(*args, generator=shifted, **kwargs)


def _row(method: str, wbits: int, abits: int, res: dict) -> dict:
    noise = res.get("noise") or {}
    same = noise.get("same_inputs") or {}
    judge = res.get("judge") or {}
    return {
        "method": method,
        "wbits": wbits,
        "abits": abits,
        "noise_sqnr_db": same.get("sqnr_db_pooled"),
        "noise_sqnr_db_worst_step": same.get("sqnr_db_worst_step"),
        "trajectory_sqnr_db": (noise.get("candidate_trajectory") or {}).get("sqnr_db_pooled"),
        "image_psnr_db": res["image"]["psnr_db"],
        "ssim": res["image"]["ssim"]["mean"],
        "judge_accuracy": judge.get("candidate_accuracy"),
        "reference_judge_accuracy": judge.get("reference_accuracy"),
        "flip_rate": judge.get("flip_rate"),
        "fid_vs_reference": (res.get("fid") or {}).get("candidate_vs_reference"),
    }


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}f}"


def _bits(row: dict) -> str:
    return "float" if row["method"] == NOISE_FLOOR else f"W{row['wbits']}A{row['abits']}"


def markdown(rows: list[dict], header: str) -> str:
    fid = any(r.get("fid_vs_reference") is not None for r in rows)
    lines = [
        header,
        "",
        "| W/A | method | noise SQNR (dB) | worst step (dB) | image PSNR (dB) | SSIM | judge acc. | flips |"
        + (" FID vs float |" if fid else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if fid else ""),
    ]
    for r in rows:
        lines.append(
            f"| {_bits(r)} | {r['method']} | {_fmt(r['noise_sqnr_db'])} | {_fmt(r['noise_sqnr_db_worst_step'])} | "
            f"{_fmt(r['image_psnr_db'])} | {_fmt(r['ssim'], 3)} | {_fmt(r['judge_accuracy'], 3)} | "
            f"{_fmt(r['flip_rate'], 3)} |" + (f" {_fmt(r.get('fid_vs_reference'))} |" if fid else "")
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help="zoo name, pipeline folder or hub id (default: the default model)"
    )
    parser.add_argument("--groups", type=int, default=16, help="DGQ's K (default 16)")
    parser.add_argument("--cal-prompts", type=int, default=64, help="calibration prompts (default 64)")
    parser.add_argument("--num-prompts", type=int, default=20, help="evaluation prompts (default 20)")
    parser.add_argument(
        "--seeds", type=int, default=2, help="evaluation seeds per prompt (default 2; calibration uses others)"
    )
    parser.add_argument(
        "--steps", type=int, default=25, help="sampler steps for calibration and evaluation (default 25)"
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=DEFAULT_GUIDANCE,
        help=f"classifier-free guidance (default {DEFAULT_GUIDANCE:g})",
    )
    parser.add_argument("--bits", nargs="+", default=[f"W{w}A{a}" for w, a in BITS], help="bit widths, e.g. W8A6")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to run")
    parser.add_argument(
        "--ablations",
        nargs="*",
        default=None,
        choices=list(ABLATIONS),
        metavar="NAME",
        help="also run DGQ ablations (one field changed each): the names given, or all of them "
        f"when none is given; names: {list(ABLATIONS)}",
    )
    parser.add_argument(
        "--modelopt",
        action="store_true",
        help="also NVIDIA ModelOpt's INT8 and INT8 SmoothQuant configs as peers at W8A8 (needs nvidia-modelopt)",
    )
    parser.add_argument("--fid", action="store_true", help="also FID against the float model's images (slow on CPU)")
    parser.add_argument(
        "--noise-floor",
        action="store_true",
        help="add a row 'float, other seeds': the float model with new seeds against itself, the "
        "floor that distribution metrics (FID, judge accuracy) of a quantized model are read against",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/compare"), help="output folder")
    from dgq.device import add_arguments as add_device_arguments

    add_device_arguments(parser, "the pipelines")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="RESULTS_JSON",
        help="only re-render table.md from an earlier results.json (no calibration, no sampling)",
    )
    args = parser.parse_args(argv)
    if args.modelopt and args.render is None:
        import importlib.util

        if importlib.util.find_spec("modelopt") is None:
            parser.error(
                "--modelopt needs nvidia-modelopt "
                '(pip install nvidia-modelopt ninja nvidia-ml-py omegaconf "pulp<4" scipy)'
            )
    if args.render is not None:
        data = json.loads(args.render.read_text())
        m = data["meta"]
        header = (
            f"Model `{m['model']}`, {m['cal_prompts']} calibration prompts, {m['steps']} steps, guidance "
            f"{m['guidance']}; "
            f"evaluated on {m['eval_prompts']} prompts x {m['seeds']} seeds against the float model."
        )
        table = markdown(data["rows"], header)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(table)
        sys.stdout.write(table)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from dgq import zoo
    from dgq.calibrate import build_recipe, calibrate_outputs, collect_statistics, with_bits
    from dgq.config import preset
    from dgq.device import place, resolve_device, resolve_dtype
    from dgq.eval.data import default_prompts
    from dgq.eval.yardstick import YardstickConfig, evaluate
    from dgq.prompts import calibration_prompts
    from dgq.simulate import simulate

    bits = []
    for b in args.bits:
        w, a = b.upper().lstrip("W").split("A")
        bits.append((int(w), int(a)))
    model = args.model or zoo.DEFAULT_MODEL
    pipe = place(zoo.load_pipeline(model), resolve_device(args.device), resolve_dtype(args.dtype))
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    # Calibration seeds start past the evaluation seeds so no evaluated image was seen in calibration.
    cal_prompts = calibration_prompts(model, args.cal_prompts)
    stats = collect_statistics(pipe, cal_prompts, args.steps, args.guidance, seed=10_000, progress=sys.stderr.isatty())
    cal_seconds = time.perf_counter() - t0
    prompts = default_prompts(args.num_prompts)
    ycfg = YardstickConfig(
        seeds=tuple(range(args.seeds)),
        steps=args.steps,
        guidance=args.guidance,
        fid=args.fid,
        judge=True,
        progress=False,
    )
    chosen = [] if args.ablations is None else (args.ablations or list(ABLATIONS))
    variants = {m: METHODS[m] for m in args.methods} | {a: ABLATIONS[a] for a in chosen}
    rows, raw = [], {}
    searched = {}  # method -> recipe: the group search runs once per method, bits only change weights
    for wbits, abits in bits:
        for method, (name, overrides) in variants.items():
            t1 = time.perf_counter()
            kw = dict(overrides, wbits=wbits, abits=abits)
            if name == "dgq":
                kw.setdefault("groups", args.groups)
            if kw.get("profile") == "onnxruntime":  # output ranges depend on the bits: a search and a pass per width
                recipe = calibrate_outputs(
                    pipe,
                    build_recipe(stats, pipe.unet, preset(name, **kw), progress=False),
                    cal_prompts,
                    args.steps,
                    args.guidance,
                    seed=10_000,
                    progress=False,
                )
            else:
                if method not in searched:
                    searched[method] = build_recipe(stats, pipe.unet, preset(name, **kw), progress=False)
                recipe = with_bits(searched[method], pipe.unet, wbits, abits)
            build_s = time.perf_counter() - t1
            result = evaluate(pipe, simulate(pipe, recipe), prompts, ycfg)
            row = _row(method, wbits, abits, result.results) | {"recipe_build_s": round(build_s, 1)}
            log.info(
                "W%dA%d %s: %s",
                wbits,
                abits,
                method,
                {k: row[k] for k in ("noise_sqnr_db", "image_psnr_db", "flip_rate")},
            )
            rows.append(row)
            raw[f"W{wbits}A{abits} {method}"] = result.results
        if args.modelopt and (wbits, abits) == MODELOPT_BITS:
            for method, config_name in MODELOPT_PEERS.items():
                t1 = time.perf_counter()
                qpipe = modelopt_pipeline(pipe, config_name, cal_prompts, args.steps, args.guidance, seed=10_000)
                build_s = time.perf_counter() - t1
                result = evaluate(pipe, qpipe, prompts, ycfg)
                row = _row(method, wbits, abits, result.results) | {"recipe_build_s": round(build_s, 1)}
                log.info("W%dA%d %s: %s", wbits, abits, method, {k: row[k] for k in ("noise_sqnr_db", "image_psnr_db")})
                rows.append(row)
                raw[f"W{wbits}A{abits} {method}"] = result.results
    if args.noise_floor:
        floor_cfg = YardstickConfig(
            seeds=ycfg.seeds,
            steps=args.steps,
            guidance=args.guidance,
            fid=args.fid,
            judge=True,
            progress=False,
            noise_fidelity=False,
        )
        result = evaluate(pipe, SeedShifted(pipe, NOISE_FLOOR_SEED_OFFSET), prompts, floor_cfg)
        row = _row(NOISE_FLOOR, 32, 32, result.results)
        log.info("%s: %s", NOISE_FLOOR, {k: row[k] for k in ("judge_accuracy", "fid_vs_reference", "flip_rate")})
        rows.append(row)
        raw[NOISE_FLOOR] = result.results
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": model,
        "groups": args.groups,
        "cal_prompts": args.cal_prompts,
        "eval_prompts": len(prompts),
        "seeds": args.seeds,
        "steps": args.steps,
        "guidance": args.guidance,
        "statistics_seconds": round(cal_seconds, 1),
    }
    from dgq.eval.yardstick import to_jsonable

    (args.out / "results.json").write_text(json.dumps(to_jsonable({"meta": meta, "rows": rows, "raw": raw}), indent=2))
    header = (
        f"Model `{model}`, {args.cal_prompts} calibration prompts, {args.steps} steps, guidance {args.guidance}; "
        f"evaluated on {len(prompts)} prompts x {args.seeds} seeds against the float model "
        f"(`python scripts/compare_methods.py --model {model}`)."
    )
    table = markdown(rows, header)
    (args.out / "table.md").write_text(table)
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
