"""The ``faithful`` target: the paper's semantics as ONNX Q/DQ, the reference graph.

Asymmetric uint8 (int8 for a symmetric recipe) per-axis Q/DQ with per-element scales expanded from
the groups; per-step parameter tables gathered by the ``step_index`` input; a step whose axis
differs from another step's (channel vs pixel vs layer) gets both paths and a ``Where`` on a
per-step flag; bit widths below 8 clip to their grid first (``Max``/``Min`` on the grid's bounds,
then the 8-bit Q/DQ: exactly the narrower quantizer); a group range that excludes 0 keeps its zero
point in an INT16 container (opset 21) with the same clip. Weights: DequantizeLinear of integer
initializers, per channel, per tensor or block-wise.
"""

from __future__ import annotations

import torch
from torch import nn

from dgq.attention import StepContext
from dgq.plan import ActPlan, LayerPlan
from dgq.quant import CHANNEL, LAYER, along, axis_dim, quant_view
from export.qdq.ops import (
    QDQ,
    LoweredLayer,
    LoweringError,
    Quantize,
    SiteSummary,
    Slotted,
    WeightDQ,
    as_dtype,
    f32,
    integer_weight,
    unit_quantize,
    zp_dtype,
)


class FaithfulActQuant(Slotted):
    """The ``faithful`` activation quantizer of one site (its ``ActPlan``): per-axis Q/DQ with
    per-slot tables; ``forward(x, slot)`` like the simulator's ``ActFakeQuant``."""

    def __init__(self, plan: ActPlan):
        n = plan.n_slots
        super().__init__(n)
        if plan.has_outliers:
            raise LoweringError(
                f"{plan.key}: the faithful target keeps no outlier group apart (a tensorrt-profile recipe with "
                "outlier_bits); export this recipe with --target tensorrt"
            )
        self.key, self.layout, self.bits = plan.key, plan.layout, plan.bits
        # a folded tensorrt-profile input: round(x * m[step]) * s[step], as the simulator computes it
        self.unit_domain = plan.unit_domain
        if self.unit_domain:
            self.register_buffer("unit_mult", plan.unit_multiplier)
            self.register_buffer("unit_scale", plan.unit_scale[:, None].contiguous())
            self.unit_qmin, self.unit_qmax = plan.slots[0].grid.qmin, plan.slots[0].grid.qmax
        self.folded = plan.fold is not None  # quantizes (x - centre) * (1 / scale); the layer carries the fold
        if self.folded:
            self.register_buffer("fold_inverse", plan.fold.inverse)
            self.register_buffer("fold_centre", plan.fold.centre.float() if plan.fold.centred else None)
        self.kinds = sorted(set(plan.axes))
        first = plan.slots[0].grid
        self.signed = first.signed
        self.clip = first.narrower
        qmin_c, qmax_c = first.container
        self.shift: dict[str, bool] = {}  # kind -> zero points off the 8-bit grid (INT16 container)
        for kind in self.kinds:
            sizes = {int(sp.group_index.numel()) for sp in plan.slots if sp.axis == kind}
            if len(sizes) != 1:
                raise LoweringError(f"{plan.key}: {kind} groups of different sizes across steps {sorted(sizes)}")
            size = 1 if kind == LAYER else sizes.pop()
            scale = torch.ones(n, size)
            zp = torch.zeros(n, size)
            qlo = torch.full((n, size), float(qmin_c))
            qhi = torch.full((n, size), float(qmax_c))
            for s, sp in enumerate(plan.slots):
                if sp.axis != kind:
                    continue  # a placeholder row: this step takes another path (Where below)
                g = sp.element_grid
                scale[s], zp[s] = g.scale, g.zero_point
                qlo[s], qhi[s] = float(g.qmin), float(g.qmax)
            # A group range that excludes 0 has its zero point off the 8-bit grid. Such a site keeps
            # its true zero point in an INT16 container (QuantizeLinear-21) and clips x to its grid
            # first: the same integers, the same dequantized values.
            shift = bool(((zp < qmin_c) | (zp > qmax_c)).any())
            self.shift[kind] = shift
            self.register_buffer(f"{kind}_scale", scale.float())
            self.register_buffer(f"{kind}_zp", zp.to(torch.int16 if shift else zp_dtype(self.signed)))
            if self.clip or shift:  # bounds of x on the quantizer's own grid
                self.register_buffer(f"{kind}_lo", ((qlo - zp) * scale).float())
                self.register_buffer(f"{kind}_hi", ((qhi - zp) * scale).float())
            self.register_buffer(f"{kind}_flag", torch.tensor([a == kind for a in plan.axes]))

    def _one(self, x: torch.Tensor, kind: str, slot) -> torch.Tensor:
        scale, zp = self.pick(f"{kind}_scale", slot), self.pick(f"{kind}_zp", slot)
        clip = self.clip or self.shift[kind]
        lo, hi = (self.pick(f"{kind}_lo", slot), self.pick(f"{kind}_hi", slot)) if clip else (None, None)
        shape = x.shape
        x = quant_view(x, self.layout, kind)
        dim = axis_dim(self.layout, kind, x.ndim)
        if kind == LAYER:
            scale, zp = scale.reshape(()), zp.reshape(())
            lo, hi = (lo.reshape(()), hi.reshape(())) if clip else (None, None)
        if clip:
            x = torch.minimum(torch.maximum(x, along(lo, x.ndim, dim)), along(hi, x.ndim, dim))
        y = QDQ.apply(x, scale, zp, dim)
        # Per tensor: no Reshape node, so the DQ feeds the MatMul directly and ONNX Runtime fuses it
        # into MatMulIntegerToFloat. Per axis the (no-op) Reshape stays on purpose: ORT 1.32 fuses a
        # per-channel activation DQ into MatMulIntegerToFloat too, which then fails at run time
        # ("Per-Channel is not supported yet").
        return y if kind == LAYER else y.reshape(shape)

    def forward(self, x: torch.Tensor, slot) -> torch.Tensor:
        return self.memo("forward", x, slot, lambda: self._forward(x, slot))

    @property
    def per_tensor(self) -> bool:
        """One scale and zero point per step on the 8-bit container (what :meth:`quantize` serves)."""
        return self.kinds == [LAYER] and not self.unit_domain and not self.shift[LAYER]

    def quantize(self, x: torch.Tensor, slot) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A per-tensor site's integers of ``x`` with the step's scale and zero point: ``forward``'s
        ops up to its QuantizeLinear (the fold, the narrower grid's clip), no DequantizeLinear.
        Sibling layers reading the same tensor share them (one QuantizeLinear)."""
        if not self.per_tensor:
            raise LoweringError(f"{self.key}: only a per-tensor site has one integer tensor per step")
        return self.memo("quantize", x, slot, lambda: self._quantize(x, slot))

    def _quantize(self, x: torch.Tensor, slot) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x32 = self._normalize(f32(x))
        scale, zp = self.pick(f"{LAYER}_scale", slot).reshape(()), self.pick(f"{LAYER}_zp", slot).reshape(())
        if self.clip:
            lo, hi = self.pick(f"{LAYER}_lo", slot).reshape(()), self.pick(f"{LAYER}_hi", slot).reshape(())
            x32 = torch.minimum(torch.maximum(x32, lo), hi)
        return Quantize.apply(x32, scale, zp), scale, zp

    def _normalize(self, x32: torch.Tensor) -> torch.Tensor:
        if self.folded:  # dgq.plan.Fold.normalize, op for op
            if self.fold_centre is not None:
                x32 = x32 - self.fold_centre
            x32 = x32 * self.fold_inverse
        return x32

    def _forward(self, x: torch.Tensor, slot) -> torch.Tensor:
        x32 = f32(x)
        if self.unit_domain:
            dim = axis_dim(self.layout, CHANNEL, x32.ndim)
            u, s = unit_quantize(
                x32, self.unit_mult, self.unit_scale, self.n_slots, slot, dim, self.unit_qmin, self.unit_qmax
            )
            return as_dtype(u * s, x.dtype)
        x32 = self._normalize(x32)
        out = None
        for kind in self.kinds:
            y = self._one(x32, kind, slot)
            out = y if out is None else torch.where(self.pick(f"{kind}_flag", slot), y, out)
        return as_dtype(out, x.dtype)

    def summary(self) -> SiteSummary:
        detail = {"axes": self.kinds, "bits": self.bits, "slots": self.n_slots}
        if self.folded:
            detail["folded"] = True
        return SiteSummary(self.key, "act", detail)


class FaithfulLayer(LoweredLayer):
    """Conv2d/Linear with a Q/DQ'd input (its ``act_quantizer``) and a DQ'd integer weight."""

    act_quantizer = FaithfulActQuant

    def __init__(self, plan: LayerPlan, inner: nn.Module, ctx: StepContext, act: nn.Module | None = None):
        super().__init__(plan.name, inner, ctx)
        self.act = act
        if plan.input is not None and plan.input.fold is not None:  # the fold's centre lives in the bias
            self.bias = plan.input.fold.bias(inner.weight, inner.bias)
        w = inner.weight.detach().float()
        if plan.weight is None:
            self.register_buffer("w_float", w)
            self.wbits = None
        else:
            q, s, z = integer_weight(plan.weight, w)
            self.register_buffer("w_q", q)
            self.register_buffer("w_scale", s)
            self.register_buffer("w_zp", z)
            self.w_axis, self.w_block, self.wbits = plan.weight.axis, plan.weight.block, plan.weight.bits

    def weight(self) -> torch.Tensor:
        if self.wbits is None:
            return self.w_float
        return WeightDQ.apply(self.w_q, self.w_scale, self.w_zp, self.w_axis, self.w_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x, self.ctx.current())
        return self._op(f32(x), self.weight(), self.bias)
