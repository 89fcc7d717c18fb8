"""Q/DQ export of a DGQ recipe: the simulator's seams, lowered to ONNX QuantizeLinear/DequantizeLinear.

How the graph is made. The recipe is applied to a copy of the UNet through the same seams the
simulator uses (a child-module swap per Conv2d/Linear and :class:`~dgq.attention.DGQAttnProcessor`
per attention block), but with *lowering* modules instead of fake quantizers. Each lowering module
is a per-op handler: it knows which tensor of its op is quantized and how (axis, groups, slot
tables, branches). All of them write nodes through one inserter, :class:`QDQ` / :class:`WeightDQ`
(``torch.autograd.Function`` with an ONNX ``symbolic``): in PyTorch they compute the quantizer's
numbers, in the traced graph they are a QuantizeLinear -> DequantizeLinear pair (or a
DequantizeLinear of an integer initializer for weights). Because the trace runs the very modules
whose PyTorch forward is checked against the simulator, graph and simulator cannot drift apart by
a pattern matcher that missed an exporter-specific node name (the reason this is preferred over
rewriting a float graph).

Targets (``TARGETS``):

- ``faithful`` (a ``faithful``-profile recipe): the paper's semantics. Asymmetric uint8 (or int8
  for a symmetric recipe) per-axis Q/DQ with per-element scales expanded from the groups; per-step
  parameter tables gathered by the ``step_index`` input; a step whose axis differs from another
  step's (channel vs pixel vs layer) gets both paths and a ``Where`` on a per-step flag; bit widths
  below 8 clip to their grid first (ONNX has no 6-bit type: ``Max``/``Min`` on the grid's bounds,
  then the 8-bit Q/DQ, which is exactly the narrower quantizer); a group range that excludes 0 keeps
  its zero point in an INT16 container (opset 21) with the same clip; log2/uniform attention
  probabilities, real-time max and BOS handling as float ops (the processor's own code, traced).
- ``tensorrt`` (a ``tensorrt``-profile recipe): symmetric int8, zero-points 0, constant Q/DQ scales.
  Channel groups of a Conv/Linear input become branches (Gather the group's channels, Q/DQ, the
  conv/GEMM on the matching weight slice, sum the branches, add the bias once); the outlier group
  (``outlier_bits``) is its own branch in float (16) or at its bits. Per-step scales use the
  "divide, unit-scale Q/DQ, multiply back" form: ``x / s[step]`` -> Q/DQ(scale 1) -> conv -> ``* s[step]``
  (the multiply moves after the conv/GEMM wherever it commutes: per-tensor, per-branch and per-row
  scales), so the Q/DQ scales stay build-time constants. INT4 weights are packed only where they
  feed a MatMul/Gemm (TensorRT's INT4 is weight-only GEMM); convs keep 4-bit values in INT8.

- ``onnxruntime`` (an ``onnxruntime``-profile recipe): what ONNX Runtime's CPU integer kernels fuse.
  Every quantized conv is a sum of branches, one per input-channel group (one branch for a
  layer-wise site), each a whole QLinearConv node unit: uint8 Q/DQ of the group with the step's
  scale and zero point (Gathered from per-step tables: ONNX Runtime fuses those), the DQ'd int8
  weight slice, the conv without bias, and a uint8 Q/DQ of the branch's calibrated per-step output
  range (``Recipe.outputs``); the float bias is added after the sum (a bias inside the unit would
  need a constant scale). Linear layers: a per-step per-tensor uint8 Q/DQ feeding MatMul with an
  (in, out) DQ'd weight, which fuses into MatMulIntegerToFloat. Weights stay in INT8 containers
  (4-bit values included): the integer kernels take int8.

Weights are integer initializers (int8/uint8, or int4/uint4 at opset >= 21) with a
DequantizeLinear, so the file holds 1 byte (or half a byte) per weight. The ``step_index`` input is
added only when the recipe has more than one timestep slot.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import DGQError
from dgq.attention import DGQAttnProcessor, StepContext
from dgq.config import QuantConfig
from dgq.quant import CHANNEL, LAYER, PIXEL, quant_range
from dgq.recipe import ActQuant, OutputQuant, Recipe, WeightQuant
from dgq.simulate import (
    FLOAT_BITS,
    OUTPUT_BITS,
    ProbsFakeQuant,
    branch_channels,
    group_params,
)
from dgq.sites import CONV, attention_sites, layer_sites, set_module

log = logging.getLogger(__name__)

TARGETS = ("faithful", "tensorrt", "onnxruntime")
STEP_INPUT = "step_index"


class LoweringError(DGQError, ValueError):
    """A recipe or layer that the chosen export target cannot express."""


# ---------------------------------------------------------------------------- the inserter


_ONE = torch.ones(())
_ZERO_I8 = torch.zeros((), dtype=torch.int8)


def _qrange_of(zero_point: torch.Tensor) -> tuple[int, int]:
    return {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767)}[zero_point.dtype]


def _axis_view(t: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    if axis is None:
        return t
    view = [1] * ndim
    view[axis] = -1
    return t.reshape(view)


class QDQ(torch.autograd.Function):
    """QuantizeLinear -> DequantizeLinear: ``(clamp(round(x / s) + z) - z) * s`` on the zero point's
    integer grid (uint8 or int8), per tensor (``axis=None``) or per ``axis``. ``scale`` float32,
    ``zero_point`` uint8/int8 of the same shape (0-d, or 1-D along ``axis``)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis):
        qmin, qmax = _qrange_of(zero_point)
        s = _axis_view(scale, x.ndim, axis)
        z = _axis_view(zero_point.float(), x.ndim, axis)
        return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s

    @staticmethod
    def symbolic(g, x, scale, zero_point, axis):
        kw = {} if axis is None else {"axis_i": axis}
        q = g.op("QuantizeLinear", x, scale, zero_point, **kw)
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


class WeightDQ(torch.autograd.Function):
    """DequantizeLinear of an integer weight initializer: ``(q - z) * s`` per tensor, per ``axis``
    or block-wise along ``axis`` (``block`` elements per scale, opset 21)."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis, block):
        if block is not None:
            size = q.shape[axis]
            scale = scale.repeat_interleave(block, dim=axis).narrow(axis, 0, size)
            zero_point = zero_point.repeat_interleave(block, dim=axis).narrow(axis, 0, size)
            return (q.float() - zero_point.float()) * scale
        return (q.float() - _axis_view(zero_point.float(), q.ndim, axis)) * _axis_view(scale, q.ndim, axis)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis, block):
        kw = {} if axis is None else {"axis_i": axis}
        if block is not None:
            kw["block_size_i"] = block
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 without a no-op Cast node in the trace (a Cast between a DQ and its
    MatMul/Conv is one more node the runtimes' Q/DQ fusions must look through)."""
    return x if x.dtype == torch.float32 else x.float()


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


# ---------------------------------------------------------------------------- activations


def _zp_dtype(symmetric: bool) -> torch.dtype:
    return torch.int8 if symmetric else torch.uint8


@dataclass
class SiteSummary:
    """What one lowering module wrote, for the export summary."""

    key: str
    kind: str  # "act", "weight", "branches"
    detail: dict = field(default_factory=dict)


def _at_slot(table: torch.Tensor, n_slots: int, slot) -> torch.Tensor:
    """Row ``slot`` of a per-step table (a Gather by ``step_index`` in the graph); row 0 with one slot."""
    return table[0] if n_slots == 1 else table[slot]


class _Slotted(nn.Module):
    """Buffers with a leading slot dim, looked up by the step index (a tensor while tracing)."""

    def __init__(self, n_slots: int):
        super().__init__()
        self.n_slots = n_slots

    def pick(self, name: str, slot) -> torch.Tensor:
        return _at_slot(getattr(self, name), self.n_slots, slot)

    # One quantizer shared by sibling layers that read the same tensor (q/k/v projections): the
    # first call of a UNet forward computes the Q/DQ, the siblings reuse it, so the graph has one
    # Q/DQ pair that feeds three GEMMs. ``QuantUNetForExport`` clears the memo at every call.
    def memo(self, what: str, x: torch.Tensor, compute):
        memo = self.__dict__.setdefault("_memo", {})
        hit = memo.get(what)
        if hit is not None and hit[0] is x:
            return hit[1]
        out = compute()
        memo[what] = (x, out)
        return out

    def clear_memo(self) -> None:
        self.__dict__.pop("_memo", None)


class FaithfulActQuant(_Slotted):
    """The ``faithful`` activation quantizer of one site: per-axis asymmetric Q/DQ with per-slot tables.

    ``__call__(x, slot)`` like the simulator's ``ActFakeQuant``. Layouts: ``conv`` (B, C, H, W) with
    channel axis 1 or pixel axis 2 of the (B, C, H*W) view; ``linear``/``qkv`` (..., N, C) with
    channel axis last, pixel axis 1.
    """

    def __init__(self, key: str, act: ActQuant, bits: int, config: QuantConfig):
        n = len(act.axis)
        super().__init__(n)
        self.key, self.layout, self.bits = key, act.layout, bits
        sym = config.is_symmetric
        self.kinds = sorted(set(act.axis))
        qmin_c, qmax_c = (-128, 127) if sym else (0, 255)  # the 8-bit container's grid
        self.clip = quant_range(bits, sym) != (qmin_c, qmax_c)  # narrower grid than the 8-bit container
        self.shift: dict[str, bool] = {}  # kind -> zero points off the 8-bit grid (INT16 container)
        for kind in self.kinds:
            sizes = {int(act.group_index[s].numel()) for s in range(n) if act.axis[s] == kind}
            size = 1 if kind == LAYER else sizes.pop()
            scale = torch.ones(n, size)
            zp = torch.zeros(n, size)
            qlo = torch.full((n, size), float(qmin_c))
            qhi = torch.full((n, size), float(qmax_c))
            for s in range(n):
                if act.axis[s] != kind:
                    continue  # a placeholder row: this step takes another path (Where below)
                sc, z, qmin, qmax = group_params(act.ranges[s], bits, config, kind)
                gi = act.group_index[s] if kind != LAYER else torch.zeros(1, dtype=torch.long)
                scale[s], zp[s] = sc[gi], z[gi]
                qlo[s], qhi[s] = float(qmin), float(qmax)
            # A group range that excludes 0 has its zero point off the 8-bit grid. Such a site keeps
            # its true zero point in an INT16 container (QuantizeLinear-21) and clips x to its grid
            # first: the same integers, the same dequantized values.
            shift = bool(((zp < qmin_c) | (zp > qmax_c)).any())
            self.shift[kind] = shift
            self.register_buffer(f"{kind}_scale", scale.float())
            self.register_buffer(f"{kind}_zp", zp.to(torch.int16 if shift else _zp_dtype(sym)))
            if self.clip or shift:  # bounds of x on the quantizer's own grid
                self.register_buffer(f"{kind}_lo", ((qlo - zp) * scale).float())
                self.register_buffer(f"{kind}_hi", ((qhi - zp) * scale).float())
            flag = torch.tensor([a == kind for a in act.axis])
            self.register_buffer(f"{kind}_flag", flag)

    def _one(self, x: torch.Tensor, kind: str, slot) -> torch.Tensor:
        scale, zp = self.pick(f"{kind}_scale", slot), self.pick(f"{kind}_zp", slot)
        clip = self.clip or self.shift[kind]
        lo, hi = (self.pick(f"{kind}_lo", slot), self.pick(f"{kind}_hi", slot)) if clip else (None, None)
        shape = x.shape
        if kind == LAYER:
            axis, scale, zp = None, scale.reshape(()), zp.reshape(())
            lo, hi = (lo.reshape(()), hi.reshape(())) if clip else (None, None)
        elif self.layout == CONV:
            if kind == PIXEL:
                x = x.flatten(2)
            axis = 1 if kind == CHANNEL else 2
        else:
            axis = x.ndim - 1 if kind == CHANNEL else 1

        def view(t):
            return t if kind == LAYER else _axis_view(t, x.ndim, axis)

        if clip:
            x = torch.minimum(torch.maximum(x, view(lo)), view(hi))
        y = QDQ.apply(x, scale, zp, axis)
        # Per tensor: no Reshape node, so the DQ feeds the MatMul directly and ONNX Runtime fuses it
        # into MatMulIntegerToFloat. Per axis the (no-op) Reshape stays on purpose: ORT 1.32 fuses a
        # per-channel activation DQ into MatMulIntegerToFloat too, which then fails at run time
        # ("Per-Channel is not supported yet").
        return y if kind == LAYER else y.reshape(shape)

    def forward(self, x: torch.Tensor, slot) -> torch.Tensor:
        return self.memo("forward", x, lambda: self._forward(x, slot))

    def _forward(self, x: torch.Tensor, slot) -> torch.Tensor:
        x32 = _f32(x)
        out = None
        for kind in self.kinds:
            y = self._one(x32, kind, slot)
            out = y if out is None else torch.where(self.pick(f"{kind}_flag", slot), y, out)
        return _as(out, x.dtype)

    def summary(self) -> SiteSummary:
        return SiteSummary(self.key, "act", {"axes": self.kinds, "bits": self.bits, "slots": self.n_slots})


class UnitScaleActQuant(_Slotted):
    """The ``tensorrt`` activation quantizer of a site that is not split into branches: symmetric,
    constant Q/DQ scales; per-step or per-element scales as ``x / s`` -> unit Q/DQ -> ``* s``.

    With one slot and a per-tensor scale it is a plain constant-scale Q/DQ. ``multiply_back=False``
    returns the unit-domain tensor and leaves ``* s`` to the caller (who moves it past a GEMM).
    """

    def __init__(self, key: str, act: ActQuant, bits: int, config: QuantConfig):
        n = len(act.axis)
        super().__init__(n)
        axes = set(act.axis)
        if len(axes) != 1:
            raise LoweringError(
                f"{key}: the tensorrt target needs one axis for every step, the recipe has {sorted(axes)}; "
                "calibrate with --profile tensorrt"
            )
        self.key, self.layout, self.bits, self.axis = key, act.layout, bits, axes.pop()
        gi = act.group_index[0] if self.axis != LAYER else torch.zeros(1, dtype=torch.long)
        if any(not torch.equal(act.group_index[s], act.group_index[0]) for s in range(n)):
            raise LoweringError(
                f"{key}: group membership changes across steps; the tensorrt target needs a tensorrt-profile recipe"
            )
        scale = torch.stack([group_params(act.ranges[s], bits, config, self.axis)[0][gi] for s in range(n)])
        self.register_buffer("scale", scale.float())  # (S, n) per element of the axis
        self.qmin, self.qmax = quant_range(bits, signed=True)
        self.unit = n > 1 or self.axis != LAYER
        self.outlier_float = False
        k = act.k(0)
        if config.outlier_bits is not None and config.outlier_bits != bits and k > 1:
            mask = gi == k - 1
            self.register_buffer("outlier_mask", mask)
            if config.outlier_bits == FLOAT_BITS:
                self.outlier_float = True
            else:
                o = torch.stack(
                    [group_params(act.ranges[s][k - 1 :], config.outlier_bits, config, self.axis)[0] for s in range(n)]
                )
                self.register_buffer("outlier_scale", o.reshape(n, 1).float())
                self.oqmin, self.oqmax = quant_range(config.outlier_bits, signed=True)
        else:
            self.outlier_mask = None

    def _dim(self, x: torch.Tensor) -> int | None:
        if self.axis == LAYER:
            return None
        if self.layout == CONV:
            return 1 if self.axis == CHANNEL else 2
        return x.ndim - 1 if self.axis == CHANNEL else 1

    def _grid(self, u: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        if (qmin, qmax) != (-128, 127):
            u = torch.clamp(u, float(qmin), float(qmax))
        return QDQ.apply(u, _ONE, _ZERO_I8, None)

    def commutes_with(self, is_conv: bool) -> bool:
        """Whether ``* s`` may move past the layer's conv/GEMM: a per-tensor scale, or a per-row
        (token) scale of a GEMM, and no outlier elements kept apart."""
        if not self.unit or self.outlier_mask is not None:
            return False
        return (self.axis in (LAYER, CHANNEL) and self.scale.shape[1] == 1) or (self.axis == PIXEL and not is_conv)

    def unit_domain(self, x: torch.Tensor, slot) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q/DQ(x / s) on the unit grid, s shaped to multiply the layer's output)`` (see commutes_with)."""
        return self.memo("unit", x, lambda: self._unit_domain(x, slot))

    def _unit_domain(self, x: torch.Tensor, slot) -> tuple[torch.Tensor, torch.Tensor]:
        x = _f32(x)
        dim = self._dim(x)
        s = self.pick("scale", slot)
        sv = _axis_view(s, x.ndim, dim) if (dim is not None and s.numel() > 1) else s.reshape(())
        return self._grid(x / sv, self.qmin, self.qmax), sv

    def forward(self, x: torch.Tensor, slot) -> torch.Tensor:
        return self.memo("forward", x, lambda: self._forward(x, slot))

    def _forward(self, x: torch.Tensor, slot) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = _f32(x)
        if self.layout == CONV and self.axis == PIXEL:
            x = x.flatten(2)
        dim = self._dim(x)
        s = self.pick("scale", slot)
        if not self.unit:
            if (self.qmin, self.qmax) != (-128, 127):
                x = torch.clamp(x, self.qmin * float(s[0]), self.qmax * float(s[0]))
            y = QDQ.apply(x, s.reshape(()), _ZERO_I8, None)
        else:
            sv = _axis_view(s, x.ndim, dim) if dim is not None else s.reshape(())
            y = self._grid(x / sv, self.qmin, self.qmax) * sv
        if self.outlier_mask is not None:
            mask = _axis_view(self.outlier_mask, x.ndim, dim)
            if self.outlier_float:
                kept = x
            else:
                so = self.pick("outlier_scale", slot).reshape(())
                kept = self._grid(x / so, self.oqmin, self.oqmax) * so
            y = torch.where(mask, kept, y)
        return _as(y if y.shape == shape else y.reshape(shape), dtype)  # no no-op Reshape before the GEMM

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


# ---------------------------------------------------------------------------- weights


def _int_weight(
    w: torch.Tensor, wq: WeightQuant
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None, int | None]:
    """``(q int8/uint8, scale, zero_point int8/uint8, axis, block)`` of a float weight, ONNX layout."""
    qmin, qmax = quant_range(wq.bits, signed=wq.symmetric)
    dtype = torch.int8 if wq.symmetric else torch.uint8
    if wq.granularity == "tensor":
        s, z, axis, block = wq.scale.reshape(()), wq.zero_point.reshape(()), None, None
        q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
    elif wq.granularity == "block":
        s, z, axis, block = wq.scale, wq.zero_point, 1, wq.block
        se = s.repeat_interleave(block, dim=1).narrow(1, 0, w.shape[1])
        ze = z.repeat_interleave(block, dim=1).narrow(1, 0, w.shape[1])
        q = torch.clamp(torch.round(w / se) + ze, qmin, qmax)
    else:
        s, z, axis, block = wq.scale, wq.zero_point, 0, None
        q = torch.clamp(torch.round(w / _axis_view(s, w.ndim, 0)) + _axis_view(z, w.ndim, 0), qmin, qmax)
    return q.to(dtype), s.float(), z.to(dtype), axis, block


# ---------------------------------------------------------------------------- layers


class _LoweredLayer(nn.Module):
    """Common part of a lowered Conv2d/Linear: the module's hyper-parameters and float bias."""

    def __init__(self, name: str, inner: nn.Module, ctx: StepContext):
        super().__init__()
        self.name, self.ctx = name, ctx
        self.is_conv = isinstance(inner, nn.Conv2d)
        if self.is_conv:
            self.conv_args = (inner.stride, inner.padding, inner.dilation, inner.groups)
            if inner.groups != 1:
                raise LoweringError(
                    f"{name}: grouped convolutions (groups={inner.groups}) are not supported by the Q/DQ export"
                )
            if inner.padding_mode != "zeros":
                raise LoweringError(f"{name}: padding_mode={inner.padding_mode!r} is not supported by the Q/DQ export")
        self.register_buffer("bias", None if inner.bias is None else inner.bias.detach().float().clone())

    def _op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Conv2d, or Linear with an (out, in) weight: the simulator's own calls, so equal bit for bit."""
        if self.is_conv:
            return F.conv2d(x, w, bias, *self.conv_args)
        return F.linear(x, w, bias)

    def _op_t(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Conv2d, or Linear with an (in, out) weight: DQ -> MatMul with no Transpose between (branches)."""
        return F.conv2d(x, w, None, *self.conv_args) if self.is_conv else torch.matmul(x, w)


class FaithfulLayer(_LoweredLayer):
    """Conv2d/Linear with a Q/DQ'd input (``FaithfulActQuant``) and a DQ'd integer weight."""

    def __init__(self, name: str, inner: nn.Module, wq: WeightQuant | None, act: nn.Module | None, ctx: StepContext):
        super().__init__(name, inner, ctx)
        self.act = act
        w = inner.weight.detach().float()
        if wq is None:
            self.register_buffer("w_float", w)
            self.wbits = None
        else:
            q, s, z, axis, block = _int_weight(w, wq)
            self.register_buffer("w_q", q)
            self.register_buffer("w_scale", s)
            self.register_buffer("w_zp", z)
            self.w_axis, self.w_block, self.wbits = axis, block, wq.bits

    def weight(self) -> torch.Tensor:
        if self.wbits is None:
            return self.w_float
        return WeightDQ.apply(self.w_q, self.w_scale, self.w_zp, self.w_axis, self.w_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x, self.ctx.current())
        return self._op(_f32(x), self.weight(), self.bias)


class BranchedLayer(_LoweredLayer):
    """``tensorrt`` Conv2d/Linear whose input has channel groups: one branch per group.

    Branch g: Gather the group's channels -> ``/ s_g[step]`` -> unit Q/DQ (or a constant-scale Q/DQ
    with one step; none for a float outlier group) -> conv/GEMM with the weight's matching input
    slice (its own integer initializer and DQ) -> ``* s_g[step]``; the branches are summed and the
    bias is added once.
    """

    def __init__(
        self,
        name: str,
        inner: nn.Module,
        wq: WeightQuant | None,
        act: ActQuant,
        bits: int,
        config: QuantConfig,
        ctx: StepContext,
    ):
        super().__init__(name, inner, ctx)
        n = len(act.axis)
        gi = act.group_index[0]
        k = act.k(0)
        self.n_slots, self.bits = n, bits
        self.qmin, self.qmax = quant_range(bits, signed=True)
        w = inner.weight.detach().float()
        self.branches: list[dict] = []
        outlier = (
            config.outlier_bits if (config.outlier_bits is not None and config.outlier_bits != bits and k > 1) else None
        )
        for g in range(k):
            idx = torch.nonzero(gi == g).flatten()
            if idx.numel() == 0:
                continue
            gbits = outlier if (outlier is not None and g == k - 1) else bits
            scale = None
            if gbits != FLOAT_BITS:
                scale = torch.stack(
                    [group_params(act.ranges[s][g : g + 1], gbits, config, CHANNEL)[0] for s in range(n)]
                ).reshape(n)
            b = {
                "idx": f"b{g}_idx",
                "scale": f"b{g}_scale" if scale is not None else None,
                "bits": gbits,
                "w": f"b{g}_w",
                "channels": int(idx.numel()),
            }
            self.register_buffer(b["idx"], idx)
            if scale is not None:
                self.register_buffer(b["scale"], scale.float())
            w_slice = w[:, idx]
            if wq is None:
                self.register_buffer(b["w"] + "_float", w_slice if self.is_conv else w_slice.t().contiguous())
                b["wq"] = None
            else:
                if wq.granularity == "block":
                    raise LoweringError(
                        f"{name}: block-wise weights cannot be split into channel branches; "
                        "use per-channel weights for layers with channel groups"
                    )
                if not hasattr(self, "w_scale"):  # one scale/zero point for every branch's slice
                    q_full, s, z, axis, _ = _int_weight(w, wq)
                    self.register_buffer("w_scale", s)
                    self.register_buffer("w_zp", z)
                    self.w_axis = None if axis is None else (0 if self.is_conv else 1)
                q = q_full[:, idx]
                if not self.is_conv:
                    q = q.t().contiguous()
                self.register_buffer(b["w"] + "_q", q)
                b["wq"] = (self.w_axis,)
            self.branches.append(b)

    def _weight(self, b: dict) -> torch.Tensor:
        if b["wq"] is None:
            return getattr(self, b["w"] + "_float")
        return WeightDQ.apply(getattr(self, b["w"] + "_q"), self.w_scale, self.w_zp, b["wq"][0], None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.ctx.current()
        x = _f32(x)
        dim = 1 if self.is_conv else x.ndim - 1
        out = None
        for b in self.branches:
            xg = torch.index_select(x, dim, getattr(self, b["idx"]))
            s = None
            if b["scale"] is not None:
                table = getattr(self, b["scale"])
                s = _at_slot(table, self.n_slots, slot)
                qmin, qmax = quant_range(b["bits"], signed=True)
                if self.n_slots == 1:
                    if (qmin, qmax) != (-128, 127):
                        xg = torch.clamp(xg, qmin * float(s), qmax * float(s))
                    xg = QDQ.apply(xg, s.reshape(()), _ZERO_I8, None)
                    s = None
                else:
                    u = xg / s
                    if (qmin, qmax) != (-128, 127):
                        u = torch.clamp(u, float(qmin), float(qmax))
                    xg = QDQ.apply(u, _ONE, _ZERO_I8, None)
            y = self._op_t(xg, self._weight(b))
            if s is not None:
                y = y * s
            out = y if out is None else out + y
        if self.bias is not None:
            out = out + (self.bias.view(1, -1, 1, 1) if self.is_conv else self.bias)
        return out

    def summary(self) -> SiteSummary:
        return SiteSummary(
            self.name,
            "branches",
            {
                "branches": [{"channels": b["channels"], "bits": b["bits"]} for b in self.branches],
                "slots": self.n_slots,
            },
        )


class UnitLayer(FaithfulLayer):
    """``tensorrt`` Conv2d/Linear whose input is pixel/token-grouped or layer-wise (``UnitScaleActQuant``):
    the faithful layer's DQ'd weight, with ``* s`` moved past the conv/GEMM where it commutes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is None or not self.act.commutes_with(self.is_conv):
            return super().forward(x)
        # x / s -> unit Q/DQ -> conv/GEMM -> * s -> + bias: the Q/DQ feeds the layer directly.
        u, s = self.act.unit_domain(x, self.ctx.current())
        y = self._op(u, self.weight(), None) * s
        if self.bias is not None:
            y = y + (self.bias.view(1, -1, 1, 1) if self.is_conv else self.bias)
        return y


class OrtConvLayer(_LoweredLayer):
    """``onnxruntime`` Conv2d (:class:`dgq.simulate.BranchConvLayer` lowered): per input-channel
    group a whole QLinearConv node unit, the branches summed in float, then the float bias.

    Branch g: Gather the group's channels (none for a single branch) -> uint8 Q/DQ with the step's
    scale and zero point (Gather of a per-step table by ``step_index``) -> Conv with the DQ'd int8
    weight slice (per output channel, zero points 0) and no bias -> uint8 Q/DQ with the branch's
    per-step output range. ONNX Runtime fuses each branch into QLinearConv; it does not fuse a unit
    with a bias whose scale is not a constant, so the bias is added after the sum.
    """

    def __init__(
        self,
        name: str,
        inner: nn.Module,
        wq: WeightQuant,
        act: ActQuant,
        out: OutputQuant,
        bits: int,
        config: QuantConfig,
        ctx: StepContext,
    ):
        super().__init__(name, inner, ctx)
        if wq is None or not wq.symmetric or wq.granularity == "block":
            raise LoweringError(
                f"{name}: the onnxruntime target needs symmetric per-channel or per-tensor int8 conv weights"
            )
        if out is None:
            raise LoweringError(
                f"{name}: the recipe has no output ranges for this conv (calibrate with --profile onnxruntime)"
            )
        n = len(act.axis)
        if any(not torch.equal(act.group_index[s], act.group_index[0]) or act.axis[s] != act.axis[0] for s in range(n)):
            raise LoweringError(f"{name}: group membership changes across steps; calibrate with --profile onnxruntime")
        self.n_slots, self.bits = n, bits
        q_full, s, z, axis, _ = _int_weight(inner.weight.detach().float(), wq)
        self.register_buffer("w_scale", s)
        self.register_buffer("w_zp", z)
        self.w_axis = axis
        self.branches = branch_channels(act, inner.in_channels)
        self.whole = len(self.branches) == 1
        for g, idx in self.branches:
            params = [group_params(act.ranges[t][g : g + 1], bits, config, act.axis[t]) for t in range(n)]
            xs = torch.stack([p[0].reshape(()) for p in params]).float()
            xz = torch.stack([p[1].reshape(()) for p in params])
            self.qmin, self.qmax = params[0][2], params[0][3]
            outs = [group_params(out.ranges[t][g : g + 1], OUTPUT_BITS, config, LAYER) for t in range(n)]
            self.register_buffer(f"b{g}_idx", idx)
            self.register_buffer(f"b{g}_w", q_full[:, idx].contiguous())
            self.register_buffer(f"b{g}_xs", xs)
            self.register_buffer(f"b{g}_xz", xz.to(torch.uint8))
            self.register_buffer(f"b{g}_ys", torch.stack([o[0].reshape(()) for o in outs]).float())
            self.register_buffer(f"b{g}_yz", torch.stack([o[1].reshape(()) for o in outs]).to(torch.uint8))
            if (self.qmin, self.qmax) != (0, 255):  # bounds of x on the narrower grid
                self.register_buffer(f"b{g}_lo", ((self.qmin - xz) * xs).float())
                self.register_buffer(f"b{g}_hi", ((self.qmax - xz) * xs).float())

    def _pick(self, name: str, slot) -> torch.Tensor:
        return _at_slot(getattr(self, name), self.n_slots, slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.ctx.current()
        x = _f32(x)
        out = None
        for g, _ in self.branches:
            xg = x if self.whole else torch.index_select(x, 1, getattr(self, f"b{g}_idx"))
            if (self.qmin, self.qmax) != (0, 255):
                xg = torch.minimum(torch.maximum(xg, self._pick(f"b{g}_lo", slot)), self._pick(f"b{g}_hi", slot))
            xg = QDQ.apply(xg, self._pick(f"b{g}_xs", slot), self._pick(f"b{g}_xz", slot), None)
            w = WeightDQ.apply(getattr(self, f"b{g}_w"), self.w_scale, self.w_zp, self.w_axis, None)
            y = F.conv2d(xg, w, None, *self.conv_args)
            y = QDQ.apply(y, self._pick(f"b{g}_ys", slot), self._pick(f"b{g}_yz", slot), None)
            out = y if out is None else out + y
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def summary(self) -> SiteSummary:
        return SiteSummary(
            self.name,
            "branches",
            {
                "branches": [{"channels": int(i.numel()), "bits": self.bits} for _, i in self.branches],
                "slots": self.n_slots,
                "quantized_output": True,
            },
        )


class OrtLinearLayer(FaithfulLayer):
    """``onnxruntime`` Linear: Q/DQ'd input, then MatMul with an (in, out) DQ'd int8 weight (per
    output column) and the bias as an Add, the form ONNX Runtime fuses into MatMulIntegerToFloat
    (a Transpose between the weight's DQ and the MatMul would leave a weight-only MatMulNBits)."""

    def __init__(self, name: str, inner: nn.Module, wq: WeightQuant | None, act: nn.Module | None, ctx: StepContext):
        super().__init__(name, inner, wq, act, ctx)
        if self.wbits is None:
            self.w_float = self.w_float.t().contiguous()
        else:
            if self.w_axis == 1:
                raise LoweringError(
                    f"{name}: block-wise weights cannot feed MatMulIntegerToFloat; use per-channel weights"
                )
            self.w_q = self.w_q.t().contiguous()
            self.w_axis = None if self.w_axis is None else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x, self.ctx.current())
        y = torch.matmul(_f32(x), self.weight())
        return y if self.bias is None else y + self.bias


# ---------------------------------------------------------------------------- the UNet


class QuantUNetForExport(nn.Module):
    """``(sample, timestep, encoder_hidden_states[, text_embeds, time_ids][, step_index]) -> noise_pred``:
    the lowered UNet; ``step_index`` selects the recipe's per-step parameters."""

    def __init__(self, unet: nn.Module, ctx: StepContext, n_slots: int):
        super().__init__()
        self.unet, self.ctx, self.n_slots = unet, ctx, n_slots
        self.sdxl = unet.config.get("addition_embed_type") == "text_time"

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        for m in self.unet.modules():
            if isinstance(m, _Slotted):
                m.clear_memo()
        rest = list(rest)
        step = rest.pop() if self.n_slots > 1 else 0
        self.ctx.slot = step
        added = {"text_embeds": rest[0], "time_ids": rest[1]} if self.sdxl else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


@dataclass
class Lowered:
    module: QuantUNetForExport
    sites: list[SiteSummary]
    n_slots: int


def lower(unet: nn.Module, recipe: Recipe, target: str) -> Lowered:
    """A copy of ``unet`` with every quantized site replaced by its lowering for ``target``."""
    if target not in TARGETS:
        raise LoweringError(f"target {target!r} is not one of {list(TARGETS)}")
    config = recipe.config
    if target == "tensorrt" and config.profile != "tensorrt":
        raise LoweringError(
            "the tensorrt target needs a recipe calibrated with --profile tensorrt "
            f"(symmetric, one grouping across steps); this recipe's profile is {config.profile!r}"
        )
    if (target == "onnxruntime") != (config.profile == "onnxruntime"):
        raise LoweringError(
            f"the {target} target cannot run a recipe calibrated with --profile {config.profile} "
            "(the onnxruntime target and profile go together: quantized conv outputs, uint8 zero points on the grid)"
        )
    recipe.check_model(unet)
    unet = copy.deepcopy(unet).float().eval()
    ctx = StepContext()
    sites: list[SiteSummary] = []
    known = {n for n, _ in unet.named_modules()}
    for key in recipe.weights:
        if key not in known:
            raise LoweringError(f"recipe layer {key!r} is not in this UNet")
    siblings: dict[str, list[tuple[ActQuant, nn.Module]]] = {}

    def act_module(cls, site, act: ActQuant) -> tuple[nn.Module, bool]:
        """The site's input quantizer; q/k/v projections of one attention block whose recipe entries
        are equal (the same tensor's statistics) share one module, hence one Q/DQ in the graph."""
        parent, _, leaf = site.name.rpartition(".")
        group = siblings.setdefault(parent, []) if leaf in QKV_PROJECTIONS else []
        for other, m in group:
            if type(m) is cls and _same_act(other, act):
                return m, True
        m = cls(site.input_key, act, config.abits, config)
        group.append((act, m))
        return m, False

    for site in layer_sites(unet, config):
        module = unet.get_submodule(site.name)
        wq = recipe.weights.get(site.name)
        act = recipe.acts.get(site.input_key)
        if wq is None and act is None:
            continue
        if target == "onnxruntime" and act is not None and isinstance(module, nn.Conv2d):
            new = OrtConvLayer(site.name, module, wq, act, recipe.outputs.get(site.name), config.abits, config, ctx)
            sites.append(new.summary())
        elif target in ("faithful", "onnxruntime"):
            aq, shared = (None, False) if act is None else act_module(FaithfulActQuant, site, act)
            cls = OrtLinearLayer if target == "onnxruntime" and isinstance(module, nn.Linear) else FaithfulLayer
            new = cls(site.name, module, wq, aq, ctx)
            if aq is not None:
                sites.append(_shared_summary(aq, site.input_key) if shared else aq.summary())
        elif act is not None and set(act.axis) == {CHANNEL} and act.k(0) > 1:
            new = BranchedLayer(site.name, module, wq, act, config.abits, config, ctx)
            sites.append(new.summary())
        else:
            aq, shared = (None, False) if act is None else act_module(UnitScaleActQuant, site, act)
            new = UnitLayer(site.name, module, wq, aq, ctx)
            if aq is not None:
                sites.append(_shared_summary(aq, site.input_key) if shared else aq.summary())
        if wq is not None:
            sites.append(
                SiteSummary(site.name, "weight", {"bits": wq.bits, "granularity": wq.granularity, "block": wq.block})
            )
        set_module(unet, site.name, new)
    processors = dict(unet.attn_processors)
    act_cls = UnitScaleActQuant if target == "tensorrt" else FaithfulActQuant
    holders = nn.ModuleDict()
    for site in attention_sites(unet, config):

        def act(role, site=site):
            a = recipe.acts.get(site.key(role))
            if a is None:
                return None
            m = act_cls(site.key(role), a, config.abits, config)
            holders[site.key(role).replace(".", "__")] = m
            sites.append(m.summary())
            return m

        probs = recipe.probs.get(site.key("probs"))
        if probs is not None:
            sites.append(
                SiteSummary(site.key("probs"), "probs", {"kind": config.attn_probs, "scale": config.attn_scale})
            )
        processors[f"{site.name}.processor"] = DGQAttnProcessor(
            ctx,
            q=act("q"),
            k=act("k"),
            v=act("v"),
            probs=None if probs is None else ProbsFakeQuant(probs, config),
            keep_bos=config.bos_fp,
        )
    unet.set_attn_processor(processors)
    unet.dgq_act_quant = holders  # registered so their buffers move and trace with the UNet
    n_slots = len(recipe.slots) if config.time_aware else 1
    return Lowered(QuantUNetForExport(unet, ctx, n_slots), sites, n_slots)


QKV_PROJECTIONS = ("to_q", "to_k", "to_v")


def _same_act(a: ActQuant, b: ActQuant) -> bool:
    return (
        a.layout == b.layout
        and a.axis == b.axis
        and all(torch.equal(x, y) for x, y in zip(a.group_index, b.group_index, strict=True))
        and all(torch.equal(x, y) for x, y in zip(a.ranges, b.ranges, strict=True))
    )


def _shared_summary(m: nn.Module, key: str) -> SiteSummary:
    return SiteSummary(key, "shared_act", {"shares": m.key})


def site_counts(sites: list[SiteSummary]) -> dict[str, int]:
    c = Counter(s.kind for s in sites)
    c["branch_layers"] = sum(1 for s in sites if s.kind == "branches")
    c["branches"] = sum(len(s.detail["branches"]) for s in sites if s.kind == "branches")
    return dict(c)
