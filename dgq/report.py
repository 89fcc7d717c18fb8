"""Per-layer error report: where along the UNet the simulated model departs from the float one.

For the UNet calls of one float generation, every quantized layer's output in the simulated UNet is
compared with the same layer's output in the float UNet on the same call inputs (errors accumulate
along the network, as they do at inference). :func:`dgq.eval.metrics.first_divergence` names the first
layer whose SQNR drops below a threshold: a failing comparison points at a layer, not just at the output.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from common.constants import DEFAULT_GUIDANCE
from dgq.eval.capture import record_unet_calls
from dgq.eval.metrics import energy_ratio_db
from dgq.recipe import Recipe
from dgq.simulate import apply_recipe
from dgq.sites import layer_sites


@dataclass
class LayerError:
    name: str
    sqnr_db: float  # pooled over the recorded calls
    worst_call_sqnr_db: float


def _outputs(unet: torch.nn.Module, names: list[str], call) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    hooks = [
        unet.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: out.__setitem__(n, o.detach().float()))
        for n in names
    ]
    try:
        with torch.no_grad():
            unet(*call.args, **call.kwargs)
    finally:
        for h in hooks:
            h.remove()
    return out


def layer_errors(
    pipe: DiffusionPipeline,
    recipe: Recipe,
    prompt: str,
    seed: int = 0,
    steps: int = 25,
    guidance: float = DEFAULT_GUIDANCE,
    size: int | None = None,
) -> list[LayerError]:
    """SQNR of every quantized layer's output, simulated vs float, in execution order (the order the
    float UNet runs them: diffusers registers a block's attentions before its resnets)."""
    size = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor) if size is None else size
    with record_unet_calls(pipe.unet) as calls, torch.no_grad():
        pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        )
    names = [s.name for s in layer_sites(pipe.unet, recipe.config)]
    qunet = copy.deepcopy(pipe.unet)
    apply_recipe(qunet, recipe)
    signal = {n: 0.0 for n in names}
    error = {n: 0.0 for n in names}
    worst = {n: math.inf for n in names}
    order: list[str] = []
    for call in calls:
        ref = _outputs(pipe.unet, names, call)
        order = order or list(ref)
        test = _outputs(qunet, names, call)
        for n in names:
            s = float(ref[n].pow(2).sum())
            e = float((ref[n] - test[n]).pow(2).sum())
            signal[n] += s
            error[n] += e
            worst[n] = min(worst[n], energy_ratio_db(s, e))
    return [LayerError(n, energy_ratio_db(signal[n], error[n]), worst[n]) for n in order]


def write_layer_report(errors: list[LayerError], recipe: Recipe, out_dir: str | Path) -> dict[str, Path]:
    """``layers.json`` and two plots: SQNR per layer, and group ranges of the most outlier-heavy site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dgq.summary import outlier_ratio

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "layers.json", "sqnr": out / "layer_sqnr.png", "groups": out / "group_ranges.png"}
    paths["json"].write_text(json.dumps([asdict(e) for e in errors], indent=2, default=str))

    fig, ax = plt.subplots(figsize=(max(8, len(errors) * 0.12), 4))
    finite = [e.sqnr_db if math.isfinite(e.sqnr_db) else float("nan") for e in errors]
    ax.plot(range(len(errors)), finite, marker=".", lw=1)
    ax.set_xlabel("quantized layer (execution order)")
    ax.set_ylabel("output SQNR vs float (dB)")
    ax.set_title(f"per-layer SQNR, W{recipe.config.wbits}A{recipe.config.abits} K={recipe.config.groups}")
    worst = sorted(range(len(errors)), key=lambda i: finite[i] if finite[i] == finite[i] else math.inf)[:5]
    for i in worst:
        ax.annotate(errors[i].name, (i, finite[i]), fontsize=6, rotation=30)
    fig.tight_layout()
    fig.savefig(paths["sqnr"], dpi=120)
    plt.close(fig)

    best = max(
        ((outlier_ratio(a.ranges[s]), k, s) for k, a in recipe.acts.items() for s in range(len(a.axis)) if a.k(s) > 1),
        default=None,
    )
    fig, ax = plt.subplots(figsize=(6, 4))
    if best is not None:
        _, key, s = best
        act = recipe.acts[key]
        rg = act.ranges[s]
        sizes = torch.bincount(act.group_index[s], minlength=act.k(s))
        for g in range(act.k(s)):
            ax.plot([g, g], [float(rg[g, 0]), float(rg[g, 1])], lw=6)
            ax.annotate(str(int(sizes[g])), (g, float(rg[g, 1])), fontsize=7, ha="center", va="bottom")
        ax.set_title(f"{key}\nslot {s} ({act.axis[s]} groups; labels: members)", fontsize=8)
        ax.set_xlabel("group")
        ax.set_ylabel("activation range")
    fig.tight_layout()
    fig.savefig(paths["groups"], dpi=120)
    plt.close(fig)
    return paths
