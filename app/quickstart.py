"""The README's main job in one command (``dgq quickstart``, ``make quickstart``), offline, on the
built-in default model.

1. Build the default pipeline, save it as a diffusers folder and reload it with ``from_pretrained``
   (the path a real checkpoint takes).
2. Calibrate DGQ: one float statistics pass over a small prompt set (``calibration_prompts``; 8 by
   default, where the paper uses 64), then the ``tensorrt`` and the ``onnxruntime`` recipes from it
   (the second with its output-range pass).
3. Export the float graphs and both quantized targets (Q/DQ ONNX folders).
4. Build the tensorrt target's TensorRT engines where a TensorRT module is installed (TensorRT-RTX
   builds ahead of time on a CPU); skipped with the reason otherwise.
5. Generate the same prompts and seeds with the float PyTorch pipeline and from every export through
   the runtime (ONNX Runtime here), and compare: PSNR of each export's images against PyTorch float,
   the judge's label flips (default model), UNet milliseconds per call in one runtime.
6. Write ``grid.png`` (a row per prompt: float | onnxruntime | tensorrt), ``summary.json`` and the
   images; print the parity lines, the timings table, file sizes and paths.

Everything goes into one folder, written atomically; an earlier quickstart folder is replaced, any
other existing path refused.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common.constants import DEFAULT_GUIDANCE
from common.fsutil import atomic_dir, atomic_file

log = logging.getLogger(__name__)

QUANT_EXPORTS = ("onnxruntime", "tensorrt")  # the grid's columns after float, in this order
QUICKSTART_ENTRIES = {"model", "recipes", "exports", "images", "grid.png", "summary.json"}
CELL = 192  # pixels per grid cell (the default model's 64 px images, scaled 3x)
HEADER = 18  # pixels of the grid's column-name row
LABEL = 120  # pixels of the grid's prompt column


class _Stages:
    """Seconds per stage, logged as each starts (the progress a user sees)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.seconds = total, 0, {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.done += 1
        log.info("[%d/%d] %s", self.done, self.total, name)
        t0 = time.perf_counter()
        out = fn()
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        return out


def _labelled_prompts(model: str, count: int) -> tuple[list[str], list[int | None]]:
    """The default model's class prompts with their labels (the judge checks them); other models get
    the general calibration prompts, unlabelled."""
    from dgq.eval.data import default_prompts
    from dgq.prompts import FASHION_MODELS, calibration_prompts

    if model in FASHION_MODELS:
        pairs = default_prompts(count)
        return [p for p, _ in pairs], [label for _, label in pairs]
    return calibration_prompts(model, count), [None] * count


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    import torch

    from dgq.eval import metrics

    return metrics.psnr(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), 255.0)


def _flips(images: dict[str, np.ndarray], labels: list[int | None]) -> dict[str, Any] | None:
    """Judge predictions per column and each quantized column's flips against float; None when the
    prompts carry no labels (the judge knows the default model's classes only)."""
    if any(label is None for label in labels):
        return None
    import torch

    from dgq.eval.judge import classify_uint8, load_judge

    judge = load_judge()
    pred = {name: classify_uint8(imgs, judge) for name, imgs in images.items()}
    target = torch.as_tensor(labels)
    return {
        "accuracy": {name: float((p == target).float().mean()) for name, p in pred.items()},
        "flips_vs_float": {name: int((pred[name] != pred["float"]).sum()) for name in pred if name != "float"},
    }


def _grid(columns: dict[str, np.ndarray], prompts: list[str], path: Path) -> None:
    """One row per prompt (named on the left), one column per pipeline (named on top)."""
    from PIL import Image, ImageDraw

    names = list(columns)
    grid = Image.new("RGB", (LABEL + CELL * len(names), HEADER + CELL * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(names):
        draw.text((LABEL + c * CELL + 4, 3), name, fill="black")
        for r, img in enumerate(columns[name]):
            grid.paste(Image.fromarray(img).resize((CELL, CELL), Image.NEAREST), (LABEL + c * CELL, HEADER + r * CELL))
    for r, prompt in enumerate(prompts):
        lines = [""]
        for word in prompt.split():  # wrapped to the label column
            if lines[-1] and draw.textlength(f"{lines[-1]} {word}") > LABEL - 8:
                lines.append(word)
            else:
                lines[-1] = f"{lines[-1]} {word}".strip()
        draw.multiline_text((4, HEADER + r * CELL + 4), "\n".join(lines), fill="black")
    with atomic_file(path) as f:
        grid.save(f, format="PNG")


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_quickstart(
    out: str | Path,
    model: str | None = None,
    num_images: int = 4,
    calibration_prompts: int = 8,
    steps: int = 25,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    engines: bool = True,
) -> dict[str, Any]:
    """Run the main job into ``out`` (module docstring). Returns the summary also written to
    ``out/summary.json``."""
    from dgq import zoo
    from dgq.calibrate import build_recipe, calibrate_outputs, collect_statistics
    from dgq.generate import save_images
    from dgq.prompts import calibration_prompts as cal_prompts
    from export.qdq_export import export_onnx, target_config

    out = Path(out)
    name = model or zoo.DEFAULT_MODEL
    prompts, labels = _labelled_prompts(name, num_images)
    seeds = [seed + i for i in range(num_images)]
    stages = _Stages(5 + len(("float", *QUANT_EXPORTS)))  # load, statistics, recipes, exports, engines, generate
    t_start = time.perf_counter()
    with atomic_dir(out, overwrite=True, owned=is_quickstart_output, what="quickstart folder") as tmp:

        def load():
            zoo.load_pipeline(name).save_pretrained(tmp / "model", safe_serialization=True)
            pipe = zoo.load_pipeline(str(tmp / "model"))  # from_pretrained, as a real checkpoint loads
            pipe.set_progress_bar_config(disable=True)
            return pipe

        pipe = stages.run(f"build {name}, save_pretrained, reload with from_pretrained", load)
        cal = cal_prompts(name, calibration_prompts)
        stats = stages.run(
            f"DGQ statistics: {len(cal)} calibration prompts x {steps} steps (the paper uses 64 prompts)",
            lambda: collect_statistics(pipe, cal, steps, guidance, seed=seed, progress=False),
        )

        def recipes():
            made = {}
            for target in QUANT_EXPORTS:
                recipe = build_recipe(stats, pipe.unet, target_config(target), progress=False)
                if target == "onnxruntime":  # its output ranges come from a pass of the quantized model
                    recipe = calibrate_outputs(pipe, recipe, cal, steps, guidance, seed=seed, progress=False)
                recipe.meta["model_spec"] = name
                (tmp / "recipes").mkdir(exist_ok=True)
                recipe.save(tmp / "recipes" / f"{target}.safetensors")
                made[target] = recipe
            return made

        made = stages.run("DGQ group search: the tensorrt and onnxruntime recipes", recipes)
        exports = tmp / "exports"
        exports.mkdir()
        summaries = {}
        for target in ("float", *QUANT_EXPORTS):
            summaries[target] = stages.run(
                f"export the {target} graphs",
                lambda target=target: export_onnx(
                    pipe, exports / target, made.get(target), target, compare_float=False, inspect_ort=False
                ),
            )
        engine_note = stages.run(
            "TensorRT engines of the tensorrt export", lambda: _engines(exports / "tensorrt", engines)
        )
        images, timings = stages.run(
            f"generate {num_images} images x {steps} steps: PyTorch float and every export through the runtime",
            lambda: _generate(pipe, exports, prompts, seeds, steps, guidance),
        )
        for column, imgs in images.items():
            save_images([_pil(a) for a in imgs], tmp / "images", stem=column)
        columns = {"float (PyTorch)": images["float"], **{f"{t} export": images[t] for t in QUANT_EXPORTS}}
        _grid(columns, prompts, tmp / "grid.png")
        parity = {
            target: {
                "psnr_db_vs_float": round(_psnr(images[target], images["float"]), 2),
                "psnr_db_per_image": [
                    round(_psnr(a[None], b[None]), 2) for a, b in zip(images[target], images["float"], strict=True)
                ],
            }
            for target in ("float-export", *QUANT_EXPORTS)
        }
        judge = _flips({k: v for k, v in images.items() if k != "float-export"}, labels)
        summary = {
            "model": name,
            "prompts": prompts,
            "seeds": seeds,
            "steps": steps,
            "guidance": guidance,
            "calibration_prompts": len(cal),
            "parity": parity,
            "judge": judge,
            "unet_ms_per_call": timings,
            "runtime": "onnxruntime CPU",
            "engines": engine_note,
            "unet_onnx_mb": {t: round(s.files.get("unet.onnx", 0) / 1e6, 2) for t, s in summaries.items()},
            "export_folder_mb": {t: round(_folder_bytes(exports / t) / 1e6, 2) for t in summaries},
            "stage_seconds": stages.seconds,
            "total_seconds": round(time.perf_counter() - t_start, 1),
        }
        with atomic_file(tmp / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
    summary["paths"] = {
        "grid": str(out / "grid.png"),
        "images": str(out / "images"),
        "summary": str(out / "summary.json"),
        "pipeline folder": str(out / "model"),
        "recipes": str(out / "recipes"),
        **{f"{t} export": str(out / "exports" / t) for t in ("float", *QUANT_EXPORTS)},
    }
    return summary


def _pil(a: np.ndarray):
    from PIL import Image

    return Image.fromarray(a)


def _engines(folder: Path, wanted: bool) -> dict[str, Any]:
    """Build the export's engines with whatever TensorRT module is installed, or say why not."""
    if not wanted:
        return {"built": False, "reason": "--no-engines"}
    from runtime.build import build_engines
    from runtime.runners import tensorrt_module_name

    module = tensorrt_module_name()
    if module is None:
        return {"built": False, "reason": "no TensorRT module installed (tensorrt or tensorrt_rtx)"}
    results = build_engines(folder, components=["unet"])
    return {
        "built": True,
        "module": module,
        "engines": {
            c: {"file": r.engine.name, "mb": round(r.engine_bytes / 1e6, 2), "build_s": round(r.build_seconds, 1)}
            for c, r in results.items()
        },
    }


def _generate(pipe, exports: Path, prompts, seeds, steps, guidance) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """uint8 images (N, H, W, 3) per column (PyTorch float, then every export through the runtime) and
    the median UNet milliseconds per call of each export."""
    from app.generate import generate_from_export
    from dgq.generate import generate

    images = {
        "float": np.stack([np.asarray(im) for im in generate(pipe, prompts, seeds, steps=steps, guidance=guidance)])
    }
    timings = {}
    for target, column in (("float", "float-export"), *((t, t) for t in QUANT_EXPORTS)):
        imgs, doc = generate_from_export(
            exports / target, prompts, seeds, steps=steps, guidance=guidance, backend="onnxruntime"
        )
        images[column] = np.stack([np.asarray(im) for im in imgs])
        per_call = [s for call in doc["calls"] for s in call["unet_step_s"]]
        timings[target] = round(statistics.median(per_call) * 1e3, 2)
    return images, timings


def format_report(summary: dict[str, Any]) -> str:
    """What ``dgq quickstart`` prints."""
    lines = [
        f"DGQ on {summary['model']}: {summary['calibration_prompts']} calibration prompts x {summary['steps']} steps, "
        f"{len(summary['prompts'])} images, {summary['total_seconds']:.0f} s in all",
        "",
        "parity against the float PyTorch pipeline (same prompts and seeds):",
    ]
    judge = summary.get("judge")
    for target, p in summary["parity"].items():
        psnr = "identical images" if p["psnr_db_vs_float"] == float("inf") else f"PSNR {p['psnr_db_vs_float']:.1f} dB"
        flips = ""
        key = "float" if target == "float-export" else target
        if judge is not None and key in judge["flips_vs_float"]:
            flips = f", judge label flips {judge['flips_vs_float'][key]}/{len(summary['prompts'])}"
        lines.append(f"  {target:<12} {psnr}{flips}")
    if judge is not None:
        acc = ", ".join(f"{k} {v:.0%}" for k, v in judge["accuracy"].items())
        lines.append(f"  judge accuracy on the prompted class: {acc}")
    lines += ["", f"UNet per call ({summary['runtime']}, median ms) and unet.onnx size:"]
    base = summary["unet_ms_per_call"]["float"]
    for target, ms in summary["unet_ms_per_call"].items():
        lines.append(f"  {target:<12} {ms:8.2f} ms  {base / ms:5.2f}x float  {summary['unet_onnx_mb'][target]:7.2f} MB")
    eng = summary["engines"]
    if eng.get("built"):
        sizes = ", ".join(f"{c} {e['mb']:.1f} MB" for c, e in eng["engines"].items())
        lines.append(f"TensorRT engines ({eng['module']}, built ahead of time): {sizes}")
    else:
        lines.append(f"TensorRT engines: not built ({eng['reason']})")
    lines += ["", "outputs:"]
    lines += [f"  {k}: {v}" for k, v in summary["paths"].items()]
    return "\n".join(lines)


def is_quickstart_output(path: str | Path) -> bool:
    """True for a folder :func:`run_quickstart` wrote: its summary, and nothing but its entries."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or {p.name for p in path.iterdir()} - QUICKSTART_ENTRIES:
        return False
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"model", "prompts", "steps", "seeds"} <= set(summary)
