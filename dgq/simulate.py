"""The PyTorch simulator: a recipe applied to an unmodified diffusers UNet.

Conv2d/Linear layers are swapped for :class:`QuantLayer` (fake-quantized input and weight), attention
blocks get a :class:`~dgq.attention.DGQAttnProcessor`, and a UNet forward pre-hook selects the
timestep slot. Every formula comes from ``dgq.quant``; every exported graph has this as its
bit-level reference.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from dgq.attention import DGQAttnProcessor, StepContext
from dgq.config import QuantConfig
from dgq.quant import (
    CHANNEL,
    LAYER,
    PIXEL,
    affine_params_from_range,
    fake_log2_quantize,
    fake_quantize_affine,
    quant_range,
    symmetric_scale_from_absmax,
)
from dgq.recipe import (
    ActQuant,
    OutputQuant,
    ProbsQuant,
    Recipe,
    RecipeError,
    WeightQuant,
)
from dgq.sites import CONV, attention_sites, layer_sites, set_module

log = logging.getLogger(__name__)

FLOAT_BITS = 16  # outlier_bits == 16: the group stays in floating point


def timestep_value(args: tuple, kwargs: dict) -> float:
    """The timestep of a UNet call (second positional argument or ``timestep=``), one value per call."""
    t = kwargs["timestep"] if "timestep" in kwargs else args[1]
    t = torch.as_tensor(t).flatten()
    if t.numel() > 1 and not bool((t == t[0]).all()):
        raise ValueError("DGQ needs one timestep per UNet call; got a batch of different timesteps")
    return float(t[0])


# ---------------------------------------------------------------------------- parameters


def group_params(
    ranges: torch.Tensor, bits: int, config: QuantConfig, axis: str
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Per-group ``(scale, zero_point, qmin, qmax)`` from ``(K, 2)`` ranges under the config's profile."""
    lo, hi = ranges[:, 0], ranges[:, 1]
    if config.is_symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        qmin, qmax = quant_range(bits, signed=True)
        return symmetric_scale_from_absmax(amax, bits), torch.zeros_like(amax), qmin, qmax
    qmin, qmax = quant_range(bits, signed=False)
    # onnxruntime: every zero point on the uint8 grid (its kernels have no INT16 zero points)
    scale, zp = affine_params_from_range(lo, hi, bits, include_zero=axis == LAYER or config.profile == "onnxruntime")
    return scale, zp, qmin, qmax


@dataclass
class _SlotQuant:
    axis: str
    dim: int | None  # tensor dim the per-element scale runs along (None: per tensor)
    scale: torch.Tensor  # expanded per element of the axis (or one element)
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    # outlier group at other bits (tensorrt profile): a mask over the axis and its own params
    outlier_mask: torch.Tensor | None = None
    outlier: tuple | None = None  # (scale, zp, qmin, qmax) or None = float


class ActFakeQuant:
    """Fake quantizer of one activation site; ``__call__(x, slot)``.

    Layouts: ``conv`` ``(B, C, H, W)`` (channel dim 1, pixel = flattened ``H*W``); ``linear``
    ``(B, N, C)`` or ``(B, C)`` (channel last, pixel dim 1); ``qkv`` ``(B*heads, N, d)`` as linear.
    """

    def __init__(self, act: ActQuant, bits: int, config: QuantConfig) -> None:
        self.layout = act.layout
        self.slots = [self._prepare(act, s, bits, config) for s in range(len(act.axis))]

    def _prepare(self, act: ActQuant, s: int, bits: int, config: QuantConfig) -> _SlotQuant:
        axis, gi = act.axis[s], act.group_index[s]
        scale, zp, qmin, qmax = group_params(act.ranges[s], bits, config, axis)
        k = act.k(s)
        outlier_mask = outlier = None
        if config.profile == "tensorrt" and config.outlier_bits is not None and k > 1 and config.outlier_bits != bits:
            outlier_mask = gi == k - 1
            if config.outlier_bits != FLOAT_BITS:
                o = group_params(act.ranges[s][k - 1 :], config.outlier_bits, config, axis)
                outlier = (o[0][gi], o[1][gi], o[2], o[3])
        if axis == LAYER:
            return _SlotQuant(axis, None, scale.reshape(()), zp.reshape(()), qmin, qmax)
        dim = self._dim(axis)
        return _SlotQuant(axis, dim, scale[gi], zp[gi], qmin, qmax, outlier_mask, outlier)

    def _dim(self, axis: str) -> int:
        if self.layout == CONV:
            return 1 if axis == CHANNEL else 2  # pixel: on the (B, C, H*W) view
        return -1 if axis == CHANNEL else 1

    def __call__(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        q = self.slots[slot if len(self.slots) > 1 else 0]
        shape = x.shape
        if self.layout == CONV and q.axis == PIXEL:
            x = x.flatten(2)
        dim = None if q.dim is None else q.dim % x.ndim
        x_hat = fake_quantize_affine(x, q.scale, q.zero_point, q.qmin, q.qmax, axis=dim)
        if q.outlier_mask is not None:
            if q.outlier is None:
                kept = x
            else:
                kept = fake_quantize_affine(x, q.outlier[0], q.outlier[1], q.outlier[2], q.outlier[3], axis=dim)
            view = [1] * x.ndim
            view[dim] = -1
            x_hat = torch.where(q.outlier_mask.view(view), kept, x_hat)
        return x_hat.reshape(shape)


class ProbsFakeQuant:
    """Attention probabilities: log2 (or uniform) with a real-time max per prompt or per batch, or a
    static calibrated max; ``__call__(probs, slot, batch_size)`` on ``(B*heads, N, M)``."""

    def __init__(self, probs: ProbsQuant, config: QuantConfig) -> None:
        self.kind, self.mode, self.bits = config.attn_probs, config.attn_scale, config.abits
        self.static_max = probs.static_max

    def scale(self, p: torch.Tensor, slot: int, batch_size: int) -> torch.Tensor:
        if self.mode == "static":
            s = self.static_max[slot if self.static_max.numel() > 1 else 0]
        elif self.mode == "batch":
            s = p.amax()
        else:  # per prompt: one max per batch item over its heads
            s = p.reshape(batch_size, -1).amax(1).repeat_interleave(p.shape[0] // batch_size).view(-1, 1, 1)
        return torch.clamp_min(s, torch.finfo(torch.float32).tiny)

    def __call__(self, p: torch.Tensor, slot: int, batch_size: int) -> torch.Tensor:
        s = self.scale(p, slot, batch_size)
        if self.kind == "log2":
            return fake_log2_quantize(p, s, self.bits)
        qmax = 2**self.bits - 1
        return fake_quantize_affine(p / s, 1.0 / qmax, 0, 0, qmax) * s


def fake_quantize_weight(weight: torch.Tensor, wq: WeightQuant) -> torch.Tensor:
    """The layer's weight after its Q/DQ (float32, same shape)."""
    qmin, qmax = quant_range(wq.bits, signed=wq.symmetric)
    if wq.granularity == "tensor":
        return fake_quantize_affine(weight, wq.scale, wq.zero_point, qmin, qmax)
    if wq.granularity == "block":
        return fake_quantize_affine(weight, wq.scale, wq.zero_point, qmin, qmax, axis=1, block_size=wq.block)
    return fake_quantize_affine(weight, wq.scale, wq.zero_point, qmin, qmax, axis=0)


# ---------------------------------------------------------------------------- modules


class QuantLayer(torch.nn.Module):
    """A Conv2d or Linear with a fake-quantized input and weight (the module-swap seam)."""

    def __init__(
        self,
        inner: torch.nn.Module,
        weight_hat: torch.Tensor,
        act: ActFakeQuant | None,
        ctx: StepContext,
        matmul: bool = False,
    ):
        super().__init__()
        self.inner = inner
        # matmul (onnxruntime profile Linear): x @ W^T + b as MatMul and Add, the exported graph's ops
        self.matmul = matmul and not isinstance(inner, torch.nn.Conv2d)
        w = weight_hat.to(inner.weight.dtype)
        self.register_buffer("weight_hat", w.t().contiguous() if self.matmul else w, persistent=False)
        self.act, self.ctx = act, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x, self.ctx.current()).to(x.dtype)
        m = self.inner
        if isinstance(m, torch.nn.Conv2d):
            return F.conv2d(x, self.weight_hat, m.bias, m.stride, m.padding, m.dilation, m.groups)
        if self.matmul:
            y = torch.matmul(x, self.weight_hat)
            return y if m.bias is None else y + m.bias
        return F.linear(x, self.weight_hat, m.bias)


OUTPUT_BITS = 8  # onnxruntime profile: QLinearConv writes uint8 whatever the activation bits


class BranchConvLayer(torch.nn.Module):
    """``onnxruntime``-profile Conv2d: one branch per input-channel group, each a whole
    QLinearConv unit, summed, then the float bias.

    Branch g: the group's channels -> per-step uint8 Q/DQ of the group's range -> conv with the
    matching input slice of the fake-quantized weight -> per-step uint8 Q/DQ of the branch's own
    output range (``OutputQuant``). A layer-wise site is one branch over every channel. With
    ``observe`` set and no output ranges, each branch's bias-free output is passed to
    ``observe(branch, y, slot)`` instead of being quantized (the output calibration pass).
    """

    def __init__(
        self,
        name: str,
        inner: torch.nn.Conv2d,
        weight_hat: torch.Tensor,
        act: ActQuant,
        bits: int,
        config: QuantConfig,
        out: OutputQuant | None,
        ctx: StepContext,
        observe=None,
    ):
        super().__init__()
        self.name, self.inner, self.ctx, self.observe = name, inner, ctx, observe
        gi = act.group_index[0]
        self.branches = branch_channels(act, inner.in_channels)
        self.whole = len(self.branches) == 1
        n = len(act.axis)
        k = act.k(0)
        scale, zp = torch.zeros(n, k), torch.zeros(n, k)
        for s in range(n):
            if not torch.equal(act.group_index[s], gi) or act.axis[s] != act.axis[0]:
                raise RecipeError(
                    f"{name}: group membership changes across steps; this layer needs an onnxruntime-profile recipe"
                )
            sc, z, self.qmin, self.qmax = group_params(act.ranges[s], bits, config, act.axis[s])
            scale[s], zp[s] = sc, z
        self.scale, self.zp = scale, zp
        self.weights = [weight_hat[:, idx].contiguous() for _, idx in self.branches]
        self.out = None
        if out is not None:
            if out.ranges.shape[:2] != (n, k):
                raise RecipeError(
                    f"{name}: output ranges of shape {tuple(out.ranges.shape)} do not match {n} slots x {k} groups"
                )
            params = [group_params(out.ranges[s], OUTPUT_BITS, config, LAYER) for s in range(n)]
            self.out = (
                torch.stack([p[0] for p in params]),
                torch.stack([p[1] for p in params]),
                params[0][2],
                params[0][3],
            )
        elif observe is None:
            raise RecipeError(
                f"{name}: the onnxruntime profile quantizes conv outputs and this recipe has no output "
                "ranges for it (calibrate with dgq.calibrate.calibrate, or add them with calibrate_outputs)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.ctx.current()
        si = slot if self.scale.shape[0] > 1 else 0
        m = self.inner
        dtype, x = x.dtype, x.float()
        out = None
        for j, (g, idx) in enumerate(self.branches):
            xg = x if self.whole else torch.index_select(x, 1, idx)
            xg = fake_quantize_affine(xg, self.scale[si, g], self.zp[si, g], self.qmin, self.qmax)
            y = F.conv2d(xg, self.weights[j], None, m.stride, m.padding, m.dilation, m.groups)
            if self.out is None:
                self.observe(g, y, si)
            else:
                oscale, ozp, qmin, qmax = self.out
                y = fake_quantize_affine(y, oscale[si, g], ozp[si, g], qmin, qmax)
            out = y if out is None else out + y
        if m.bias is not None:
            out = out + m.bias.detach().float().view(1, -1, 1, 1)
        return out.to(dtype)


def branch_channels(act: ActQuant, channels: int) -> list[tuple[int, torch.Tensor]]:
    """``[(group, channel indices)]`` of the non-empty input-channel groups of a conv site (one
    group of every channel for a layer-wise site)."""
    if act.axis[0] == LAYER:
        return [(0, torch.arange(channels))]
    gi = act.group_index[0]
    out = []
    for g in range(act.k(0)):
        idx = torch.nonzero(gi == g).flatten()
        if idx.numel():
            out.append((g, idx))
    return out


class SimulationHandle:
    """Undo record of :func:`apply_recipe`: ``remove()`` restores the float UNet."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.swapped: dict[str, torch.nn.Module] = {}
        self.processors: dict | None = None
        self.hooks: list = []

    def remove(self) -> None:
        for name, module in self.swapped.items():
            set_module(self.unet, name, module)
        if self.processors is not None:
            self.unet.set_attn_processor(self.processors)
        for h in self.hooks:
            h.remove()
        self.swapped.clear()
        self.hooks.clear()


def slot_hook(unet: torch.nn.Module, ctx: StepContext, slot_of) -> torch.utils.hooks.RemovableHandle:
    """Register the UNet pre-hook that sets ``ctx.slot = slot_of(timestep)`` before every call."""

    def hook(module, args, kwargs):
        ctx.slot = slot_of(timestep_value(args, kwargs))

    return unet.register_forward_pre_hook(hook, with_kwargs=True)


def _swap_layers(
    unet: torch.nn.Module, recipe: Recipe, ctx: StepContext, handle: SimulationHandle, observe_outputs
) -> None:
    config = recipe.config
    for site in layer_sites(unet, config):
        module = unet.get_submodule(site.name)
        wq = recipe.weights.get(site.name)
        weight_hat = (
            module.weight.detach().float() if wq is None else fake_quantize_weight(module.weight.detach().float(), wq)
        )
        act = recipe.acts.get(site.input_key)
        act_q = None if act is None else ActFakeQuant(act, config.abits, config)
        if wq is None and act_q is None:
            continue
        handle.swapped[site.name] = module
        if config.profile == "onnxruntime" and act is not None and isinstance(module, torch.nn.Conv2d):
            observe = None if observe_outputs is None or site.name in recipe.outputs else observe_outputs(site.name)
            new = BranchConvLayer(
                site.name, module, weight_hat, act, config.abits, config, recipe.outputs.get(site.name), ctx, observe
            )
        else:
            new = QuantLayer(module, weight_hat, act_q, ctx, matmul=config.profile == "onnxruntime")
        set_module(unet, site.name, new)


def apply_recipe(
    unet: torch.nn.Module, recipe: Recipe, check_model: bool = True, observe_outputs=None
) -> SimulationHandle:
    """Quantize ``unet`` in place as ``recipe`` says. Returns a handle whose ``remove()`` undoes it.

    ``observe_outputs(layer_name) -> callable(branch, y, slot)``: the output calibration pass of the
    ``onnxruntime`` profile (conv outputs are observed instead of quantized where the recipe has no
    range for them)."""
    if check_model:
        recipe.check_model(unet)
    config = recipe.config
    ctx = StepContext()
    handle = SimulationHandle(unet)
    handle.hooks.append(slot_hook(unet, ctx, recipe.slot_of))
    try:
        _swap_layers(unet, recipe, ctx, handle, observe_outputs)
    except Exception:
        handle.remove()
        raise
    handle.processors = dict(unet.attn_processors)
    new = dict(handle.processors)
    for site in attention_sites(unet, config):

        def act(role, site=site):
            a = recipe.acts.get(site.key(role))
            return None if a is None else ActFakeQuant(a, config.abits, config)

        probs = recipe.probs.get(site.key("probs"))
        new[f"{site.name}.processor"] = DGQAttnProcessor(
            ctx,
            q=act("q"),
            k=act("k"),
            v=act("v"),
            probs=None if probs is None else ProbsFakeQuant(probs, config),
            keep_bos=config.bos_fp,
        )
    unet.set_attn_processor(new)
    return handle


def simulate(pipe: DiffusionPipeline, recipe: Recipe) -> DiffusionPipeline:
    """A pipeline of the same class whose UNet is a quantized copy; ``pipe`` is left untouched."""
    unet = copy.deepcopy(pipe.unet)
    apply_recipe(unet, recipe)
    qpipe = type(pipe)(**{**pipe.components, "unet": unet})
    qpipe.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return qpipe
