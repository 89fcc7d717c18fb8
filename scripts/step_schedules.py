"""One calibration, any step count and sampler: accuracy at settings the recipe was not calibrated for.

    python scripts/step_schedules.py --out results/step_schedules_fashion.json

Calibrates DGQ once at the default setting (DDIM, 25 steps), then samples the held-out evaluation
prompts at every (sampler, step count) of ``--schedulers`` x ``--steps`` with the float pipeline and
with the simulator, where every timestep that was not calibrated takes the slot of the nearest
calibrated timestep (the rule the runtime and every exported graph share). Next to it, each setting
is recalibrated (same prompts, same preset) and measured the same way: the gap between the two
columns is what the rule costs. Two other rules for uncalibrated timesteps are measured as well, the
calibrated slot just below (``lower``: the less noisy neighbour) and just above (``upper``), so the
choice of rule rests on numbers. Reports, per setting: noise-prediction SQNR on the same inputs
(pooled and worst step), image PSNR vs the float pipeline with the same sampler, seed and steps, and
judge label flips. Writes a JSON document and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from common import argtypes
from common.constants import DEFAULT_GUIDANCE
from common.fsutil import atomic_file

log = logging.getLogger("step_schedules")
RULES = ("nearest", "lower", "upper")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dgq.config import PRESETS
    from dgq.zoo import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name or pipeline folder (default {DEFAULT_MODEL})")
    p.add_argument("--preset", default="dgq", choices=sorted(PRESETS), help="method (default dgq: W8A8 DGQ)")
    p.add_argument(
        "--calibrated-scheduler", default="ddim", help="sampler of the one calibration (default ddim, the model's)"
    )
    p.add_argument(
        "--calibrated-steps", type=argtypes.steps, default=25, help="steps of the one calibration (default 25)"
    )
    p.add_argument(
        "--schedulers", nargs="+", default=["ddim", "euler", "dpm++"], help="samplers to run (default ddim euler dpm++)"
    )
    p.add_argument(
        "--steps", nargs="+", type=argtypes.steps, default=[10, 20, 50], help="step counts (default 10 20 50)"
    )
    p.add_argument(
        "--calibration-prompts",
        type=argtypes.integer(1, why="calibration needs a prompt"),
        default=16,
        help="calibration prompts of every recipe, the one and the recalibrated ones (default 16)",
    )
    p.add_argument(
        "--eval-prompts", type=argtypes.integer(1), default=8, help="held-out prompts, class-balanced (default 8)"
    )
    p.add_argument("--seeds", type=argtypes.integer(1), default=1, help="image seeds per prompt (default 1)")
    p.add_argument(
        "--guidance", type=argtypes.guidance, default=DEFAULT_GUIDANCE, help=f"guidance (default {DEFAULT_GUIDANCE:g})"
    )
    p.add_argument(
        "--rules-at",
        nargs="*",
        type=argtypes.steps,
        default=[10, 20],
        help="step counts at which the lower and upper rules are measured too (default 10 20; none: only "
        "the nearest rule and recalibration)",
    )
    p.add_argument("--threads", type=argtypes.integer(1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")


@contextlib.contextmanager
def slot_rule(rule: str) -> Iterator[None]:
    """Measurement only: make recipes look uncalibrated timesteps up by another rule than the nearest."""
    from common.timesteps import nearest_slot, same_timestep
    from dgq.recipe import Recipe

    if rule == "nearest":
        yield
        return

    def slot_of(self, timestep: float) -> int:
        t, slots = float(timestep), [float(s) for s in self.slots]
        exact = [i for i, s in enumerate(slots) if same_timestep(s, t)]
        if exact:
            return exact[0]
        side = [i for i, s in enumerate(slots) if (s < t if rule == "lower" else s > t)]
        return min(side, key=lambda i: abs(slots[i] - t)) if side else nearest_slot(slots, t)

    saved = Recipe.slot_of
    Recipe.slot_of = slot_of
    try:
        yield
    finally:
        Recipe.slot_of = saved


def _measure(reference, candidate, prompts, steps: int, args: argparse.Namespace) -> dict:
    from dgq.eval.yardstick import YardstickConfig, evaluate

    config = YardstickConfig(
        seeds=tuple(range(args.seeds)), steps=steps, guidance=args.guidance, fid=False, judge=True, progress=False
    )
    res = evaluate(reference, candidate, prompts, config).results
    noise = res["noise"]["same_inputs"]
    return {
        "noise_sqnr_db": noise["sqnr_db_pooled"],
        "noise_sqnr_db_worst_step": noise["sqnr_db_worst_step"],
        "image_psnr_db": res["image"]["psnr_db"],
        "judge_flip_rate": res["judge"]["flip_rate"],
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from common.timesteps import SlotTable
    from dgq import schedulers, zoo
    from dgq.calibrate import calibrate
    from dgq.config import preset
    from dgq.eval.data import default_prompts
    from dgq.prompts import calibration_prompts
    from dgq.simulate import simulate

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in [args.calibrated_scheduler, *args.schedulers]:
        schedulers.scheduler_class(name)  # refuse a bad name before an hour of work
    if args.out.suffix != ".json":
        raise ValueError(f"--out must be a .json file, got {args.out}")
    base = zoo.load_pipeline(args.model)
    base.set_progress_bar_config(disable=True)
    cal_prompts = calibration_prompts(args.model, args.calibration_prompts)
    eval_prompts = default_prompts(args.eval_prompts)
    config = preset(args.preset)

    def pipeline(name: str):
        pipe = type(base)(**{**base.components, "scheduler": schedulers.swap(base.scheduler, name)})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def recipe_for(pipe, steps: int):
        t0 = time.perf_counter()
        recipe = calibrate(
            pipe, cal_prompts, config, num_inference_steps=steps, guidance_scale=args.guidance, progress=False
        )
        return recipe, time.perf_counter() - t0

    calibrated = pipeline(args.calibrated_scheduler)
    recipe, seconds = recipe_for(calibrated, args.calibrated_steps)
    log.info("calibrated at %s x %d steps in %.1f s", args.calibrated_scheduler, args.calibrated_steps, seconds)
    rows = [
        {
            "scheduler": args.calibrated_scheduler,
            "steps": args.calibrated_steps,
            "calibrated_here": True,
            "nearest": _measure(calibrated, simulate(calibrated, recipe), eval_prompts, args.calibrated_steps, args),
        }
    ]
    doc = {
        "model": args.model,
        "preset": args.preset,
        "calibrated": {"scheduler": args.calibrated_scheduler, "steps": args.calibrated_steps, "slots": recipe.slots},
        "calibration_prompts": args.calibration_prompts,
        "eval_prompts": args.eval_prompts,
        "seeds": args.seeds,
        "guidance": args.guidance,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rows": rows,
        "complete": False,
    }

    def save(doc: dict) -> None:
        # After every setting: a long run stopped part way keeps what it measured ("complete": false).
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(args.out) as f:
            f.write((json.dumps(doc, indent=2) + "\n").encode())

    table = SlotTable(recipe.slots)
    settings = [(s, n) for s in args.schedulers for n in args.steps]
    for i, (name, steps) in enumerate(settings):
        if (schedulers.scheduler_class(name), steps) == (
            schedulers.scheduler_class(args.calibrated_scheduler),
            args.calibrated_steps,
        ):
            continue
        t0 = time.perf_counter()
        pipe = pipeline(name)
        pipe.scheduler.set_timesteps(steps)
        timesteps = [float(t) for t in pipe.scheduler.timesteps]
        row = {
            "scheduler": type(pipe.scheduler).__name__,
            "alias": name,
            "steps": steps,
            "calibrated_here": False,
            "timesteps": {
                "count": len(timesteps),
                "calibrated": sum(table.is_calibrated(t) for t in timesteps),
                "farthest_from_a_slot": max(min(abs(s - t) for s in recipe.slots) for t in timesteps),
                "far": sum(table.is_far(t) for t in timesteps),
            },
        }
        for rule in RULES if steps in args.rules_at else ("nearest",):
            with slot_rule(rule):
                row[rule] = _measure(pipe, simulate(pipe, recipe), eval_prompts, steps, args)
        again, seconds = recipe_for(pipe, steps)
        row["recalibrated"] = _measure(pipe, simulate(pipe, again), eval_prompts, steps, args)
        row["recalibration_seconds"] = round(seconds, 1)
        rows.append(row)
        save(doc)
        log.info(
            "[%d/%d] %s %d steps: nearest %.2f dB, recalibrated %.2f dB (%.0f s)",
            i + 1,
            len(settings),
            name,
            steps,
            row["nearest"]["noise_sqnr_db"],
            row["recalibrated"]["noise_sqnr_db"],
            time.perf_counter() - t0,
        )
    doc["complete"] = True
    save(doc)
    sys.stdout.write(format_table(doc) + f"\n{args.out}\n")
    return 0


def format_table(doc: dict) -> str:
    """The README table: per setting, the nearest rule next to recalibration (and the other rules)."""
    rules = [r for r in ("lower", "upper") if any(r in row for row in doc["rows"])]
    head = ["sampler", "steps", "noise SQNR nearest", "recalibrated", *[f"{r}" for r in rules]]
    head += ["image PSNR nearest", "recalibrated", "flips nearest", "recalibrated"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in doc["rows"]:
        near, again = row["nearest"], row.get("recalibrated", row["nearest"])
        cells = [
            row.get("alias", row["scheduler"]),
            str(row["steps"]) + (" (calibrated)" if row["calibrated_here"] else ""),
        ]
        cells += [f"{near['noise_sqnr_db']:.2f}", f"{again['noise_sqnr_db']:.2f}"]
        cells += [f"{row[r]['noise_sqnr_db']:.2f}" if r in row else "" for r in rules]
        cells += [f"{near['image_psnr_db']:.2f}", f"{again['image_psnr_db']:.2f}"]
        cells += [f"{near['judge_flip_rate']:.1%}", f"{again['judge_flip_rate']:.1%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from app.cli import script_main

    return script_main("step_schedules.py", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
