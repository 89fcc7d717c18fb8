"""End-to-end parity of an export folder: the exported graphs through the runtime (ONNX Runtime CPU)
against the PyTorch simulator of the same recipe, and both against the float model.

    python scripts/export_parity.py outputs/fashion-tensorrt-w8a8 --out results/export_parity_fashion_tensorrt_w8a8.json

Same prompts, seeds and steps (the steps the recipe was calibrated with) through three pipelines:
float diffusers, simulated diffusers (``dgq.simulate``) and ``runtime.Text2ImagePipeline`` on the
export; reports PSNR (dB, uint8 images) for each pair, per image and pooled, and the largest
per-pixel difference between the runtime and the simulator. For the default model and its stress
copy (whose prompts name Fashion-MNIST classes) the shipped judge classifies every image: its
accuracy against the prompted class for each pipeline, and the label flips of the runtime and of the
simulator against the float image of the same seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from common.constants import DEFAULT_GUIDANCE

log = logging.getLogger("export_parity")


def psnr_u8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images (H, W, C) with dgq's metric."""
    from dgq.eval import metrics

    def as_batch(img):
        return torch.as_tensor(img, dtype=torch.float64)[None]

    return metrics.psnr(as_batch(a), as_batch(b), data_range=255.0)


def judge_flips(images: dict[str, list[np.ndarray]], labels: list[int]) -> dict[str, float]:
    """The judge on uint8 images (H, W, 3) of each pipeline (``float``, ``simulator``, ``runtime``,
    same prompts and seeds in the same order): accuracy of each against ``labels`` and the flip rate
    of each quantized pipeline against ``float``."""
    from dgq.eval.judge import classify_uint8, load_judge

    judge = load_judge()
    pred = {name: classify_uint8(imgs, judge) for name, imgs in images.items()}
    target = torch.as_tensor(labels)
    out = {f"judge_accuracy_{name}": float((p == target).float().mean()) for name, p in pred.items()}
    for name in ("simulator", "runtime"):
        out[f"judge_flips_{name}_vs_float"] = float((pred[name] != pred["float"]).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", type=Path, help="export folder from scripts/export_onnx.py")
    p.add_argument("--model", default=None, help="model the export came from (default: the recipe's model_spec)")
    p.add_argument("--num-prompts", type=int, default=5, help="evaluation prompts (default 5)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default 2)")
    p.add_argument("--guidance", type=float, default=None, help="guidance (default: the calibration's)")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from dgq import zoo
    from dgq.eval.data import default_prompts
    from dgq.prompts import FASHION_MODELS
    from dgq.recipe import load
    from dgq.simulate import simulate
    from export.manifest import read_manifest
    from runtime.pipeline import Text2ImagePipeline

    manifest = read_manifest(args.export, verify=True)
    recipe = load(args.export / "recipe.safetensors")
    model = args.model or recipe.meta.get("model_spec") or zoo.DEFAULT_MODEL
    steps = int(manifest.get("steps") or recipe.meta.get("num_inference_steps") or 25)
    guidance = args.guidance if args.guidance is not None else float(manifest.get("guidance") or DEFAULT_GUIDANCE)
    pipe = zoo.load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    qpipe = simulate(pipe, recipe)
    rt = Text2ImagePipeline.from_export(args.export, backend="onnxruntime")
    prompts = default_prompts(args.num_prompts)
    rows = []
    images: dict[str, list[np.ndarray]] = {"float": [], "simulator": [], "runtime": []}
    labels = []
    for prompt, label in prompts:
        for seed in range(args.seeds):
            kw = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "np"}
            f = pipe([prompt], generator=torch.Generator().manual_seed(seed), **kw).images[0]
            s = qpipe([prompt], generator=torch.Generator().manual_seed(seed), **kw).images[0]
            r = rt([prompt], seed=seed, steps=steps, guidance=guidance).images[0]
            f, s = (np.round(x * 255).astype(np.uint8) for x in (f, s))
            for name, img in (("float", f), ("simulator", s), ("runtime", r)):
                images[name].append(img)
            labels.append(label)
            rows.append(
                {
                    "prompt": prompt,
                    "seed": seed,
                    "runtime_vs_simulator_db": psnr_u8(r, s),
                    "simulator_vs_float_db": psnr_u8(s, f),
                    "runtime_vs_float_db": psnr_u8(r, f),
                    "runtime_vs_simulator_max_levels": int(np.abs(r.astype(int) - s.astype(int)).max()),
                }
            )
            log.info("%s seed %d: %s", prompt, seed, {k: round(v, 2) for k, v in rows[-1].items() if k.endswith("_db")})

    def pooled(key: str) -> float:
        return float(np.median([r[key] for r in rows]))

    result = {
        "export": str(args.export),
        "target": manifest["target"],
        "model": model,
        "steps": steps,
        "guidance": guidance,
        "recipe": {k: recipe.config.to_dict()[k] for k in ("wbits", "abits", "groups", "profile", "outlier_bits")},
        "median_runtime_vs_simulator_db": pooled("runtime_vs_simulator_db"),
        "median_simulator_vs_float_db": pooled("simulator_vs_float_db"),
        "median_runtime_vs_float_db": pooled("runtime_vs_float_db"),
        "max_runtime_vs_simulator_levels": max(r["runtime_vs_simulator_max_levels"] for r in rows),
        **(judge_flips(images, labels) if model in FASHION_MODELS else {}),
        "samples": rows,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        from common.fsutil import atomic_file

        with atomic_file(args.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.write(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
