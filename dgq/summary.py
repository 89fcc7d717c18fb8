"""Human-readable summaries of a recipe (``dgq inspect``)."""

from __future__ import annotations

from collections import Counter

import torch

from dgq.config import QuantConfig
from dgq.recipe import Recipe


def outlier_ratio(ranges: torch.Tensor) -> float:
    """Width of the widest group over the median group width: how much an outlier group stands out."""
    widths = ranges[:, 1] - ranges[:, 0]
    med = float(widths.median())
    return float(widths.max()) / med if med > 0 else float("inf") if float(widths.max()) > 0 else 1.0


def speed_rule_text(c: QuantConfig) -> str:
    """The speed rule's thresholds for the summary's keep-float line ("" without the rule)."""
    if not c.min_intensity:
        return ""
    text = f"; layers under {c.min_intensity:g} multiply-adds per element"
    if c.conv_min_intensity != c.min_intensity:
        text += f" (convs as branches: under {c.conv_min_intensity:g})"
    if c.linear_min_intensity != c.min_intensity:
        text += f" (folded Linears: under {c.linear_min_intensity:g})"
    return text


def recipe_summary(recipe: Recipe, top: int = 10) -> str:
    c = recipe.config
    lines = [
        f"recipe for {recipe.model['class']} (config {recipe.model['config_hash'][:12]}, weights "
        f"{recipe.model['weights_hash'][:12]})",
        f"profile {c.profile}: W{c.wbits}A{c.abits}, K={c.groups}, axis rule {c.act_axis}, "
        f"{'time-aware' if c.time_aware else 'one set for all steps'}, attention probs {c.attn_probs} "
        f"({c.attn_scale} scale), "
        f"BOS in float: {c.bos_fp}",
        f"keep float: {', '.join(c.keep_float)}" + speed_rule_text(c),
        f"timestep slots ({len(recipe.slots)}): {', '.join(f'{s:g}' for s in recipe.slots)}",
        f"calibration: {recipe.meta.get('prompts', '?')} prompts, {recipe.meta.get('num_inference_steps', '?')} steps, "
        f"guidance {recipe.meta.get('guidance_scale', '?')}, {recipe.meta.get('scheduler', '?')}, "
        f"{recipe.meta.get('size', '?')} px",
        f"quantized layers (weights): {len(recipe.weights)}; activation sites: {len(recipe.acts)}; probability "
        f"sites: {len(recipe.probs)}",
    ]
    if recipe.outputs:
        branches = sum(int(o.ranges.shape[1]) for o in recipe.outputs.values())
        lines.append(
            f"quantized conv outputs (onnxruntime profile): {len(recipe.outputs)} convs, {branches} branches"
            + (
                f", observed on {recipe.meta['output_calibration']['prompts']} prompts"
                if "output_calibration" in recipe.meta
                else ""
            )
        )
    axes = Counter(a for act in recipe.acts.values() for a in act.axis)
    total = sum(axes.values()) or 1
    lines.append(
        "axis chosen (site x slot): " + ", ".join(f"{k} {v} ({100 * v / total:.0f}%)" for k, v in sorted(axes.items()))
    )
    ks = Counter(act.k(s) for act in recipe.acts.values() for s in range(len(act.axis)))
    lines.append("groups per (site, slot): " + ", ".join(f"K={k}: {n}" for k, n in sorted(ks.items())))
    rows = []
    for key, act in recipe.acts.items():
        for s in range(len(act.axis)):
            if act.k(s) > 1:
                sizes = torch.bincount(act.group_index[s], minlength=act.k(s))
                rows.append(
                    (
                        outlier_ratio(act.ranges[s]),
                        key,
                        s,
                        act.axis[s],
                        int(sizes[-1]),
                        int(sizes.sum()),
                        act.ranges[s][-1].tolist(),
                    )
                )
    rows.sort(key=lambda r: -r[0])
    if rows:
        lines.append(f"largest outlier groups (widest group width / median group width), top {top}:")
        for ratio, key, s, axis, n_out, n, (lo, hi) in rows[:top]:
            lines.append(
                f"  {ratio:7.1f}x  {key} slot {s} ({recipe.slots[s] if s < len(recipe.slots) else '-'}), {axis}: "
                f"{n_out}/{n} elements in [{lo:.3g}, {hi:.3g}]"
            )
    return "\n".join(lines)
