"""Evaluate the float default model against real Fashion-MNIST: the README's quality figures.

    python scripts/eval_float.py --out outputs/eval_float

Generates every evaluation prompt with several seeds, then reports FID against real test images
(with a real-vs-real FID at the same sample count as the floor to read it against), judge
accuracy overall and per class, and writes ``float_eval.json`` and ``samples_grid.png``
(one row per class).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from common import argtypes
from common.constants import DEFAULT_GUIDANCE

log = logging.getLogger("eval_float")


def build_parser() -> argparse.ArgumentParser:
    from dgq.zoo import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name or pipeline folder (default {DEFAULT_MODEL})")
    p.add_argument("--num-prompts", type=int, default=None, help="evaluation prompts, class-balanced (default: all)")
    p.add_argument("--seeds", type=int, default=10, help="image seeds per prompt (default 10)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument(
        "--guidance",
        type=float,
        default=DEFAULT_GUIDANCE,
        help=f"classifier-free guidance scale (default {DEFAULT_GUIDANCE:g})",
    )
    p.add_argument("--batch-size", type=int, default=20, help="images per pipeline call (default 20)")
    p.add_argument(
        "--num-real",
        type=argtypes.integer(1, why="FID needs real images"),
        default=None,
        help="real test images for FID (default: as many as generated images)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the real-vs-real FID floor")
    p.add_argument("--grid-seeds", type=int, default=8, help="columns of the sample grid (default 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path("outputs/eval_float"), help="output folder")
    from dgq.device import add_arguments as add_device_arguments

    add_device_arguments(p, "the pipeline")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from common.fsutil import atomic_file
    from dgq import zoo
    from dgq.device import place, resolve_device, resolve_dtype
    from dgq.eval.data import default_prompts, real_images
    from dgq.eval.fid import fid_from_features, inception_features, load_inception
    from dgq.eval.judge import classify, load_card, load_judge
    from dgq.eval.plots import plot_grid
    from dgq.eval.yardstick import YardstickConfig, generate_images, to_jsonable

    start = time.perf_counter()
    config = YardstickConfig(
        seeds=tuple(range(args.seeds)),
        steps=args.steps,
        guidance=args.guidance,
        batch_size=args.batch_size,
        noise_fidelity=False,
    )
    prompts = default_prompts(args.num_prompts)
    pipe = place(zoo.load_pipeline(args.model), resolve_device(args.device), resolve_dtype(args.dtype))
    pipe.set_progress_bar_config(disable=True)
    images, sample_prompts, sample_seeds = generate_images(pipe, [p for p, _ in prompts], config)
    labels = torch.tensor([lab for _, lab in prompts for _ in config.seeds])
    n = len(images)
    log.info("generated %d images in %.0f s", n, time.perf_counter() - start)

    num_real = n if args.num_real is None else args.num_real
    inception = load_inception()
    f_gen = inception_features(images, inception)
    f_real = inception_features(real_images(num_real, "test")[0], inception)
    fid_section = {"num_generated": n, "num_real": num_real, "generated_vs_real_test": fid_from_features(f_gen, f_real)}
    if not args.no_baseline:
        # The same count of real training images: FID's floor at this sample size.
        f_train = inception_features(real_images(n, "train")[0], inception)
        fid_section["real_train_vs_real_test"] = fid_from_features(f_train, f_real)

    judge = load_judge()
    pred, probs = classify(images, judge)
    names = load_card().config.class_names
    per_class = {names[c]: float((pred[labels == c] == c).float().mean()) for c in sorted(set(labels.tolist()))}
    results = {
        "model": args.model,
        "config": {"steps": args.steps, "guidance": args.guidance, "seeds": args.seeds, "num_prompts": len(prompts)},
        "fid": fid_section,
        "judge": {
            "accuracy": float((pred == labels).float().mean()),
            "per_class_accuracy": per_class,
            "mean_confidence": float(probs.max(-1).values.mean()),
            "judge_test_accuracy_on_real": load_card().test_accuracy,
        },
        "samples": [
            {"prompt": p, "label": int(lab), "seed": s, "judge": int(j)}
            for p, lab, s, j in zip(sample_prompts, labels, sample_seeds, pred, strict=True)
        ],
        "elapsed_s": round(time.perf_counter() - start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out / "float_eval.json", "w") as f:
        json.dump(to_jsonable(results), f, indent=2, allow_nan=False)
        f.write("\n")

    # Grid: one row per class, the first prompt of that class, the first --grid-seeds seeds.
    rows = []
    for c in sorted(set(labels.tolist())):
        idx = [i for i in range(n) if int(labels[i]) == c][: args.grid_seeds]
        rows += idx
    captions = [
        f"{names[int(labels[i])]}" + ("" if pred[i] == labels[i] else f"\n(judge: {names[int(pred[i])]})") for i in rows
    ]
    plot_grid(images[rows], captions, args.out / "samples_grid.png", columns=args.grid_seeds)

    line = f"FID vs real test ({n} vs {num_real}): {fid_section['generated_vs_real_test']:.2f}"
    if "real_train_vs_real_test" in fid_section:
        line += f" (real-vs-real floor {fid_section['real_train_vs_real_test']:.2f})"
    sys.stdout.write(f"{line}\njudge accuracy: {results['judge']['accuracy']:.3f}\n")
    sys.stdout.write(f"{args.out / 'float_eval.json'}\n{args.out / 'samples_grid.png'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
