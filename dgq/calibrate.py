"""DGQ calibration: run the float pipeline, stream per-timestep statistics, search the groups.

``calibrate(pipe, prompts, config)`` returns a :class:`~dgq.recipe.Recipe`. The float pipeline
generates the UNet inputs exactly as at inference (scheduler, steps, guidance); observers keep only
per-element min/max along both candidate axes for each (site, timestep slot), so memory stays
``O(C + N)`` per site and slot whatever the number of prompts.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence

import diffusers
import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from dgq.attention import DGQAttnProcessor, StepContext
from dgq.config import QuantConfig
from dgq.fingerprint import model_identity
from dgq.quant import CHANNEL, LAYER, PIXEL, AxisStats, group_ranges, kmeans_groups, minmax_range, mse_search_range, search_groups
from dgq.quant import affine_params_from_range, symmetric_scale_from_absmax
from dgq.recipe import ActQuant, ProbsQuant, Recipe, WeightQuant
from dgq.simulate import slot_hook
from dgq.sites import CONV, LINEAR, QKV, attention_sites, layer_sites

log = logging.getLogger(__name__)


class ActObserver:
    """Streams :class:`AxisStats` per timestep slot for one activation site; returns its input."""

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.stats: dict[int, AxisStats] = {}

    def __call__(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        grouping_layout = "conv" if self.layout == CONV else "linear"
        if slot in self.stats:
            self.stats[slot].update(x)
        else:
            self.stats[slot] = AxisStats.from_batch(x, grouping_layout)
        return x


class ProbsObserver:
    """Max of the attention probabilities per slot (only needed for a static scale)."""

    def __init__(self) -> None:
        self.max: dict[int, float] = {}

    def __call__(self, p: torch.Tensor, slot: int, batch_size: int) -> torch.Tensor:
        self.max[slot] = max(self.max.get(slot, 0.0), float(p.amax()))
        return p


class _SlotTable:
    """Timestep value -> slot index, assigned in order of first appearance."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def __call__(self, t: float) -> int:
        for i, v in enumerate(self.values):
            if v == t:
                return i
        self.values.append(t)
        return len(self.values) - 1


# ---------------------------------------------------------------------------- grouping


def _merge(stats: list[AxisStats]) -> AxisStats:
    out = stats[0]
    for s in stats[1:]:
        out = out.merge(s)
    return out


def _group_one(stats: AxisStats, config: QuantConfig, axis: str | None = None, group_index=None):
    """``(axis, group_index, ranges (K, 2))`` of one slot, per the config's axis rule; with ``axis``
    and ``group_index`` given, only the ranges are computed for that fixed membership."""
    k = config.effective_groups
    if group_index is not None:
        if axis == LAYER:
            lo, hi = stats.layer_range()
            return axis, group_index, torch.tensor([[lo, hi]])
        amin, amax = stats.axis(axis)
        gmin, gmax = group_ranges(amin, amax, group_index, int(group_index.max()) + 1)
        return axis, group_index, torch.stack([gmin, gmax], 1)
    if config.act_axis in ("auto", LAYER) or k == 1 or not stats.has_pixel_axis:
        res = search_groups(stats, 1 if config.act_axis == LAYER else k, seed=config.seed)
        return res.axis, res.group_index, torch.stack([res.group_min, res.group_max], 1)
    amin, amax = stats.axis(config.act_axis)
    gi = kmeans_groups(amin, amax, k, seed=config.seed)
    gmin, gmax = group_ranges(amin, amax, gi, int(gi.max()) + 1)
    return config.act_axis, gi, torch.stack([gmin, gmax], 1)


def build_act_quant(layout: str, per_slot: dict[int, AxisStats], n_slots: int, config: QuantConfig) -> ActQuant:
    """Steps 2-4 of METHOD.md 3 for one site over its slots.

    ``faithful``: an independent grouping per slot (membership is static per layer and timestep).
    ``tensorrt``: one grouping over all slots (a branch per group in the graph), per-slot ranges.
    Not time-aware: one slot from the statistics of all steps.
    """
    missing = [s for s in range(n_slots) if s not in per_slot]
    if missing:
        raise RuntimeError(f"site saw no data in slots {missing}; was the UNet called with other timesteps?")
    if not config.time_aware:
        axis, gi, rg = _group_one(_merge([per_slot[s] for s in range(n_slots)]), config)
        return ActQuant(layout, [axis], [gi], [rg])
    if config.profile == "tensorrt":
        axis, gi, _ = _group_one(_merge([per_slot[s] for s in range(n_slots)]), config)
        slots = [_group_one(per_slot[s], config, axis, gi) for s in range(n_slots)]
    else:
        slots = [_group_one(per_slot[s], config) for s in range(n_slots)]
    return ActQuant(layout, [a for a, _, _ in slots], [g for _, g, _ in slots], [r for _, _, r in slots])


def weight_quant(weight: torch.Tensor, kind: str, config: QuantConfig) -> WeightQuant:
    """Per-output-channel (or per-tensor, or block-wise for Linear) weight parameters."""
    w = weight.detach().float()
    granularity = config.weight_granularity
    if granularity == "block" and kind != LINEAR:
        granularity = "channel"  # block-wise INT4 exists for MatMul/Gemm only; convs stay per channel
    axis = {"tensor": None, "channel": 0, "block": 1}[granularity]
    block = config.weight_block if granularity == "block" else None
    sym = config.is_symmetric
    if config.weight_init == "mse":
        lo, hi = mse_search_range(w, config.wbits, axis=axis, symmetric=sym, block_size=block)
    else:
        lo, hi = minmax_range(w, axis=axis, block_size=block)
    if sym:
        scale = symmetric_scale_from_absmax(torch.maximum(lo.abs(), hi.abs()), config.wbits)
        zp = torch.zeros_like(scale)
    else:
        scale, zp = affine_params_from_range(lo, hi, config.wbits, include_zero=True)
    return WeightQuant(config.wbits, granularity, block, sym, scale, zp)


# ---------------------------------------------------------------------------- the session


def calibrate(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    config: QuantConfig,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    size: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> Recipe:
    """Calibrate ``pipe.unet`` with DGQ on ``prompts`` and return the recipe.

    Each prompt ``i`` gets noise seed ``seed + i``; ``batch_size`` prompts run per pipeline call.
    The pipeline is restored to float when this returns (or raises).
    """
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    unet = pipe.unet
    size = size or int(unet.config.sample_size) * int(pipe.vae_scale_factor)
    t0 = time.perf_counter()
    ctx = StepContext()
    table = _SlotTable()
    layers = layer_sites(unet, config)
    attns = attention_sites(unet, config)
    act_obs = {s.input_key: ActObserver(s.kind) for s in layers}
    for a in attns:
        if config.quantize_qkv:
            for role in ("q", "k", "v"):
                act_obs[a.key(role)] = ActObserver(QKV)
    probs_obs = {a.key("probs"): ProbsObserver() for a in attns if config.attn_probs != "float"}

    hooks = [slot_hook(unet, ctx, table)]
    for s in layers:
        obs = act_obs[s.input_key]
        hooks.append(unet.get_submodule(s.name).register_forward_pre_hook(lambda m, args, obs=obs: (obs(args[0], ctx.current()),)))
    original = dict(unet.attn_processors)
    procs = dict(original)
    for a in attns:
        get = act_obs.get
        procs[f"{a.name}.processor"] = DGQAttnProcessor(
            ctx, q=get(a.key("q")), k=get(a.key("k")), v=get(a.key("v")), probs=probs_obs.get(a.key("probs")), keep_bos=config.bos_fp
        )
    unet.set_attn_processor(procs)
    try:
        was_enabled = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
        pipe.set_progress_bar_config(disable=True)
        batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
        with torch.inference_mode():
            for idx in tqdm(batches, desc="calibration batches", disable=not progress):
                pipe(
                    [prompts[i] for i in idx],
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=size,
                    width=size,
                    generator=[torch.Generator().manual_seed(seed + i) for i in idx],
                    output_type="latent",
                )
        pipe.set_progress_bar_config(disable=was_enabled)
    finally:
        for h in hooks:
            h.remove()
        unet.set_attn_processor(original)
    n_slots = len(table.values)
    log.info("collected statistics for %d sites over %d timestep slots in %.1f s", len(act_obs), n_slots, time.perf_counter() - t0)

    recipe = Recipe(config=config, model=model_identity(unet), slots=list(table.values))
    for key, obs in tqdm(act_obs.items(), desc="group search", disable=not progress):
        recipe.acts[key] = build_act_quant(obs.layout, obs.stats, n_slots, config)
    for key, obs in probs_obs.items():
        static = None
        if config.attn_scale == "static":
            values = [obs.max[s] for s in range(n_slots)]
            static = torch.tensor(values if config.time_aware else [max(values)], dtype=torch.float32)
        recipe.probs[key] = ProbsQuant(static)
    for s in tqdm(layers, desc="weights", disable=not progress):
        recipe.weights[s.name] = weight_quant(unet.get_submodule(s.name).weight, s.kind, config)
    recipe.meta = {
        "prompts": len(prompts),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "size": size,
        "seed": seed,
        "scheduler": type(pipe.scheduler).__name__,
        "versions": {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__, "python": platform.python_version()},
    }
    log.info("calibration finished in %.1f s", time.perf_counter() - t0)
    return recipe
