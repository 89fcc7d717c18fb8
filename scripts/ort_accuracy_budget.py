"""Where the ``onnxruntime`` target's accuracy goes, on the simulator: what each of its departures from
faithful DGQ costs with every layer quantized.

    python scripts/ort_accuracy_budget.py --model fashion --out results/ort_accuracy_budget_fashion.json

One float calibration pass (``--cal-prompts`` x ``--steps``); every variant is built from those
statistics and run on the same held-out UNet calls (the float pipeline's own calls for
``--held-prompts`` evaluation prompts, batch 2 with guidance); noise SQNR of each variant's noise
prediction against the float UNet's, signal and noise energies summed over the calls. The variants
(each with every Conv/Linear quantized but ``conv_in``/``conv_out``, no speed rule):

- ``faithful`` (the paper's semantics, K=16) and ``faithful, Linears float``;
- ``onnxruntime`` at its export defaults (K=4; conv groups folded at W8A8, branches below), then
  with its conv outputs left float (``conv outputs float``: what QLinearConv's quantized output
  costs), with conv branches and with conv groups folded (each also with float outputs; one of the
  two is the default), and with its Linears float.

The simulator computes what the exported graph computes (the export tests hold the lowering to it
exactly; ``scripts/graph_quality.py`` measures the graphs in ONNX Runtime), so the differences are
the semantics' own. A variant with float conv outputs is not an export: QLinearConv has no float
output (``scripts/ort_conv_kernels.py`` for what the alternative, ConvInteger, costs). This is a
measurement, not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("ort_accuracy_budget")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fashion", help="zoo name or pipeline folder (default fashion)")
    p.add_argument("--bits", default="W8A8", help="W<w>A<a> (default W8A8)")
    p.add_argument("--cal-prompts", type=int, default=16, help="calibration prompts (default 16)")
    p.add_argument("--held-prompts", type=int, default=6, help="held-out prompts (default 6: 150 calls at 25 steps)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps, calibration and held-out (default 25)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = p.parse_args(argv)
    b = args.bits
    if len(b) != 4 or b[0] != "W" or b[2] != "A" or not (b[1] + b[3]).isdigit():
        p.error(f"--bits takes W<w>A<a> like W8A8, got {b!r}")
    wbits, abits = int(b[1]), int(b[3])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch
    from tqdm import tqdm

    from common.constants import DEFAULT_GUIDANCE
    from common.fsutil import emit_json
    from dgq import zoo
    from dgq.calibrate import build_recipe, calibrate_outputs, collect_statistics
    from dgq.eval.capture import replay
    from dgq.eval.data import default_prompts
    from dgq.eval.metrics import energies, energy_ratio_db
    from dgq.prompts import calibration_prompts
    from dgq.simulate import apply_recipe
    from export.qdq_export import target_config
    from scripts.graph_quality import record_calls

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = zoo.load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    # the held-out calls of scripts/graph_quality.py
    held = record_calls(pipe, [q for q, _ in default_prompts(args.held_prompts)], args.steps, DEFAULT_GUIDANCE, 1000)
    ref = [replay(pipe.unet, c).double() for c in held]
    prompts = calibration_prompts(args.model, args.cal_prompts)
    stats = collect_statistics(pipe, prompts, num_inference_steps=args.steps, progress=False)

    def sqnr(recipe, float_outputs: bool = False) -> float:
        # conv outputs float: the output calibration pass's path (observed, here by nothing, not quantized)
        observe = (lambda name, groups: lambda group, y, slot: None) if float_outputs else None
        if float_outputs:
            recipe = dataclasses.replace(recipe, outputs={})
        handle = apply_recipe(pipe.unet, recipe, observe_outputs=observe)
        try:
            signal = noise = 0.0
            for r, c in zip(ref, held, strict=True):
                s, n = energies(r, replay(pipe.unet, c).double())
                signal, noise = signal + float(s), noise + float(n)
        finally:
            handle.remove()
        return energy_ratio_db(signal, noise)  # pooled over the calls

    faithful = target_config("faithful", wbits, abits)
    ort = target_config("onnxruntime", wbits, abits).replace(min_intensity=0.0)
    linears = tuple(n for n, m in pipe.unet.named_modules() if type(m) is torch.nn.Linear)
    linears_float = {"keep_float": ort.keep_float + linears}
    variants = {  # name: (config, conv outputs float)
        "faithful": (faithful, False),
        "faithful, Linears float": (faithful.replace(**linears_float), False),
        "onnxruntime": (ort, False),
        "onnxruntime, conv outputs float": (ort, True),
        "onnxruntime, conv branches": (ort.replace(fold_conv=False), False),
        "onnxruntime, conv branches, conv outputs float": (ort.replace(fold_conv=False), True),
        "onnxruntime, conv folded": (ort.replace(fold_conv=True), False),
        "onnxruntime, conv folded, conv outputs float": (ort.replace(fold_conv=True), True),
        "onnxruntime, Linears float, conv outputs float": (ort.replace(**linears_float), True),
    }
    rows: dict[str, dict] = {}
    recipes: dict = {}
    for name, (config, float_outputs) in tqdm(variants.items(), desc="variants", unit="variant"):
        key = repr(config.replace(fold_conv=config.folds_conv))  # the default and its explicit twin: one build
        if key not in recipes:
            recipe = build_recipe(stats, pipe.unet, config, progress=False)
            if config.profile == "onnxruntime":
                recipe = calibrate_outputs(pipe, recipe, prompts, args.steps, progress=False)
            recipes[key] = recipe
        recipe = recipes[key]
        rows[name] = {"noise_sqnr_db": sqnr(recipe, float_outputs), "quantized_layers": len(recipe.weights)}
        log.info("%s: %.2f dB", name, rows[name]["noise_sqnr_db"])
    base = rows["faithful"]["noise_sqnr_db"]
    for r in rows.values():
        r["vs_faithful_db"] = r["noise_sqnr_db"] - base
    result = {
        "model": args.model,
        "bits": args.bits,
        "held_calls": len(held),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
    }
    emit_json(result, args.out)
    lines = ["| variant | quantized layers | noise SQNR | vs faithful |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {k} | {r['quantized_layers']} | {r['noise_sqnr_db']:.2f} dB | {r['vs_faithful_db']:+.2f} dB |"
        for k, r in rows.items()
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
