"""The ``tensorrt`` target: symmetric int8, zero points 0, Q/DQ scales that are build-time constants.

Channel groups of a Conv/Linear input become branches (Gather the group's channels, Q/DQ, the
conv/GEMM on the matching weight slice, sum the branches, add the bias once); the outlier group
(``outlier_bits``) is its own branch in float (16) or at its bits. Per-step and per-element scales
use the "divide, unit-scale Q/DQ, multiply back" form: ``x / s[step]`` -> Q/DQ(scale 1) -> conv ->
``* s[step]``; the multiply moves after the conv/GEMM wherever it commutes (per-tensor, per-branch
and per-row scales), so the Q/DQ scales stay constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgq.attention import StepContext
from dgq.plan import INT8_GRID, ActPlan, LayerPlan
from dgq.quant import CHANNEL, LAYER, PIXEL, along, axis_dim, quant_view
from dgq.recipe import RecipeError
from export.qdq.faithful import FaithfulLayer
from export.qdq.ops import (
    QDQ,
    ZERO_I8,
    LoweredLayer,
    LoweringError,
    SiteSummary,
    Slotted,
    WeightDQ,
    as_dtype,
    at_slot,
    at_slot_along,
    f32,
    integer_weight,
    unit_grid,
    unit_quantize,
)


class UnitScaleActQuant(Slotted):
    """The ``tensorrt`` activation quantizer of a site that is not split into branches: symmetric,
    constant Q/DQ scales; per-step or per-element scales as ``x / s`` -> unit Q/DQ -> ``* s``.

    With one slot and a per-tensor scale it is a plain constant-scale Q/DQ. ``unit_domain`` returns
    the unit-domain tensor and leaves ``* s`` to the caller (who moves it past a GEMM).
    """

    def __init__(self, plan: ActPlan):
        n = plan.n_slots
        super().__init__(n)
        axes = set(plan.axes)
        if len(axes) != 1 or not plan.fixed_grouping:
            raise LoweringError(
                f"{plan.key}: the tensorrt target needs one axis and one grouping for every step, the recipe "
                f"has {sorted(axes)} and {'one' if plan.fixed_grouping else 'several'} grouping(s); "
                "calibrate with --profile tensorrt"
            )
        first = plan.slots[0]
        if not first.grid.signed:
            raise LoweringError(f"{plan.key}: the tensorrt target needs symmetric (signed) activation scales")
        self.key, self.layout, self.bits, self.axis = plan.key, plan.layout, plan.bits, first.axis
        self.register_buffer("scale", torch.stack([sp.element_grid.scale.reshape(-1) for sp in plan.slots]).float())
        self.qmin, self.qmax = first.grid.qmin, first.grid.qmax
        self.unit = n > 1 or self.axis != LAYER
        self.outlier_float = False
        if first.outlier_mask is not None:
            self.register_buffer("outlier_mask", first.outlier_mask)
            if first.outlier is None:
                self.outlier_float = True
            else:
                self.register_buffer("outlier_scale", torch.stack([sp.outlier.scale for sp in plan.slots]).float())
                self.oqmin, self.oqmax = first.outlier.qmin, first.outlier.qmax
        else:
            self.outlier_mask = None

    def commutes_with(self, is_conv: bool) -> bool:
        """Whether ``* s`` may move past the layer's conv/GEMM: a per-tensor scale, or a per-row
        (token) scale of a GEMM, and no outlier elements kept apart."""
        if not self.unit or self.outlier_mask is not None:
            return False
        return (self.axis in (LAYER, CHANNEL) and self.scale.shape[1] == 1) or (self.axis == PIXEL and not is_conv)

    def unit_domain(self, x: torch.Tensor, slot) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q/DQ(x / s) on the unit grid, s shaped to multiply the layer's output)`` (see commutes_with)."""
        return self.memo("unit", x, slot, lambda: self._unit_domain(x, slot))

    def _unit_domain(self, x: torch.Tensor, slot) -> tuple[torch.Tensor, torch.Tensor]:
        x = f32(x)
        sv = at_slot_along(self.scale, self.n_slots, slot, x.ndim, axis_dim(self.layout, self.axis, x.ndim))
        return unit_grid(x / sv, self.qmin, self.qmax), sv

    def forward(self, x: torch.Tensor, slot) -> torch.Tensor:
        return self.memo("forward", x, slot, lambda: self._forward(x, slot))

    def _forward(self, x: torch.Tensor, slot) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = quant_view(f32(x), self.layout, self.axis)
        dim = axis_dim(self.layout, self.axis, x.ndim)
        s = self.pick("scale", slot)
        if not self.unit:
            if (self.qmin, self.qmax) != INT8_GRID:
                x = torch.clamp(x, self.qmin * float(s[0]), self.qmax * float(s[0]))
            y = QDQ.apply(x, s.reshape(()), ZERO_I8, None)
        else:
            sv = at_slot_along(self.scale, self.n_slots, slot, x.ndim, dim)
            y = unit_grid(x / sv, self.qmin, self.qmax) * sv
        if self.outlier_mask is not None:
            mask = along(self.outlier_mask, x.ndim, dim)
            if self.outlier_float:
                kept = x
            else:
                so = self.pick("outlier_scale", slot).reshape(())
                kept = unit_grid(x / so, self.oqmin, self.oqmax) * so
            y = torch.where(mask, kept, y)
        return as_dtype(y if y.shape == shape else y.reshape(shape), dtype)  # no no-op Reshape before the GEMM

    def summary(self) -> SiteSummary:
        return SiteSummary(
            self.key,
            "act",
            {
                "axes": [self.axis],
                "bits": self.bits,
                "slots": self.n_slots,
                "unit_scale": self.unit,
                "outlier_float": self.outlier_float,
            },
        )


class BranchedLayer(LoweredLayer):
    """``tensorrt`` Conv2d/Linear whose input has channel groups: one branch per group.

    Branch g: Gather the group's channels -> ``/ s_g[step]`` -> unit Q/DQ (or a constant-scale Q/DQ
    with one step; none for a float outlier group) -> conv/GEMM with the weight's matching input
    slice (its own integer initializer and DQ) -> ``* s_g[step]``; the branches are summed and the
    bias is added once.
    """

    @classmethod
    def accepts(cls, plan: LayerPlan) -> bool:
        inp = plan.input
        return inp is not None and set(inp.axes) == {CHANNEL} and inp.slots[0].k > 1

    def __init__(self, plan: LayerPlan, inner: nn.Module, ctx: StepContext, act: nn.Module | None = None):
        super().__init__(plan.name, inner, ctx)
        try:
            self.branches = plan.input.branches(inner.in_channels if self.is_conv else inner.in_features)
        except RecipeError as err:
            raise LoweringError(f"{err}; calibrate with --profile tensorrt") from err
        self.n_slots, self.bits = plan.input.n_slots, plan.input.bits
        w = inner.weight.detach().float()
        wp = plan.weight
        if wp is not None:
            if wp.granularity == "block":
                raise LoweringError(
                    f"{plan.name}: block-wise weights cannot be split into channel branches; "
                    "use per-channel weights for layers with channel groups"
                )
            q_full, s, z = integer_weight(wp, w)  # one scale/zero point for every branch's slice
            self.register_buffer("w_scale", s)
            self.register_buffer("w_zp", z)
            self.w_axis = None if wp.axis is None else (0 if self.is_conv else 1)
        for b in self.branches:
            self.register_buffer(f"b{b.group}_idx", b.index.to(torch.int32))  # no Cast before the Gather
            if not b.is_float:
                self.register_buffer(f"b{b.group}_scale", b.scale.float())
            if wp is None:
                w_slice = w[:, b.index]
                self.register_buffer(f"b{b.group}_w_float", w_slice if self.is_conv else w_slice.t().contiguous())
            else:
                q = q_full[:, b.index]
                self.register_buffer(f"b{b.group}_w_q", q if self.is_conv else q.t().contiguous())
        self.wq = wp is not None

    def _weight(self, g: int) -> torch.Tensor:
        if not self.wq:
            return getattr(self, f"b{g}_w_float")
        return WeightDQ.apply(getattr(self, f"b{g}_w_q"), self.w_scale, self.w_zp, self.w_axis, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.ctx.current()
        x = f32(x)
        dim = 1 if self.is_conv else x.ndim - 1
        out = None
        for b in self.branches:
            xg = torch.index_select(x, dim, getattr(self, f"b{b.group}_idx"))
            s = None
            if not b.is_float:
                s = at_slot(getattr(self, f"b{b.group}_scale"), self.n_slots, slot)
                if self.n_slots == 1:
                    if (b.qmin, b.qmax) != INT8_GRID:
                        xg = torch.clamp(xg, b.qmin * float(s), b.qmax * float(s))
                    xg = QDQ.apply(xg, s.reshape(()), ZERO_I8, None)
                    s = None
                else:
                    xg = unit_grid(xg / s, b.qmin, b.qmax)
            y = self._op_t(xg, self._weight(b.group))
            if s is not None:
                y = y * s
            out = y if out is None else out + y
        return self._add_bias(out)

    def summary(self) -> SiteSummary:
        return SiteSummary(
            self.name,
            "branches",
            {
                "branches": [{"channels": int(b.index.numel()), "bits": b.bits} for b in self.branches],
                "slots": self.n_slots,
            },
        )


def weights_in_out(layer: FaithfulLayer) -> None:
    """Store a lowered Linear's weight ``(in, out)`` (its DQ along the matching axis), so the DQ
    feeds the MatMul with no Transpose between them (one TensorRT layer fewer). The layer multiplies
    with ``_op_t``."""
    if layer.is_conv:
        return
    if layer.wbits is None:
        layer.w_float = layer.w_float.t().contiguous()
        return
    layer.w_q = layer.w_q.t().contiguous()
    if layer.w_axis is not None:  # per output row (axis 0) -> axis 1; blocks along the input (1) -> 0
        layer.w_axis = 1 - layer.w_axis
        if layer.w_scale.ndim == 2:  # block-wise: (out, blocks) -> (blocks, out)
            layer.w_scale = layer.w_scale.t().contiguous()
            layer.w_zp = layer.w_zp.t().contiguous()


class UnitLayer(FaithfulLayer):
    """``tensorrt`` Conv2d/Linear whose input is pixel/token-grouped or layer-wise (``UnitScaleActQuant``):
    the faithful layer's DQ'd weight (a Linear's stored ``(in, out)``, ``weights_in_out``), with
    ``* s`` moved past the conv/GEMM where it commutes."""

    act_quantizer = UnitScaleActQuant

    def __init__(self, plan: LayerPlan, inner: nn.Module, ctx: StepContext, act: nn.Module | None = None):
        super().__init__(plan, inner, ctx, act)
        weights_in_out(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is None or not self.act.commutes_with(self.is_conv):
            if self.act is not None:
                x = self.act(x, self.ctx.current())
            return self._add_bias(self._op_t(f32(x), self.weight()))
        # x / s -> unit Q/DQ -> conv/GEMM -> * s -> + bias: the Q/DQ feeds the layer directly.
        u, s = self.act.unit_domain(x, self.ctx.current())
        return self._add_bias(self._op_t(u, self.weight()) * s)


class FoldedActQuant(Slotted):
    """The ``tensorrt`` activation quantizer of a folded channel-grouped input (``ActPlan.fold``):
    every group but the outlier group on one symmetric grid per step, in the fold's normalized domain.

    ``unit_domain(x, slot)`` returns ``(Q/DQ(x * m[step]) on the unit grid, s[step])``, with
    ``m[step] = (1 / fold scale) / s[step]`` per channel and 0 on the outlier channels
    (``ActPlan.unit_multiplier``): the layer's GEMM on it, times ``s[step]``, is the folded
    channels' part. With one slot ``m`` and ``s`` are constants. ``outliers(x, slot)`` returns the outlier
    group's channels (a Gather; None without an outlier group) and, when they are quantized at
    ``outlier_bits``, their per-step scale to multiply the branch's GEMM by.
    """

    def __init__(self, plan: ActPlan):
        n = plan.n_slots
        super().__init__(n)
        fold, first = plan.fold, plan.slots[0]
        if fold is None or fold.centred or not first.grid.signed:
            raise LoweringError(f"{plan.key}: the tensorrt target folds symmetric, centre-free inputs only")
        if not plan.unit_domain:
            raise LoweringError(f"{plan.key}: not a tensorrt-profile folded input")
        self.key, self.layout, self.bits = plan.key, plan.layout, plan.bits
        self.qmin, self.qmax = first.grid.qmin, first.grid.qmax
        mask = first.outlier_mask
        self.register_buffer("mult", plan.unit_multiplier)
        self.register_buffer("scale", plan.unit_scale[:, None].contiguous())
        self.outlier_float = False
        if mask is None:
            self.outlier_index = None
        else:
            self.register_buffer("outlier_index", torch.nonzero(mask).flatten().to(torch.int32))
            self.outlier_float = first.outlier is None
            if not self.outlier_float:
                self.register_buffer("outlier_scale", torch.stack([sp.outlier.scale[0] for sp in plan.slots])[:, None])
                self.oqmin, self.oqmax = first.outlier.qmin, first.outlier.qmax

    def _dim(self, x: torch.Tensor) -> int:
        return axis_dim(self.layout, CHANNEL, x.ndim)

    def unit_domain(self, x: torch.Tensor, slot) -> tuple[torch.Tensor, torch.Tensor]:
        def compute():
            return unit_quantize(f32(x), self.mult, self.scale, self.n_slots, slot, self._dim(x), self.qmin, self.qmax)

        return self.memo("unit", x, slot, compute)

    def outliers(self, x: torch.Tensor, slot) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.outlier_index is None:
            return None, None
        return self.memo("outliers", x, slot, lambda: self._outliers(x, slot))

    def _outliers(self, x: torch.Tensor, slot) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = f32(x)
        xo = torch.index_select(x, self._dim(x), self.outlier_index)
        if self.outlier_float:
            return xo, None
        so = at_slot_along(self.outlier_scale, self.n_slots, slot, x.ndim, None)
        return unit_grid(xo / so, self.oqmin, self.oqmax), so

    def summary(self) -> SiteSummary:
        outlier = None if self.outlier_index is None else ("float" if self.outlier_float else "int")
        return SiteSummary(
            self.key,
            "act",
            {"axes": [CHANNEL], "bits": self.bits, "slots": self.n_slots, "folded": True, "outlier": outlier},
        )


class FoldedLayer(FaithfulLayer):
    """``tensorrt`` Conv2d/Linear whose input's channel groups are folded (``FoldedActQuant``): one
    GEMM on the unit-domain input with the DQ'd weight whose columns carry the fold's scale, times the
    step's scale, plus the outlier group's GEMM (a float branch with the fake-quantized weight's
    columns, or its own unit Q/DQ and DQ'd weight columns), the bias added once.

    ``y = GEMM(Q/DQ(x * m[step]), DQ(W_f)) * s[step] + GEMM(x[outlier channels], W[:, outlier]) + b``
    """

    act_quantizer = FoldedActQuant

    @classmethod
    def accepts(cls, plan: LayerPlan) -> bool:
        return plan.input is not None and plan.input.fold is not None

    def __init__(self, plan: LayerPlan, inner: nn.Module, ctx: StepContext, act: nn.Module | None = None):
        super().__init__(plan, inner, ctx, act)
        self.bias = None if inner.bias is None else inner.bias.detach().float().clone()  # no centre to fold in
        if not isinstance(act, FoldedActQuant) or plan.weight is None:
            raise LoweringError(f"{plan.name}: a folded tensorrt layer needs its FoldedActQuant and quantized weights")
        self.outlier_float = act.outlier_float
        if act.outlier_index is not None:
            idx = act.outlier_index.long()
            w = inner.weight.detach().float()
            if act.outlier_float:  # the simulator's weight columns, as float constants
                w_o = plan.weight.fake(w)[:, idx]
                self.register_buffer("w_outlier", w_o if self.is_conv else w_o.t().contiguous())
            else:
                if plan.weight.granularity == "block":
                    raise LoweringError(f"{plan.name}: block-wise weights cannot be split into an outlier branch")
                q_o = self.w_q[:, idx]
                self.register_buffer("w_outlier_q", q_o if self.is_conv else q_o.t().contiguous())
                self.w_outlier_axis = None if self.w_axis is None else (0 if self.is_conv else 1)
        weights_in_out(self)

    def _outlier_weight(self) -> torch.Tensor:
        if self.outlier_float:
            return self.w_outlier
        return WeightDQ.apply(self.w_outlier_q, self.w_scale, self.w_zp, self.w_outlier_axis, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.ctx.current()
        x = f32(x)
        u, s = self.act.unit_domain(x, slot)
        y = self._op_t(u, self.weight()) * s
        xo, so = self.act.outliers(x, slot)
        if xo is None:
            return self._add_bias(y)
        if so is None and self.is_conv:  # a float outlier conv carries the bias: no Add of its own
            return y + F.conv2d(xo, self._outlier_weight(), self.bias, *self.conv_args)
        yo = self._op_t(xo, self._outlier_weight())
        return self._add_bias(y + (yo if so is None else yo * so))
