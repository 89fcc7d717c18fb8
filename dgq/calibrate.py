"""DGQ calibration: run the float pipeline, stream per-timestep statistics, search the groups.

``calibrate(pipe, prompts, config)`` returns a :class:`~dgq.recipe.Recipe`. The float pipeline
generates the UNet inputs exactly as at inference (scheduler, steps, guidance); observers keep only
per-element min/max along both candidate axes for each (site, timestep slot), so memory stays
``O(C + N)`` per site and slot whatever the number of prompts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass

import diffusers
import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from common.constants import DEFAULT_GUIDANCE
from common.errors import DGQError
from dgq import distributed
from dgq.attention import DGQAttnProcessor, StepContext
from dgq.config import QuantConfig
from dgq.device import describe, is_out_of_memory
from dgq.fingerprint import model_identity
from dgq.plan import site_fold
from dgq.quant import (
    CHANNEL,
    LAYER,
    AxisStats,
    affine_params_from_range,
    along,
    axis_lengths,
    group_ranges,
    kmeans_groups,
    minmax_range,
    mse_search_range,
    search_groups,
    symmetric_scale_from_absmax,
)
from dgq.recipe import ActQuant, OutputQuant, ProbsQuant, Recipe, WeightQuant
from dgq.simulate import apply_recipe, slot_hook
from dgq.sites import CONV, LINEAR, QKV, attention_sites, layer_sites

log = logging.getLogger(__name__)


class CalibrationError(DGQError, RuntimeError):
    """Calibration cannot go on: a non-finite activation, or out of memory (the message names the site)."""


def _run_prompts(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    steps: int,
    guidance: float,
    size: int,
    seed: int,
    batch_size: int,
    progress: bool,
    desc: str,
) -> None:
    """Run the pipeline on ``prompts`` for its hooks' sake (latents discarded): prompt ``i`` gets noise
    seed ``seed + i``, ``batch_size`` prompts per call, the pipeline's own progress bar restored.

    Under several processes (``dgq.distributed``) each runs its share of the same batches."""
    was_disabled = getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    shard = distributed.current()
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    batches = shard.take(batches, f"batches of {batch_size} prompts")
    try:
        pipe.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            for idx in tqdm(batches, desc=desc, disable=not (progress and shard.is_main)):
                pipe(
                    [prompts[i] for i in idx],
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=size,
                    width=size,
                    generator=[torch.Generator().manual_seed(seed + i) for i in idx],
                    output_type="latent",
                )
    finally:
        pipe.set_progress_bar_config(disable=was_disabled)


class _NonFinite(CalibrationError):
    """An observer's input had NaN or Inf (re-raised as a :class:`CalibrationError` naming the timestep)."""

    def __init__(self, site: str, slot: int) -> None:
        super().__init__(site, slot)
        self.site, self.slot = site, slot


class ActObserver:
    """Streams :class:`AxisStats` per timestep slot for one activation site; returns its input."""

    def __init__(self, layout: str, site: str = "") -> None:
        self.layout = layout
        self.site = site
        self.stats: dict[int, AxisStats] = {}

    def __call__(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        grouping_layout = "conv" if self.layout == CONV else "linear"
        try:
            if slot in self.stats:
                self.stats[slot].update(x)
            else:
                self.stats[slot] = AxisStats.from_batch(x, grouping_layout)
        except ValueError:
            if not bool(torch.isfinite(x).all()):
                raise _NonFinite(self.site, slot) from None
            raise
        return x


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


def _onnxruntime_grouping(layout: str, merged: AxisStats, config: QuantConfig) -> tuple[str, torch.Tensor]:
    """``onnxruntime`` profile: a conv input gets K channel groups fixed across steps (folded into
    the weights with ``fold_conv``, else one QLinearConv branch each); a Linear input too when the
    config folds them (``fold_linear``: the groups' scales and centres go into the weights, so one
    per-tensor Q/DQ feeds MatMulIntegerToFloat); every other input one range (a per-channel scale
    cannot feed MatMulIntegerToFloat, and a Gather of channel groups along a MatMul's last axis costs
    more than the integer kernel saves: README)."""
    k = config.effective_groups
    grouped = layout == CONV or (layout == LINEAR and config.folds_linear)
    if not grouped or k == 1:
        return LAYER, torch.zeros(1, dtype=torch.long)
    amin, amax = merged.axis(CHANNEL)
    return CHANNEL, kmeans_groups(amin, amax, k, seed=config.seed)


def build_act_quant(layout: str, per_slot: dict[int, AxisStats], n_slots: int, config: QuantConfig) -> ActQuant:
    """Steps 2-4 of the activation grouping (docs/method.md, section 4) for one site over its slots.

    ``faithful``: an independent grouping per slot (membership is static per layer and timestep).
    ``tensorrt``: one grouping over all slots (a branch per group in the graph), per-slot ranges.
    Not time-aware: one slot from the statistics of all steps.
    """
    missing = [s for s in range(n_slots) if s not in per_slot]
    if missing:
        raise RuntimeError(f"site saw no data in slots {missing}; was the UNet called with other timesteps?")
    if config.profile == "onnxruntime":
        merged = _merge([per_slot[s] for s in range(n_slots)])
        axis, gi = _onnxruntime_grouping(layout, merged, config)
        slots = (
            [_group_one(merged, config, axis, gi)]
            if not config.time_aware
            else [_group_one(per_slot[s], config, axis, gi) for s in range(n_slots)]
        )
        return ActQuant(layout, [a for a, _, _ in slots], [g for _, g, _ in slots], [r for _, _, r in slots])
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
    sym = config.weights_symmetric
    if config.weight_init == "mse":
        lo, hi = mse_search_range(w, config.wbits, axis=axis, symmetric=sym, block_size=block)
    else:
        lo, hi = minmax_range(w, axis=axis, block_size=block)
    if sym:
        scale = symmetric_scale_from_absmax(torch.maximum(lo.abs(), hi.abs()), config.wbits)
        zp = torch.zeros_like(scale)
    else:
        scale, zp = affine_params_from_range(lo, hi, config.wbits, include_zero=True)
    return WeightQuant(config.wbits, granularity, block, sym, scale.cpu(), zp.cpu())


# ---------------------------------------------------------------------------- the session


class KeyObserver:
    """q/k/v-style observer for keys that keeps the BOS row's statistics apart.

    One pass then serves configs with and without BOS separation (docs/method.md, section 6): ``rest`` holds the
    statistics without token 0, ``bos`` those of token 0 alone; ``with_bos`` puts them together.
    """

    def __init__(self, site: str = "", observer: type = ActObserver) -> None:
        self.rest = observer(QKV, site)
        self.bos = observer(QKV, site)

    def __call__(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        self.bos(x[:, :1], slot)
        self.rest(x[:, 1:], slot)
        return x

    def with_bos(self) -> dict[int, AxisStats]:
        out = {}
        for slot, rest in self.rest.stats.items():
            b = self.bos.stats[slot]
            out[slot] = AxisStats(
                rest.layout,
                rest.ndim,
                torch.minimum(rest.channel_amin, b.channel_amin),
                torch.maximum(rest.channel_amax, b.channel_amax),
                torch.cat([b.pixel_amin, rest.pixel_amin]),
                torch.cat([b.pixel_amax, rest.pixel_amax]),
                rest.samples,
            )
        return out


class ProbsMaxObserver:
    """Max of the attention probabilities per slot, with and without the BOS column."""

    def __init__(self, is_cross: bool) -> None:
        self.is_cross = is_cross
        self.max_all: dict[int, float] = {}
        self.max_no_bos: dict[int, float] = {}

    def __call__(self, p: torch.Tensor, slot: int, heads: int) -> torch.Tensor:
        self.max_all[slot] = max(self.max_all.get(slot, 0.0), float(p.amax()))
        body = p[..., 1:] if self.is_cross else p
        self.max_no_bos[slot] = max(self.max_no_bos.get(slot, 0.0), float(body.amax()))
        return p


def _cpu(stats: AxisStats) -> AxisStats:
    move = lambda t: None if t is None else t.cpu()  # noqa: E731
    return dataclasses.replace(
        stats,
        channel_amin=move(stats.channel_amin),
        channel_amax=move(stats.channel_amax),
        pixel_amin=move(stats.pixel_amin),
        pixel_amax=move(stats.pixel_amax),
    )


def _observers(layer_obs: dict[str, ActObserver], qkv: dict[str, dict[str, object]]) -> list[ActObserver]:
    """Every activation observer of one pass, in a fixed order (the same in every process)."""
    out = list(layer_obs.values())
    for o in qkv.values():
        out += [o["q"], o["k"].rest, o["k"].bos, o["v"]]
    return out


def _reduce_statistics(table: _SlotTable, observers: list[ActObserver], probs: list[ProbsMaxObserver]) -> None:
    """Merge the statistics of every process into each (``dgq.distributed``): min of the minima, max of
    the maxima, sum of the sample counts. Exact, so the result is what one process that ran every batch
    would hold. A no-op for one process."""
    if distributed.current().world == 1:
        return
    distributed.agree(table.values, "timesteps")
    entries = [(obs, slot) for obs in observers for slot in sorted(obs.stats)]
    distributed.agree(
        [
            (obs.site, slot, st.ndim, st.channel_amin.numel(), None if st.pixel_amin is None else st.pixel_amin.numel())
            for obs, slot in entries
            for st in [obs.stats[slot]]
        ],
        "sites or shapes",
    )
    fields = [("channel_amin", "min"), ("pixel_amin", "min"), ("channel_amax", "max"), ("pixel_amax", "max")]
    for name, op in fields:
        held = [(obs.stats[slot], getattr(obs.stats[slot], name)) for obs, slot in entries]
        held = [(st, t) for st, t in held if t is not None]
        for (st, _), merged in zip(held, distributed.all_reduce([t for _, t in held], op), strict=True):
            setattr(st, name, merged)
    counts = distributed.all_reduce([torch.tensor([obs.stats[slot].samples]) for obs, slot in entries], "sum")
    for (obs, slot), n in zip(entries, counts, strict=True):
        obs.stats[slot].samples = int(n)
    n_slots = len(table.values)
    for key in ("max_all", "max_no_bos"):
        # float(amax) of float32 data: exactly representable in float64, so the max is exact
        values = distributed.all_reduce(
            [torch.tensor([getattr(p, key)[s] for s in range(n_slots)], dtype=torch.float64) for p in probs], "max"
        )
        for p, v in zip(probs, values, strict=True):
            setattr(p, key, {s: float(v[s]) for s in range(n_slots)})


def _make_observers(unet: torch.nn.Module, observer: type) -> tuple[list, list, dict, dict]:
    """``(layers, attns, layer observers, q/k/v observers)`` of every Conv2d/Linear input and attention
    block of ``unet``, each an ``observer(layout, site)`` (keys through :class:`KeyObserver`)."""
    everything = QuantConfig(keep_float=())
    layers, attns = layer_sites(unet, everything), attention_sites(unet, everything)
    layer_obs = {s.name: observer(s.kind, s.name) for s in layers}
    qkv = {
        a.name: {
            "q": observer(QKV, f"{a.name} q"),
            "k": KeyObserver(f"{a.name} k", observer),
            "v": observer(QKV, f"{a.name} v"),
        }
        for a in attns
    }
    return layers, attns, layer_obs, qkv


@contextlib.contextmanager
def _observing(unet: torch.nn.Module, ctx: StepContext, layer_obs: dict, qkv: dict, probs: dict | None = None):
    """``unet`` with its layer inputs and attention q/k/v (and probabilities) going through the
    observers, restored on exit. Yields ``{"site": ...}``, the last layer entered."""
    where = {"site": None}

    def hook(obs):
        def observe(module, args):
            where["site"] = obs.site
            return (obs(args[0], ctx.current()),)

        return observe

    hooks = [unet.get_submodule(name).register_forward_pre_hook(hook(obs)) for name, obs in layer_obs.items()]
    original = dict(unet.attn_processors)
    procs = dict(original)
    for name, o in qkv.items():
        procs[f"{name}.processor"] = DGQAttnProcessor(
            ctx, q=o["q"], k=o["k"], v=o["v"], probs=None if probs is None else probs[name]
        )
    unet.set_attn_processor(procs)
    try:
        yield where
    finally:
        for h in hooks:
            h.remove()
        unet.set_attn_processor(original)


@dataclass
class CalibrationStats:
    """Everything one float calibration pass observed, for every Conv2d/Linear and attention block.

    Recipes for any config (method, baselines, ablations, bit widths) are built from it without
    running the pipeline again (``build_recipe``): search and apply are separate.
    """

    model: dict[str, str]
    slots: list[float]
    layers: dict[str, tuple[str, dict[int, AxisStats]]]  # layer name -> (kind, per-slot input stats)
    qkv: dict[str, dict[str, object]]  # attention name -> {"q": ActObserver, "k": KeyObserver, "v": ActObserver}
    probs: dict[str, ProbsMaxObserver]
    meta: dict


def collect_statistics(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    num_inference_steps: int = 25,
    guidance_scale: float = DEFAULT_GUIDANCE,
    size: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> CalibrationStats:
    """Run the float pipeline on ``prompts`` and stream the statistics of every site.

    Each prompt ``i`` gets noise seed ``seed + i``; ``batch_size`` prompts run per pipeline call. The
    statistics are gathered on the float model (the reference code gathers them with upstream layers
    already quantized, which ties statistics to one config; see the README). The pipeline is restored
    when this returns or raises.
    """
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    if num_inference_steps < 1 or batch_size < 1:  # 0 steps would calibrate no slot, 0 prompts per call loop
        raise ValueError(f"steps and batch size must be >= 1, got {num_inference_steps} and {batch_size}")
    unet = pipe.unet
    size = int(unet.config.sample_size) * int(pipe.vae_scale_factor) if size is None else size
    if size <= 0 or size % int(pipe.vae_scale_factor):
        raise ValueError(f"size {size} must be a positive multiple of the VAE scale factor {pipe.vae_scale_factor}")
    t0 = time.perf_counter()
    ctx = StepContext()
    table = _SlotTable()
    layers, attns, layer_obs, qkv = _make_observers(unet, ActObserver)
    probs = {a.name: ProbsMaxObserver(a.is_cross) for a in attns}
    param = next(unet.parameters())
    slot = slot_hook(unet, ctx, table)
    try:
        with _observing(unet, ctx, layer_obs, qkv, probs) as where:
            _run_prompts(
                pipe,
                prompts,
                num_inference_steps,
                guidance_scale,
                size,
                seed,
                batch_size,
                progress,
                "calibration batches",
            )
    except _NonFinite as err:
        t = table.values[err.slot]
        raise CalibrationError(
            f"{err.site}: NaN or Inf in its input at timestep {t:g} (step {err.slot + 1} of {num_inference_steps}); "
            f"the {str(param.dtype).removeprefix('torch.')} model overflows there"
            + (" (float16's range is small: --dtype bfloat16 or float32)" if param.dtype == torch.float16 else "")
            + "; nothing was written"
        ) from None
    except (MemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        raise CalibrationError(
            f"out of memory on {param.device} after entering {where['site'] or 'no UNet layer yet'} "
            f"({batch_size} prompts per call at {size} px): fewer prompts per call (--batch-size), "
            "--dtype float16/bfloat16 on a GPU, or a smaller --size; nothing was written"
        ) from err
    finally:
        slot.remove()
    observers = _observers(layer_obs, qkv)
    for obs in observers:  # the statistics live on the CPU from here (the search and the recipe do)
        obs.stats = {slot: _cpu(st) for slot, st in obs.stats.items()}
    _reduce_statistics(table, observers, list(probs.values()))
    log.info(
        "collected statistics of %d layers and %d attention blocks over %d timestep slots in %.1f s",
        len(layers),
        len(attns),
        len(table.values),
        time.perf_counter() - t0,
    )
    meta = {
        "prompts": len(prompts),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "size": size,
        "seed": seed,
        "scheduler": type(pipe.scheduler).__name__,
        **describe(param.device, param.dtype),
        "versions": {
            "torch": torch.__version__.split("+")[0],
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
    }
    return CalibrationStats(
        model_identity(unet),
        list(table.values),
        {s.name: (s.kind, layer_obs[s.name].stats) for s in layers},
        qkv,
        probs,
        meta,
    )


def statistics_bytes(stats: CalibrationStats) -> int:
    """Bytes of the activation statistics ``stats`` holds (float32 min/max vectors per site and slot,
    two maxima per attention block and slot)."""
    held = sum(st.nbytes for _, per_slot in stats.layers.values() for st in per_slot.values())
    for o in stats.qkv.values():
        for obs in (o["q"], o["k"].rest, o["k"].bos, o["v"]):
            held += sum(st.nbytes for st in obs.stats.values())
    return held + 16 * len(stats.probs) * len(stats.slots)


class _ShapeObserver:
    """Counts the float32 elements an :class:`ActObserver` would keep for its input, from the shape."""

    def __init__(self, layout: str, site: str = "") -> None:
        self.layout = "conv" if layout == CONV else "linear"
        self.site = site
        self.elements = 0

    def __call__(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        c, n = axis_lengths(tuple(x.shape), self.layout)
        self.elements = 2 * (c + (n or 0))
        return x


def statistics_footprint(unet: torch.nn.Module, latent_size: int, text_tokens: int = 77) -> dict[str, int]:
    """What :func:`collect_statistics` keeps per timestep slot for ``unet`` at ``latent_size``, from one
    UNet call's shapes: ``{"bytes_per_slot", "sites"}``. ``unet`` may live on the ``meta`` device (no
    weights, no compute: the arithmetic for models that do not fit), and the result is exact: the same
    hooks and attention processor as calibration, counting instead of observing. Multiply by the number
    of steps for a calibration's total; it does not depend on the number of prompts."""
    cfg = unet.config
    ctx = StepContext()
    ctx.slot = 0
    layers, attns, layer_obs, qkv = _make_observers(unet, _ShapeObserver)
    param = next(unet.parameters())
    kw = dict(device=param.device, dtype=param.dtype)
    extra = {}
    if getattr(cfg, "addition_embed_type", None) == "text_time":  # SDXL: pooled text and size conditioning
        n_time = 6
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(
                1, cfg.projection_class_embeddings_input_dim - n_time * cfg.addition_time_embed_dim, **kw
            ),
            "time_ids": torch.zeros(1, n_time, **kw),
        }
    with _observing(unet, ctx, layer_obs, qkv), torch.inference_mode():
        unet(
            torch.zeros(1, cfg.in_channels, latent_size, latent_size, **kw),
            torch.tensor(1, device=param.device),
            encoder_hidden_states=torch.zeros(1, text_tokens, cfg.cross_attention_dim, **kw),
            **extra,
        )
    elements = sum(o.elements for o in _observers(layer_obs, qkv))
    return {"bytes_per_slot": 4 * elements + 16 * len(attns), "sites": len(layers) + 3 * len(attns)}


def build_recipe(stats: CalibrationStats, unet: torch.nn.Module, config: QuantConfig, progress: bool = True) -> Recipe:
    """The DGQ search (docs/method.md, sections 4-6) for ``config`` on collected statistics; weights from ``unet``.

    Under several processes (``dgq.distributed``, on merged statistics) the sites are shared out and
    every process returns the whole recipe, the one a single process builds."""
    if model_identity(unet) != stats.model:
        raise ValueError("these statistics were collected on another model")
    n_slots = len(stats.slots)
    recipe = Recipe(config=config, model=stats.model, slots=list(stats.slots), meta=dict(stats.meta))
    layers = layer_sites(unet, config)
    jobs = [(s.input_key, s.kind, stats.layers[s.name][1]) for s in layers]
    for a in attention_sites(unet, config):
        if config.quantize_qkv:
            o = stats.qkv[a.name]
            k_stats = o["k"].rest.stats if (a.is_cross and config.bos_fp) else o["k"].with_bos()
            jobs += [(a.key("q"), QKV, o["q"].stats), (a.key("k"), QKV, k_stats), (a.key("v"), QKV, o["v"].stats)]
        if config.attn_probs != "float":
            static = None
            if config.attn_scale == "static":
                obs = stats.probs[a.name]
                per_slot = obs.max_no_bos if (a.is_cross and config.bos_fp) else obs.max_all
                values = [per_slot[s] for s in range(n_slots)]
                static = torch.tensor(values if config.time_aware else [max(values)], dtype=torch.float32)
            recipe.probs[a.key("probs")] = ProbsQuant(static)
    # Under several processes each searches its share of the sites and every one gets all results.
    acts = distributed.map_shared(
        jobs, lambda job: build_act_quant(job[1], job[2], n_slots, config), "group search", progress
    )
    recipe.acts.update({key: act for (key, _, _), act in zip(jobs, acts, strict=True)})
    weights = distributed.map_shared(
        layers, lambda s: layer_weight_quant(unet, s, recipe.acts.get(s.input_key), config), "weights", progress
    )
    recipe.weights.update({s.name: w for s, w in zip(layers, weights, strict=True)})
    return recipe


def layer_weight_quant(unet: torch.nn.Module, site, act: ActQuant | None, config: QuantConfig) -> WeightQuant:
    """The weight parameters of one quantized layer: of its weight, or, when its input is folded
    (``config.folds_linear``, ``config.folds_conv``), of the weight with the fold's scale in its input
    columns."""
    w = unet.get_submodule(site.name).weight
    conv = site.kind == CONV
    fold = site_fold(act, config, conv)
    if fold is not None:  # the folded input's scale lives in the columns
        w = w.detach().float() * along(fold.scale.to(w.device), w.ndim, 1)
    return weight_quant(w, site.kind, config)


OUTPUT_SCALE_FLOOR = 1e-6  # an output channel that is always 0 keeps a finite scale


class _OutputObserver:
    """Running (min, max) per (slot, branch, output channel) of one conv's bias-free branch outputs."""

    def __init__(self, n_slots: int, k: int, channels: int) -> None:
        self.lo = torch.full((n_slots, k, channels), float("inf"))
        self.hi = torch.full((n_slots, k, channels), float("-inf"))
        self.seen = torch.zeros(n_slots, k, dtype=torch.bool)

    def __call__(self, branch: int, y: torch.Tensor, slot: int) -> None:
        y = y.detach().float()
        self.lo[slot, branch] = torch.minimum(self.lo[slot, branch], y.amin((0, 2, 3)).cpu())
        self.hi[slot, branch] = torch.maximum(self.hi[slot, branch], y.amax((0, 2, 3)).cpu())
        self.seen[slot, branch] = True

    def output_quant(self, normalize: bool) -> OutputQuant:
        """Per (slot, branch) ranges of the branch outputs, each divided by a per-output-channel scale
        (the largest magnitude that channel reached in any slot and branch) when ``normalize``."""
        lo, hi = self.lo.clone(), self.hi.clone()
        unseen = ~self.seen
        lo[unseen], hi[unseen] = 0.0, 0.0  # a branch with no channels of this group (never called)
        scale = None
        if normalize:
            scale = torch.maximum(lo.abs(), hi.abs()).amax((0, 1)).clamp_min(OUTPUT_SCALE_FLOOR)
            lo, hi = lo / scale, hi / scale
        return OutputQuant(torch.stack([lo.amin(2), hi.amax(2)], -1), scale)


def calibrate_outputs(
    pipe: DiffusionPipeline,
    recipe: Recipe,
    prompts: Sequence[str],
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    size: int | None = None,
    seed: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> Recipe:
    """``onnxruntime`` profile: the per-step output range of every quantized conv branch.

    ONNX Runtime's QLinearConv writes a quantized output, so the graph quantizes each branch's
    bias-free conv output; its range is observed here on the quantized model (inputs and weights as
    the recipe says) running the pipeline on ``prompts``. Sampling settings default to the
    recipe's calibration settings. Returns a copy of ``recipe`` with ``outputs`` set.
    """
    if recipe.config.profile != "onnxruntime":
        raise ValueError(f"output ranges belong to the onnxruntime profile, not {recipe.config.profile!r}")
    if not prompts:
        raise ValueError("output calibration needs at least one prompt")
    meta = recipe.meta
    steps = num_inference_steps or int(meta.get("num_inference_steps", 25))
    guidance = guidance_scale if guidance_scale is not None else float(meta.get("guidance_scale", DEFAULT_GUIDANCE))
    size = size or meta.get("size") or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    seed = int(meta.get("seed", 0)) if seed is None else seed
    t0 = time.perf_counter()
    input_keys = {s.name: s.input_key for s in layer_sites(pipe.unet, recipe.config)}
    observers: dict[str, _OutputObserver] = {}

    def observe(name: str, groups: int) -> _OutputObserver:
        act = recipe.acts[input_keys[name]]
        channels = pipe.unet.get_submodule(name).out_channels
        observers[name] = _OutputObserver(len(act.axis), groups, channels)
        return observers[name]

    handle = apply_recipe(pipe.unet, dataclasses.replace(recipe, outputs={}), observe_outputs=observe)
    try:
        _run_prompts(pipe, prompts, steps, guidance, size, seed, batch_size, progress, "output calibration batches")
    finally:
        handle.remove()
    out = dataclasses.replace(
        recipe,
        slots=list(recipe.slots),
        acts=dict(recipe.acts),
        probs=dict(recipe.probs),
        weights=dict(recipe.weights),
        outputs={},
        meta=dict(recipe.meta),
    )
    names = sorted(observers)
    distributed.agree(names, "output sites")
    for attr, op in (("lo", "min"), ("hi", "max")):
        merged = distributed.all_reduce([getattr(observers[n], attr) for n in names], op)
        for n, t in zip(names, merged, strict=True):
            setattr(observers[n], attr, t)
    seen = distributed.all_reduce([observers[n].seen.to(torch.uint8) for n in names], "max")
    for n, t in zip(names, seen, strict=True):
        observers[n].seen = t.bool()
    for name, obs in observers.items():
        if not obs.seen.any(dim=1).all():
            raise RuntimeError(f"{name}: no output observed in some timestep slots; generate with the calibrated steps")
        out.outputs[name] = obs.output_quant(normalize=recipe.config.normalizes_outputs)
    out.meta["output_calibration"] = {"prompts": len(prompts)}
    log.info("observed the outputs of %d convs in %.1f s", len(observers), time.perf_counter() - t0)
    return out


def calibrate(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    config: QuantConfig,
    num_inference_steps: int = 25,
    guidance_scale: float = DEFAULT_GUIDANCE,
    size: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> Recipe:
    """Calibrate ``pipe.unet`` with DGQ on ``prompts``: :func:`collect_statistics` then :func:`build_recipe`.

    Runs where ``pipe`` is (``dgq.device.place``); the recipe is on the CPU, in float32. Under several
    processes (``torchrun`` / ``accelerate launch``, ``dgq.distributed``) each runs its share of the
    prompt batches and of the searched sites, the statistics merge exactly, and every process returns
    the recipe one process would."""
    t0 = time.perf_counter()
    stats = collect_statistics(pipe, prompts, num_inference_steps, guidance_scale, size, seed, batch_size, progress)
    recipe = build_recipe(stats, pipe.unet, config, progress)  # merged statistics: the processes share the search
    if config.profile == "onnxruntime":
        recipe = calibrate_outputs(
            pipe, recipe, prompts, num_inference_steps, guidance_scale, size, seed, batch_size, progress
        )
    log.info("calibration finished in %.1f s", time.perf_counter() - t0)
    return recipe


def with_bits(recipe: Recipe, unet: torch.nn.Module, wbits: int, abits: int, progress: bool = False) -> Recipe:
    """``recipe`` at other bit widths without repeating the group search.

    Groups and activation ranges do not depend on the bit width (min/max statistics); only the
    weight parameters (their MSE search) do, so those are recomputed.
    """
    if recipe.outputs:
        raise ValueError(
            "an onnxruntime-profile recipe's output ranges depend on the bit widths; "
            "use build_recipe + calibrate_outputs for other bits"
        )
    config = recipe.config.replace(wbits=wbits, abits=abits)
    before = [s.name for s in layer_sites(unet, recipe.config)]
    after = [s.name for s in layer_sites(unet, config)]
    if before != after:
        changed = sorted(set(before) ^ set(after))
        raise ValueError(
            f"at W{wbits}A{abits} the speed rule picks other layers than at W{recipe.config.wbits}"
            f"A{recipe.config.abits} ({len(changed)} differ, e.g. {changed[0]}; convs run as branches have "
            "a higher threshold): build the recipe from the statistics at these bits (build_recipe)"
        )
    out = Recipe(
        config=config,
        model=recipe.model,
        slots=list(recipe.slots),
        acts=dict(recipe.acts),
        probs=dict(recipe.probs),
        meta=dict(recipe.meta),
    )
    sites = {s.name: s for s in layer_sites(unet, config)}
    for name in tqdm(recipe.weights, desc="weights", disable=not progress):
        site = sites[name]
        out.weights[name] = layer_weight_quant(unet, site, recipe.acts.get(site.input_key), config)
    return out
