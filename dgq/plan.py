"""The quantizer plan: every number a quantized UNet computes with, derived once from a recipe.

A recipe holds what calibration found (per site and timestep slot: the grouping axis, group
membership and group ranges; weight scales; conv output ranges for the ``onnxruntime`` profile).
The plan turns it into quantizer parameters under the profile's rules: per slot the integer grid,
a scale and zero point per group, the tensor dim they run along, the group kept apart at another
precision (``tensorrt``'s outlier group), and the input-channel branches of a layer whose grouping
is fixed across steps. The PyTorch simulator (``dgq.simulate``) and every export target
(``export.qdq``) read these objects and compute nothing of their own, so a rule changed here
changes both, and their bit-equality tests hold the lowering to the simulator.

Which tensor dim an axis is (``quant_view``/``axis_dim``) is defined once in ``dgq.quant.layout``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch

from dgq.config import QuantConfig
from dgq.quant import (
    CHANNEL,
    LAYER,
    PIXEL,
    affine_params_from_range,
    along,
    fake_quantize_affine,
    integer_range,
    quant_range,
    symmetric_scale_from_absmax,
)
from dgq.recipe import ActQuant, OutputQuant, ProbsQuant, Recipe, RecipeError, WeightQuant
from dgq.sites import CONV, attention_sites, layer_sites

FLOAT_BITS = 16  # outlier_bits == 16: the group stays in floating point
OUTPUT_BITS = 8  # onnxruntime profile: QLinearConv writes uint8 whatever the activation bits
# The grids of ONNX's 8-bit Q/DQ containers; a narrower grid (6 bits, say) is clipped into one.
INT8_GRID = quant_range(8, signed=True)
UINT8_GRID = quant_range(8, signed=False)
INT16_GRID = integer_range(torch.int16)  # the container of zero points off the 8-bit grid


# ---------------------------------------------------------------------------- quantizers


@dataclass(frozen=True)
class Grid:
    """Uniform quantizer parameters of K groups: ``scale``/``zero_point`` float32 ``(K,)`` (zero
    points integer valued) on the integer grid ``[qmin, qmax]``."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def bits(self) -> int:
        return (self.qmax - self.qmin + 1).bit_length() - 1

    @property
    def container(self) -> tuple[int, int]:
        """The 8-bit ONNX grid this quantizer's integers are stored on."""
        return INT8_GRID if self.signed else UINT8_GRID

    @property
    def narrower(self) -> bool:
        """Fewer levels than its 8-bit container (clipped to its own grid before the Q/DQ)."""
        return (self.qmin, self.qmax) != self.container

    def group(self, g: int) -> Grid:
        return Grid(self.scale[g : g + 1], self.zero_point[g : g + 1], self.qmin, self.qmax)


def act_grid(ranges: torch.Tensor, bits: int, config: QuantConfig, axis: str) -> Grid:
    """Per-group parameters from ``(K, 2)`` (min, max) ranges under the config's profile.

    Symmetric profiles (``tensorrt``, ``symmetric=True``): ``scale = amax / (2^(b-1)-1)`` on the
    signed grid. Otherwise asymmetric on the unsigned grid; a layer-wise range, and every range of
    the ``onnxruntime`` profile (its kernels have no 16-bit zero points), is widened to contain 0 so
    that the zero point lies on the grid.
    """
    lo, hi = ranges[:, 0].float(), ranges[:, 1].float()
    if config.is_symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return Grid(symmetric_scale_from_absmax(amax, bits), torch.zeros_like(amax), *quant_range(bits, signed=True))
    scale, zp = affine_params_from_range(lo, hi, bits, include_zero=axis == LAYER or config.profile == "onnxruntime")
    return Grid(scale, zp, *quant_range(bits, signed=False))


@dataclass
class SlotPlan:
    """One activation quantizer at one timestep slot.

    ``group_index``: int64 ``(n,)`` group of each element along ``axis`` (``(1,)`` for ``layer``);
    ``grid``: per group; ``outlier_group``: the group kept apart (``tensorrt``), quantized with
    ``outlier`` (its own grid) or, when ``outlier`` is None, left in floating point.
    """

    axis: str
    group_index: torch.Tensor
    grid: Grid
    outlier_group: int | None = None
    outlier: Grid | None = None

    @property
    def k(self) -> int:
        return int(self.grid.scale.numel())

    @functools.cached_property
    def element_grid(self) -> Grid:
        """The grid with one scale and zero point per element of the axis (one in all for ``layer``)."""
        if self.axis == LAYER:
            g = self.grid
            return Grid(g.scale.reshape(()), g.zero_point.reshape(()), g.qmin, g.qmax)
        gi = self.group_index
        return Grid(self.grid.scale[gi], self.grid.zero_point[gi], self.grid.qmin, self.grid.qmax)

    @functools.cached_property
    def outlier_mask(self) -> torch.Tensor | None:
        """bool ``(n,)``: the elements of the outlier group, or None."""
        return None if self.outlier_group is None else self.group_index == self.outlier_group

    @functools.cached_property
    def outlier_element_grid(self) -> Grid | None:
        if self.outlier is None:
            return None
        o = self.outlier
        return Grid(
            o.scale.expand(self.group_index.numel()), o.zero_point.expand(self.group_index.numel()), o.qmin, o.qmax
        )


@dataclass
class Branch:
    """One input-channel group of a layer with a fixed grouping: its channel indices and, per slot,
    its scale and zero point (``(S,)``; None: the group stays in floating point)."""

    group: int
    index: torch.Tensor
    bits: int
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None
    qmin: int
    qmax: int

    @property
    def is_float(self) -> bool:
        return self.scale is None


@dataclass
class ActPlan:
    """An activation site: its layout (``conv``, ``linear``, ``qkv``), bits and per-slot plans."""

    key: str
    layout: str
    bits: int
    slots: list[SlotPlan]
    # A folded site quantizes u = (x - fold.centre) * (1 / fold.scale) per tensor (its slots are layer-wise
    # grids on u); the consumer's weight columns carry fold.scale and its bias W @ fold.centre.
    fold: Fold | None = None
    # tensorrt profile, folded: quantized as clamp(round(x * unit_multiplier[slot])) * scale[slot], the
    # op order of its graph (a unit-scale Q/DQ, the step's scale multiplied back after the GEMM)
    unit_domain: bool = False

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    @functools.cached_property
    def unit_multiplier(self) -> torch.Tensor:
        """Folded ``unit_domain`` site: float32 ``(S, C)``, ``(1 / fold scale) / scale[slot]`` per
        channel and 0 on the outlier group's channels (which are quantized apart)."""
        inverse = self.fold.inverse
        mask = self.slots[0].outlier_mask
        if mask is not None:
            inverse = torch.where(mask, torch.zeros_like(inverse), inverse)
        return (inverse[None, :] / self.unit_scale[:, None]).float()

    @functools.cached_property
    def unit_scale(self) -> torch.Tensor:
        """Folded ``unit_domain`` site: float32 ``(S,)``, the scale of the folded channels' grid per slot."""
        return torch.stack([sp.grid.scale[0] for sp in self.slots]).float()

    def slot(self, s: int) -> SlotPlan:
        """The plan of slot ``s`` (slot 0 for a site with one set for all steps)."""
        return self.slots[s if len(self.slots) > 1 else 0]

    @property
    def axes(self) -> list[str]:
        return [s.axis for s in self.slots]

    @property
    def fixed_grouping(self) -> bool:
        """One axis and one group membership for every slot (what a branch per group needs)."""
        first = self.slots[0]
        return all(s.axis == first.axis and torch.equal(s.group_index, first.group_index) for s in self.slots)

    @property
    def has_outliers(self) -> bool:
        return any(s.outlier_group is not None for s in self.slots)

    def branches(self, channels: int) -> list[Branch]:
        """The non-empty input-channel groups of a site with a fixed grouping, as branches (one
        branch of every channel for a layer-wise site). Raises RecipeError otherwise."""
        if not self.fixed_grouping:
            raise RecipeError(f"{self.key}: group membership changes across steps; branches need one grouping")
        first = self.slots[0]
        if first.axis not in (CHANNEL, LAYER):
            raise RecipeError(f"{self.key}: {first.axis} groups are not input-channel branches")
        if first.axis == LAYER:
            groups = [(0, torch.arange(channels, device=first.group_index.device))]
        else:
            groups = [(g, torch.nonzero(first.group_index == g).flatten()) for g in range(first.k)]
        out = []
        for g, idx in groups:
            if idx.numel() == 0:
                continue
            outlier = first.outlier_group == g
            grids = [s.outlier if outlier else s.grid.group(g) for s in self.slots]
            if outlier and first.outlier is None:
                out.append(Branch(g, idx, FLOAT_BITS, None, None, 0, 0))
                continue
            scale = torch.stack([gr.scale.reshape(()) for gr in grids])
            zp = torch.stack([gr.zero_point.reshape(()) for gr in grids])
            out.append(Branch(g, idx, grids[0].bits, scale, zp, grids[0].qmin, grids[0].qmax))
        return out


@dataclass(frozen=True)
class Fold:
    """Per-channel ``scale`` and ``centre`` (float32 ``(C,)``, constant within a channel group and
    across steps) that normalize a Linear or conv input before its per-tensor quantizer."""

    scale: torch.Tensor
    centre: torch.Tensor

    @property
    def centred(self) -> bool:
        return bool(self.centre.any())

    @property
    def inverse(self) -> torch.Tensor:
        """``1 / scale`` (float32 ``(C,)``): the graph multiplies by it (a Mul is cheaper than a Div)."""
        return (1.0 / self.scale.float()).float()

    def normalize(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """``(x - centre) * (1 / scale)`` along ``dim`` (the last for a Linear input, 1 for a conv's),
        the op order the exported graph uses (a conv input's fold has no centre: no Sub there)."""
        if self.centred:
            x = x - along(self.centre.to(x.device), x.ndim, dim)
        return x * along(self.inverse.to(x.device), x.ndim, dim)

    def bias(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's bias with the centre folded in, ``bias + weight @ centre`` (float32 ``(O,)``; a
        conv weight's kernel taps summed first)."""
        w = weight.detach().float()
        b = torch.mv(w.flatten(2).sum(2) if w.ndim > 2 else w, self.centre)
        return b if bias is None else bias.detach().float() + b


FOLD_MIN_WIDTH = 1e-6  # a group whose range is a point keeps a finite scale


def fold_of(
    act: ActQuant, strength: float = 1.0, centred: bool = True, symmetric: bool = False, keep: int | None = None
) -> Fold:
    """The fold of a channel-grouped site with one grouping for every slot, from each group's range
    over all slots ``[lo_g, hi_g]`` (``[-amax_g, amax_g]`` when ``symmetric``).

    ``centred`` (Linear inputs): the centre ``(lo_g + hi_g) / 2`` and the scale, the width
    ``hi_g - lo_g`` relative to the widest group's (1: the widest group keeps its values and the
    others are stretched to its width). Not centred (conv inputs: zero padding must stay zero, so
    nothing is subtracted; every symmetric input): the smallest scale that keeps the group inside the
    union of all groups' ranges ``[L, H]``, ``max(hi_g / H, lo_g / L)`` (at most 1; ``amax_g / AMAX``
    when symmetric). Either scale is raised to the power ``strength`` (0: nothing moves into the
    weights). ``keep``: a group left out of the fold (scale 1, centre 0) and of the union, the
    ``tensorrt`` profile's outlier group, which is quantized on its own."""
    gi = act.group_index[0].long()
    ranges = torch.stack([r.float() for r in act.ranges])  # (S, K, 2)
    lo, hi = ranges[..., 0].amin(0), ranges[..., 1].amax(0)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        lo, hi = -amax, amax
    folded = torch.ones_like(lo, dtype=torch.bool)
    if keep is not None:
        folded[keep] = False
    if centred:
        width = (hi - lo).clamp_min(FOLD_MIN_WIDTH)
        scale, centre = width / width[folded].max(), (lo + hi) / 2
    else:
        big_l, big_h = lo[folded].min().clamp_max(0.0), hi[folded].max().clamp_min(0.0)
        up = hi.clamp_min(0.0) / big_h if big_h > 0 else torch.zeros_like(hi)
        down = lo.clamp_max(0.0) / big_l if big_l < 0 else torch.zeros_like(lo)
        scale, centre = torch.maximum(up, down).clamp(FOLD_MIN_WIDTH, 1.0), torch.zeros_like(lo)
    scale = torch.where(folded, scale**strength, torch.ones_like(scale))
    centre = torch.where(folded, centre, torch.zeros_like(centre))
    return Fold(scale[gi].contiguous(), centre[gi].contiguous())


def outlier_group_of(k: int, bits: int, config: QuantConfig) -> int | None:
    """The group of ``k`` that a ``tensorrt``-profile site keeps apart at ``outlier_bits`` (groups
    are sorted: the last one is the widest), or None."""
    outlier_bits = config.outlier_bits if config.profile == "tensorrt" else None
    return k - 1 if outlier_bits is not None and outlier_bits != bits and k > 1 else None


def site_fold(act: ActQuant | None, config: QuantConfig, conv: bool) -> Fold | None:
    """The fold of a Conv2d (``conv``) or Linear input under ``config``, or None when the input is
    not folded (the config does not fold this kind of layer, or the input is not channel-grouped).

    ``onnxruntime``: centred for Linear inputs, centre-free for conv inputs, at ``fold_exponent``.
    ``tensorrt``: symmetric and centre-free, the outlier group left out (its own branch)."""
    if act is None or not (config.folds_conv if conv else config.folds_linear) or act.axis[0] != CHANNEL:
        return None
    if config.profile == "tensorrt":
        keep = outlier_group_of(int(act.ranges[0].shape[0]), config.abits, config)
        return fold_of(act, config.fold_exponent, centred=False, symmetric=True, keep=keep)
    return fold_of(act, config.fold_exponent, centred=not conv)


def _plan_folded(key: str, act: ActQuant, bits: int, config: QuantConfig, fold: Fold) -> ActPlan:
    """A folded site: per slot one grid on the normalized input, whose range is the union of the
    folded groups' ranges of that slot, normalized. With an outlier group (``tensorrt``) the slot
    has two channel groups: 0, the folded channels on that grid, and 1, the outlier group's
    channels, unscaled and kept apart as ``plan_act`` keeps them."""
    if set(act.axis) != {CHANNEL} or any(not torch.equal(g, act.group_index[0]) for g in act.group_index):
        raise RecipeError(f"{key}: a folded input needs one channel grouping for every step")
    gi = act.group_index[0].long()
    k = int(act.ranges[0].shape[0])
    og = outlier_group_of(k, bits, config)
    if og is not None and not bool((gi == og).any()):
        og = None  # an empty outlier group: nothing to keep apart
    # per group (constant within one): its scale and centre; groups with no channel are left out
    dev = gi.device
    g_scale = torch.ones(k, device=dev).scatter_(0, gi, fold.scale.to(dev))
    g_centre = torch.zeros(k, device=dev).scatter_(0, gi, fold.centre.to(dev))
    members = torch.zeros(k, dtype=torch.bool, device=dev).scatter_(0, gi, True)
    if og is not None:
        members[og] = False
    if not bool(members.any()):
        raise RecipeError(f"{key}: every channel is in the outlier group; nothing to fold")
    slots = []
    for ranges in act.ranges:
        u = ((ranges.float() - g_centre[:, None]) / g_scale[:, None])[members]
        union = torch.stack([u[:, 0].min(), u[:, 1].max()]).view(1, 2)
        if og is None:
            slots.append(
                SlotPlan(LAYER, torch.zeros(1, dtype=torch.long, device=dev), act_grid(union, bits, config, LAYER))
            )
            continue
        grid = act_grid(torch.cat([union, ranges[og : og + 1].float()]), bits, config, CHANNEL)
        outlier = None
        if config.outlier_bits != FLOAT_BITS:
            outlier = act_grid(ranges[og:], config.outlier_bits, config, CHANNEL)
        slots.append(SlotPlan(CHANNEL, (gi == og).long(), grid, 1, outlier))
    return ActPlan(key, act.layout, bits, slots, fold, unit_domain=config.profile == "tensorrt")


def plan_act(key: str, act: ActQuant, bits: int, config: QuantConfig, fold: Fold | None = None) -> ActPlan:
    """The plan of one activation site of a recipe (validated against the recipe's own shapes);
    ``fold``: the fold of an input whose channel groups are folded into its layer (``site_fold``)."""
    if not (len(act.axis) == len(act.group_index) == len(act.ranges)) or not act.axis:
        raise RecipeError(f"{key}: axis, group_index and ranges must have one entry per slot")
    for s, (axis, gi, ranges) in enumerate(zip(act.axis, act.group_index, act.ranges, strict=True)):
        if axis not in (CHANNEL, PIXEL, LAYER):
            raise RecipeError(f"{key}: slot {s} has axis {axis!r}; expected channel, pixel or layer")
        if ranges.ndim != 2 or ranges.shape[1] != 2 or not bool(torch.isfinite(ranges).all()):
            raise RecipeError(f"{key}: slot {s} ranges must be a finite (K, 2) tensor, got {tuple(ranges.shape)}")
        k = int(ranges.shape[0])
        if gi.numel() and (int(gi.min()) < 0 or int(gi.max()) >= k):
            raise RecipeError(f"{key}: slot {s} group index outside [0, {k})")
    if fold is not None:
        return _plan_folded(key, act, bits, config, fold)
    slots = []
    for axis, gi, ranges in zip(act.axis, act.group_index, act.ranges, strict=True):
        grid = act_grid(ranges, bits, config, axis)
        outlier = None
        outlier_group = outlier_group_of(int(ranges.shape[0]), bits, config)
        if outlier_group is not None and config.outlier_bits != FLOAT_BITS:
            outlier = act_grid(ranges[outlier_group:], config.outlier_bits, config, axis)
        slots.append(SlotPlan(axis, gi.long(), grid, outlier_group, outlier))
    return ActPlan(key, act.layout, bits, slots)


# ---------------------------------------------------------------------------- weights and outputs


@dataclass
class WeightPlan:
    """Weight quantizer of one layer: per output channel (``axis`` 0, ``scale`` ``(O,)``), per
    tensor (``axis`` None) or block-wise along the input dim (``axis`` 1, ``block`` elements)."""

    bits: int
    granularity: str
    block: int | None
    grid: Grid  # scale/zero_point of the recipe's shape (O,), () or blocked
    # A folded input's scale, multiplied into the weight's input columns before quantizing (C,).
    column_scale: torch.Tensor | None = None
    # Per-output-channel divisor of the dequantized weight (O,): the conv output comes out divided
    # by it, for a quantizer after the conv (normalized conv outputs); the integers stay the same.
    row_scale: torch.Tensor | None = None

    @property
    def axis(self) -> int | None:
        return {"tensor": None, "channel": 0, "block": 1}[self.granularity]

    def folded(self, w: torch.Tensor) -> torch.Tensor:
        """The float weight this plan quantizes: ``w`` with the fold's scale on its input columns."""
        w = w.float()
        if self.column_scale is None:
            return w
        return w * along(self.column_scale, w.ndim, 1)

    @property
    def dq_scale(self) -> torch.Tensor:
        """The scale of the weight's DequantizeLinear (``grid.scale``, divided by ``row_scale``)."""
        if self.row_scale is None:
            return self.grid.scale.float()
        if self.granularity != "channel":
            raise RecipeError("normalized conv outputs need per-channel weights")
        return (self.grid.scale.float() / self.row_scale).float()

    def _expanded(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = self.grid.scale, self.grid.zero_point
        if self.granularity == "tensor":
            return s.reshape(()), z.reshape(())
        if self.granularity == "block":
            size = w.shape[1]
            return (
                s.repeat_interleave(self.block, dim=1).narrow(1, 0, size),
                z.repeat_interleave(self.block, dim=1).narrow(1, 0, size),
            )
        return along(s, w.ndim, 0), along(z, w.ndim, 0)

    def fake(self, w: torch.Tensor) -> torch.Tensor:
        """The weight after its Q/DQ (float32, same shape): of ``folded(w)``, dequantized with
        ``dq_scale``."""
        w = self.folded(w)
        if self.row_scale is not None:  # what the graph's DequantizeLinear computes, op for op
            q = self.integers(w, folded=True).float()
            return (q - along(self.grid.zero_point.float(), w.ndim, 0)) * along(self.dq_scale, w.ndim, 0)
        g = self.grid
        if self.granularity == "tensor":
            return fake_quantize_affine(w, g.scale, g.zero_point, g.qmin, g.qmax)
        if self.granularity == "block":
            return fake_quantize_affine(w, g.scale, g.zero_point, g.qmin, g.qmax, axis=1, block_size=self.block)
        return fake_quantize_affine(w, g.scale, g.zero_point, g.qmin, g.qmax, axis=0)

    def integers(self, w: torch.Tensor, folded: bool = False) -> torch.Tensor:
        """The integers of ``folded(w)`` (of ``w`` itself when ``folded``) on the grid, int8 (signed
        grid) or uint8, same shape."""
        w = w.float() if folded else self.folded(w)
        s, z = self._expanded(w)
        q = torch.clamp(torch.round(w.float() / s) + z, self.grid.qmin, self.grid.qmax)
        return q.to(torch.int8 if self.grid.signed else torch.uint8)


def plan_weight(name: str, wq: WeightQuant) -> WeightPlan:
    if wq.granularity not in ("tensor", "channel", "block"):
        raise RecipeError(f"{name}: weight granularity {wq.granularity!r} is not tensor, channel or block")
    qmin, qmax = quant_range(wq.bits, signed=wq.symmetric)
    return WeightPlan(wq.bits, wq.granularity, wq.block, Grid(wq.scale.float(), wq.zero_point.float(), qmin, qmax))


@dataclass
class OutputPlan:
    """Quantized outputs of a conv's branches (``onnxruntime``): per slot and group ``(S, K)``
    scales and zero points on the uint8 grid."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    # normalized outputs: the branch outputs are quantized divided by this per-output-channel scale
    # (O,), and the branch sum is multiplied by it again
    channel_scale: torch.Tensor | None = None


def plan_output(name: str, out: OutputQuant, n_slots: int, k: int, config: QuantConfig) -> OutputPlan:
    if tuple(out.ranges.shape[:2]) != (n_slots, k):
        raise RecipeError(
            f"{name}: output ranges of shape {tuple(out.ranges.shape)} do not match {n_slots} slots x {k} groups"
        )
    grids = [act_grid(out.ranges[s], OUTPUT_BITS, config, LAYER) for s in range(n_slots)]
    cs = out.channel_scale
    if cs is not None and (cs.ndim != 1 or not bool(torch.isfinite(cs).all()) or not bool((cs > 0).all())):
        raise RecipeError(f"{name}: output channel scales must be a positive finite (O,) tensor")
    return OutputPlan(
        torch.stack([g.scale for g in grids]),
        torch.stack([g.zero_point for g in grids]),
        grids[0].qmin,
        grids[0].qmax,
        None if cs is None else cs.float(),
    )


# ---------------------------------------------------------------------------- layers, attention, UNet


@dataclass
class LayerPlan:
    """One Conv2d/Linear: its weight, input and (``onnxruntime`` convs) output quantizers."""

    name: str
    kind: str  # CONV or LINEAR
    weight: WeightPlan | None
    input: ActPlan | None
    output: OutputPlan | None = None
    # onnxruntime profile: conv inputs are branches with quantized outputs; Linear layers run as MatMul
    branch_outputs: bool = False
    matmul: bool = False


@dataclass
class ProbsPlan:
    """Attention probabilities: ``kind`` log2/uniform, ``mode`` prompt/batch/static max."""

    kind: str
    mode: str
    bits: int
    static_max: torch.Tensor | None


@dataclass
class AttentionPlan:
    name: str
    q: ActPlan | None
    k: ActPlan | None
    v: ActPlan | None
    probs: ProbsPlan | None
    keep_bos: bool


@dataclass
class QuantPlan:
    """Every quantized site of a UNet for one recipe, in module order."""

    config: QuantConfig
    slots: list[float]
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    attention: dict[str, AttentionPlan] = field(default_factory=dict)

    @property
    def n_slots(self) -> int:
        return len(self.slots) if self.config.time_aware else 1


def plan_layer(
    name: str,
    kind: str,
    wq: WeightQuant | None,
    act: ActQuant | None,
    out: OutputQuant | None,
    config: QuantConfig,
    *,
    output_required: bool = True,
) -> LayerPlan:
    """The plan of one Conv2d/Linear (``kind`` CONV or LINEAR) from its recipe entries.

    ``output_required=False`` allows an ``onnxruntime`` conv without output ranges (the output
    calibration pass, which observes them instead)."""
    weight = None if wq is None else plan_weight(name, wq)
    fold = site_fold(act, config, kind == CONV)
    inp = None if act is None else plan_act(f"{name}.input", act, config.abits, config, fold)
    if inp is not None and inp.fold is not None:
        if weight is None:
            raise RecipeError(f"{name}: a folded input needs the layer's weights quantized with its scale")
        weight = replace(weight, column_scale=inp.fold.scale)
    ort = config.profile == "onnxruntime"
    branch_outputs = ort and kind == CONV and inp is not None
    output = None
    if branch_outputs:
        if not inp.fixed_grouping:
            raise RecipeError(
                f"{name}: group membership changes across steps; this layer needs an onnxruntime-profile recipe"
            )
        if out is not None:
            output = plan_output(name, out, inp.n_slots, inp.slots[0].k, config)
            if output.channel_scale is not None:
                if weight is None:
                    raise RecipeError(f"{name}: normalized outputs need the conv's weights quantized")
                if weight.granularity != "channel" or output.channel_scale.numel() != weight.grid.scale.numel():
                    raise RecipeError(
                        f"{name}: output channel scales need per-output-channel weights with as many channels"
                    )
                weight = replace(weight, row_scale=output.channel_scale)
        elif output_required:
            raise RecipeError(
                f"{name}: the onnxruntime profile quantizes conv outputs and this recipe has no output "
                "ranges for it (calibrate with dgq.calibrate.calibrate, or add them with calibrate_outputs)"
            )
    return LayerPlan(name, kind, weight, inp, output, branch_outputs, matmul=ort and kind != CONV)


def build_plan(unet: torch.nn.Module, recipe: Recipe, output_required: bool = True) -> QuantPlan:
    """The plan of ``recipe`` on ``unet`` (sites from the module tree and the recipe's config).

    Validates every entry before anything is applied; a recipe entry for a layer that is not in
    ``unet`` raises RecipeError."""
    config = recipe.config
    plan = QuantPlan(config, list(recipe.slots))
    known = {n for n, _ in unet.named_modules()}
    unknown = sorted(k for k in recipe.weights if k not in known)
    if unknown:
        raise RecipeError(f"recipe layers {unknown[:3]} are not in this UNet")
    for site in layer_sites(unet, config):
        wq = recipe.weights.get(site.name)
        act = recipe.acts.get(site.input_key)
        if wq is None and act is None:
            continue
        out = recipe.outputs.get(site.name)
        plan.layers[site.name] = plan_layer(site.name, site.kind, wq, act, out, config, output_required=output_required)
    for site in attention_sites(unet, config):

        def act(role: str, site=site) -> ActPlan | None:
            a = recipe.acts.get(site.key(role))
            return None if a is None else plan_act(site.key(role), a, config.abits, config)

        probs: ProbsQuant | None = recipe.probs.get(site.key("probs"))
        plan.attention[site.name] = AttentionPlan(
            site.name,
            act("q"),
            act("k"),
            act("v"),
            None if probs is None else ProbsPlan(config.attn_probs, config.attn_scale, config.abits, probs.static_max),
            config.bos_fp,
        )
    return plan
