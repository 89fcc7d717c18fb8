"""The PyTorch simulator: a recipe applied to an unmodified diffusers UNet.

Conv2d/Linear layers are swapped for :class:`QuantLayer` (fake-quantized input and weight), attention
blocks get a :class:`~dgq.attention.DGQAttnProcessor`, and a UNet forward pre-hook selects the
timestep slot. Every formula comes from ``dgq.quant``; every exported graph has this as its
bit-level reference.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from dgq.attention import DGQAttnProcessor, StepContext
from dgq.plan import ActPlan, LayerPlan, ProbsPlan, QuantPlan, build_plan
from dgq.quant import CHANNEL, along, axis_dim, fake_log2_quantize, fake_quantize_affine, quant_view
from dgq.recipe import Recipe, RecipeError
from dgq.sites import set_module

log = logging.getLogger(__name__)


def timestep_value(args: tuple, kwargs: dict) -> float:
    """The timestep of a UNet call (second positional argument or ``timestep=``), one value per call."""
    t = kwargs["timestep"] if "timestep" in kwargs else args[1]
    t = torch.as_tensor(t).flatten()
    if t.numel() > 1 and not bool((t == t[0]).all()):
        raise ValueError("DGQ needs one timestep per UNet call; got a batch of different timesteps")
    return float(t[0])


# ---------------------------------------------------------------------------- quantizers


class ActFakeQuant:
    """Fake quantizer of one activation site (its :class:`~dgq.plan.ActPlan`); ``__call__(x, slot)``.

    Layouts: ``conv`` ``(B, C, H, W)``, ``linear`` ``(B, N, C)`` or ``(B, C)``, ``qkv``
    ``(B*heads, N, d)``; the per-element parameters run along ``dgq.plan.axis_dim`` of the view.
    """

    def __init__(self, plan: ActPlan) -> None:
        self.plan = plan
        self.layout = plan.layout

    def __call__(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        sp = self.plan.slot(slot)
        if self.plan.unit_domain:
            return self._unit_domain(x, sp, slot)
        if self.plan.fold is not None:  # quantized in the normalized domain; the layer carries the fold
            x = self.plan.fold.normalize(x.float(), 1 if self.layout == "conv" else -1)
        shape = x.shape
        v = quant_view(x, self.layout, sp.axis)
        dim = axis_dim(self.layout, sp.axis, v.ndim)
        g = sp.element_grid
        x_hat = fake_quantize_affine(v, g.scale, g.zero_point, g.qmin, g.qmax, axis=dim)
        if sp.outlier_mask is not None:
            o = sp.outlier_element_grid
            kept = v if o is None else fake_quantize_affine(v, o.scale, o.zero_point, o.qmin, o.qmax, axis=dim)
            x_hat = torch.where(along(sp.outlier_mask, v.ndim, dim), kept, x_hat)
        return x_hat.reshape(shape)

    def _unit_domain(self, x: torch.Tensor, sp, slot: int) -> torch.Tensor:
        """A folded ``tensorrt`` site, op for op as its graph: ``clamp(round(x * m[slot])) * s[slot]``
        on the folded channels; the outlier channels as ``plan_act`` keeps them."""
        p = self.plan
        i = slot if p.n_slots > 1 else 0
        dim = axis_dim(self.layout, CHANNEL, x.ndim)
        x = x.float()
        g = sp.grid
        q = torch.clamp(torch.round(x * along(p.unit_multiplier[i], x.ndim, dim)), g.qmin, g.qmax)
        x_hat = q * p.unit_scale[i]
        if sp.outlier_mask is not None:
            o = sp.outlier
            kept = (
                x
                if o is None
                else fake_quantize_affine(x, o.scale.reshape(()), o.zero_point.reshape(()), o.qmin, o.qmax)
            )
            x_hat = torch.where(along(sp.outlier_mask, x.ndim, dim), kept, x_hat)
        return x_hat


class ProbsFakeQuant:
    """Attention probabilities: log2 (or uniform) with a real-time max per prompt or per batch, or a
    static calibrated max; ``__call__(probs, slot, heads)`` on ``(B*heads, N, M)``."""

    def __init__(self, plan: ProbsPlan) -> None:
        self.kind, self.mode, self.bits = plan.kind, plan.mode, plan.bits
        self.static_max = plan.static_max

    def scale(self, p: torch.Tensor, slot: int, heads: int) -> torch.Tensor:
        if self.mode == "static":
            s = self.static_max[slot if self.static_max.numel() > 1 else 0]
        elif self.mode == "batch":
            s = p.amax()
        else:  # per prompt: one max per batch item over its heads (rows b*heads .. b*heads + heads - 1)
            s = p.amax((1, 2)).view(-1, heads).amax(1, keepdim=True)
            # each prompt's max on its heads' rows; "+ zeros" broadcasts exactly and traces as one Add
            s = (s + torch.zeros(1, heads, dtype=s.dtype, device=s.device)).view(-1, 1, 1)
        return torch.clamp_min(s, torch.finfo(torch.float32).tiny)

    def __call__(self, p: torch.Tensor, slot: int, heads: int) -> torch.Tensor:
        s = self.scale(p, slot, heads)
        if self.kind == "log2":
            return fake_log2_quantize(p, s, self.bits)
        qmax = 2**self.bits - 1
        return fake_quantize_affine(p / s, 1.0 / qmax, 0, 0, qmax) * s


# ---------------------------------------------------------------------------- modules


class _SwappedLayer(torch.nn.Module):
    """A module swapped in for a Conv2d or Linear (``self.inner``) that still answers for it:
    ``in_features``, ``out_channels``, ``weight`` ... come from the float layer, as diffusers reads
    them (SDXL's pipeline checks ``unet.add_embedding.linear_1.in_features``)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(super().__getattr__("inner"), name)


class QuantLayer(_SwappedLayer):
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
        # a folded input (act returns the normalized tensor): the fold's centre lives in the bias
        fold = None if act is None else act.plan.fold
        fold_bias = None if fold is None else fold.bias(inner.weight, inner.bias).to(inner.weight.dtype)
        self.register_buffer("fold_bias", fold_bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x, self.ctx.current()).to(x.dtype)
        m = self.inner
        bias = m.bias if self.fold_bias is None else self.fold_bias
        if isinstance(m, torch.nn.Conv2d):
            return F.conv2d(x, self.weight_hat, bias, m.stride, m.padding, m.dilation, m.groups)
        if self.matmul:
            y = torch.matmul(x, self.weight_hat)
            return y if bias is None else y + bias
        return F.linear(x, self.weight_hat, bias)


class BranchConvLayer(_SwappedLayer):
    """``onnxruntime``-profile Conv2d: one branch per input-channel group (``ActPlan.branches``),
    each a whole QLinearConv unit, summed, then the float bias.

    Branch g: the group's channels -> per-step uint8 Q/DQ of the group's range -> conv with the
    matching input slice of the fake-quantized weight -> per-step uint8 Q/DQ of the branch's own
    output range (``LayerPlan.output``). A layer-wise site is one branch over every channel. With
    ``observe`` set and no output plan, each branch's bias-free output is passed to
    ``observe(group, y, slot)`` instead of being quantized (the output calibration pass).
    """

    def __init__(
        self,
        plan: LayerPlan,
        inner: torch.nn.Conv2d,
        weight_hat: torch.Tensor,
        ctx: StepContext,
        observe=None,
    ):
        super().__init__()
        self.name, self.inner, self.ctx, self.observe = plan.name, inner, ctx, observe
        self.branches = plan.input.branches(inner.in_channels)
        self.whole = len(self.branches) == 1
        # A folded input (no centre) is one branch on x * (1 / fold.scale) (dgq.plan.Fold.inverse).
        self.fold = plan.input.fold
        if self.fold is not None and (self.fold.centred or not self.whole):
            raise RecipeError(f"{plan.name}: a folded conv input is one branch with no centre")
        inverse = None if self.fold is None else self.fold.inverse.view(1, -1, 1, 1)
        self.register_buffer("fold_inverse", inverse, persistent=False)
        self.n_slots = plan.input.n_slots
        self.weights = [weight_hat[:, b.index].contiguous() for b in self.branches]
        self.out = plan.output
        scale = None if self.out is None or self.out.channel_scale is None else self.out.channel_scale.view(1, -1, 1, 1)
        self.register_buffer("out_channel_scale", scale, persistent=False)
        if self.out is None and observe is None:
            raise RecipeError(f"{plan.name}: no output ranges to quantize with and nothing to observe them")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.ctx.current()
        si = slot if self.n_slots > 1 else 0
        m = self.inner
        dtype, x = x.dtype, x.float()
        out = None
        for b, w in zip(self.branches, self.weights, strict=True):
            xg = x if self.whole else torch.index_select(x, 1, b.index)
            if self.fold_inverse is not None:
                xg = xg * self.fold_inverse
            xg = fake_quantize_affine(xg, b.scale[si], b.zero_point[si], b.qmin, b.qmax)
            y = F.conv2d(xg, w, None, m.stride, m.padding, m.dilation, m.groups)
            if self.out is None:
                self.observe(b.group, y, si)
            else:
                o = self.out
                y = fake_quantize_affine(y, o.scale[si, b.group], o.zero_point[si, b.group], o.qmin, o.qmax)
            out = y if out is None else out + y
        if self.out_channel_scale is not None:
            out = out * self.out_channel_scale  # the branches' outputs were normalized
        if m.bias is not None:
            out = out + m.bias.detach().float().view(1, -1, 1, 1)
        return out.to(dtype)


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


def _swap_layers(unet: torch.nn.Module, plan: QuantPlan, ctx: StepContext, handle: SimulationHandle, observe_outputs):
    for name, lp in plan.layers.items():
        module = unet.get_submodule(name)
        w = module.weight.detach().float()
        weight_hat = w if lp.weight is None else lp.weight.fake(w)
        handle.swapped[name] = module
        if lp.branch_outputs:
            # one output range per input group, as plan_output expects (one for a folded input)
            groups = lp.input.slots[0].k
            observe = None if lp.output is not None or observe_outputs is None else observe_outputs(name, groups)
            new = BranchConvLayer(lp, module, weight_hat, ctx, observe)
        else:
            act = None if lp.input is None else ActFakeQuant(lp.input)
            new = QuantLayer(module, weight_hat, act, ctx, matmul=lp.matmul)
        set_module(unet, name, new)


def _set_processors(unet: torch.nn.Module, plan: QuantPlan, ctx: StepContext, handle: SimulationHandle) -> None:
    handle.processors = dict(unet.attn_processors)
    new = dict(handle.processors)
    for name, ap in plan.attention.items():

        def act(p: ActPlan | None) -> ActFakeQuant | None:
            return None if p is None else ActFakeQuant(p)

        new[f"{name}.processor"] = DGQAttnProcessor(
            ctx,
            q=act(ap.q),
            k=act(ap.k),
            v=act(ap.v),
            probs=None if ap.probs is None else ProbsFakeQuant(ap.probs),
            keep_bos=ap.keep_bos,
        )
    unet.set_attn_processor(new)


def apply_recipe(
    unet: torch.nn.Module, recipe: Recipe, check_model: bool = True, observe_outputs=None
) -> SimulationHandle:
    """Quantize ``unet`` in place as ``recipe`` says. Returns a handle whose ``remove()`` undoes it.

    The whole recipe is planned (and validated) before the UNet is touched, and any failure while
    applying it restores the float UNet. ``observe_outputs(layer_name, groups) -> callable(group, y,
    slot)``: the output calibration pass of the ``onnxruntime`` profile (conv outputs are observed
    instead of quantized where the recipe has no range for them; ``groups``: how many output ranges
    the layer's plan has per slot)."""
    if check_model:
        recipe.check_model(unet)
    recipe = recipe.to(next(unet.parameters()).device)
    plan = build_plan(unet, recipe, output_required=observe_outputs is None)
    ctx = StepContext()
    handle = SimulationHandle(unet)
    try:
        handle.hooks.append(slot_hook(unet, ctx, recipe.slot_of))
        _swap_layers(unet, plan, ctx, handle, observe_outputs)
        _set_processors(unet, plan, ctx, handle)
    except BaseException:
        handle.remove()
        raise
    return handle


def simulate(pipe: DiffusionPipeline, recipe: Recipe) -> DiffusionPipeline:
    """A pipeline of the same class whose UNet is a quantized copy; ``pipe`` is left untouched."""
    unet = copy.deepcopy(pipe.unet)
    apply_recipe(unet, recipe)
    qpipe = type(pipe)(**{**pipe.components, "unet": unet})
    qpipe.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return qpipe
