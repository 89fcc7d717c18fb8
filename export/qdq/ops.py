"""The inserter and what every lowering module shares.

``QDQ`` / ``WeightDQ`` are ``torch.autograd.Function`` s with an ONNX ``symbolic``: in PyTorch they
compute the quantizer's numbers, in the traced graph they are a QuantizeLinear -> DequantizeLinear
pair (or a DequantizeLinear of an integer initializer). Every lowering module writes its nodes
through them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import DGQError
from dgq.attention import StepContext
from dgq.plan import INT8_GRID, WeightPlan
from dgq.quant import along, as_dtype, integer_range

STEP_INPUT = "step_index"
ONE = torch.ones(())
ZERO_I8 = torch.zeros((), dtype=torch.int8)


class LoweringError(DGQError, ValueError):
    """A recipe or layer that the chosen export target cannot express."""


class QDQ(torch.autograd.Function):
    """QuantizeLinear -> DequantizeLinear: ``(clamp(round(x / s) + z) - z) * s`` on the zero point's
    integer grid (uint8, int8 or int16), per tensor (``axis=None``) or per ``axis``. ``scale``
    float32, ``zero_point`` of the same shape (0-d, or 1-D along ``axis``)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, axis):
        qmin, qmax = integer_range(zero_point.dtype)
        s = along(scale, x.ndim, axis)
        z = along(zero_point.float(), x.ndim, axis)
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
        return (q.float() - along(zero_point.float(), q.ndim, axis)) * along(scale, q.ndim, axis)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis, block):
        kw = {} if axis is None else {"axis_i": axis}
        if block is not None:
            kw["block_size_i"] = block
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


class Quantize(torch.autograd.Function):
    """QuantizeLinear alone, per tensor: the integers ``clamp(round(x / s) + z)`` in the zero
    point's dtype (the input of :class:`IntegerMatMul`)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point):
        qmin, qmax = integer_range(zero_point.dtype)
        return torch.clamp(torch.round(x / scale) + zero_point.float(), qmin, qmax).to(zero_point.dtype)

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        return g.op("QuantizeLinear", x, scale, zero_point)


class IntegerMatMul(torch.autograd.Function):
    """``x @ w + bias`` of a per-tensor quantized input ``q`` (scale ``s``, zero point ``z``) and an
    (in, out) integer weight ``wq`` (per output column, ``w_axis`` 1, or per tensor, None).

    In PyTorch: the Q/DQ form's numbers, op for op (``(q - z) * s`` is its DQ, the weight's is
    ``WeightDQ``'s, then the same matmul and bias add), so a lowering through it equals the
    simulator bit for bit. In the graph: MatMulInteger -> Cast -> Mul by ``s * ws`` -> Add of the
    bias, the pattern ONNX Runtime fuses into one MatMulIntegerToFloat *with* its bias (a DQ'd MatMul
    fuses without it, leaving an Add over the whole output: 8 ms of a 350 ms SD-shaped UNet call)."""

    @staticmethod
    def forward(ctx, q, s, z, wq, ws, wz, w_axis, bias):
        x = (q.float() - z.float()) * s
        y = torch.matmul(x, WeightDQ.forward(None, wq, ws, wz, w_axis, None))
        return y if bias is None else y + bias

    @staticmethod
    def symbolic(g, q, s, z, wq, ws, wz, w_axis, bias):
        acc = g.op("MatMulInteger", q, wq, z, wz)
        y = g.op("Mul", g.op("Cast", acc, to_i=1), g.op("Mul", s, ws))  # a_scale first, then b_scale
        return y if bias is None or bias.node().mustBeNone() else g.op("Add", y, bias)


def f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32 without a no-op Cast node in the trace (a Cast between a DQ and its
    MatMul/Conv is one more node the runtimes' Q/DQ fusions must look through)."""
    return as_dtype(x, torch.float32)


def zp_dtype(signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


def unit_grid(u: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Signed Q/DQ with scale 1 of a tensor already divided by its scale; a grid narrower than
    int8 is clipped to first (ONNX has no 6-bit type: the narrower quantizer, exactly)."""
    if (qmin, qmax) != INT8_GRID:
        u = torch.clamp(u, float(qmin), float(qmax))
    return QDQ.apply(u, ONE, ZERO_I8, None)


@dataclass
class SiteSummary:
    """What one lowering module wrote, for the export summary."""

    key: str
    kind: str  # "act", "weight", "branches", "shared_act", "probs"
    detail: dict = field(default_factory=dict)


def at_slot(table: torch.Tensor, n_slots: int, slot) -> torch.Tensor:
    """Row ``slot`` of a per-step table (a Gather by ``step_index`` in the graph); row 0 with one slot."""
    return table[0] if n_slots == 1 else table[slot]


def at_slot_along(table: torch.Tensor, n_slots: int, slot, ndim: int, dim: int | None) -> torch.Tensor:
    """Row ``slot`` of a per-step table ``(S, n)``, shaped to broadcast against an ``ndim`` tensor
    along ``dim`` (``n == 1`` or ``dim`` None: every axis 1). The table is reshaped before the lookup
    (the exporter folds that into the initializer), so the graph has a Gather and no Reshape, and
    TensorRT's parser adds no broadcast layer."""
    shape = [1] * ndim
    if dim is not None:
        shape[dim] = -1
    return at_slot(table.reshape(n_slots, *shape), n_slots, slot)


def unit_quantize(
    x: torch.Tensor, mult: torch.Tensor, scale: torch.Tensor, n_slots: int, slot, dim: int, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A folded ``tensorrt``-profile input (``ActPlan.unit_domain``): ``(Q/DQ(x * m[step]) on the unit
    grid, s[step])`` from the ``(S, C)`` multiplier and ``(S, 1)`` scale tables, ``m`` along ``dim``;
    the simulator's ``ActFakeQuant._unit_domain`` op for op (times ``s``)."""
    m = at_slot_along(mult, n_slots, slot, x.ndim, dim)
    return unit_grid(x * m, qmin, qmax), at_slot_along(scale, n_slots, slot, x.ndim, None)


def _same(a, b) -> bool:
    return a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)


class Slotted(nn.Module):
    """Buffers with a leading slot dim, looked up by the step index (a tensor while tracing)."""

    def __init__(self, n_slots: int):
        super().__init__()
        self.n_slots = n_slots

    def pick(self, name: str, slot) -> torch.Tensor:
        return at_slot(getattr(self, name), self.n_slots, slot)

    # One quantizer shared by sibling layers that read the same tensor (q/k/v projections): the
    # first call of a UNet forward computes the Q/DQ, the siblings reuse it, so the graph has one
    # Q/DQ pair that feeds three GEMMs. A hit needs the same tensor *and* the same slot.
    def memo(self, what: str, x: torch.Tensor, slot, compute):
        memo = self.__dict__.setdefault("_memo", {})
        hit = memo.get(what)
        if hit is not None and hit[0] is x and _same(hit[1], slot):
            return hit[2]
        out = compute()
        memo[what] = (x, slot, out)
        return out

    def clear_memo(self) -> None:
        self.__dict__.pop("_memo", None)


class LoweredLayer(nn.Module):
    """Common part of a lowered Conv2d/Linear: the module's hyper-parameters and float bias.

    Subclasses are registered per (target, layer kind) in ``export.qdq.lower``; ``accepts(plan)``
    says whether the class lowers that layer; ``act_quantizer`` is the activation quantizer module
    class it takes (built and shared by ``lower``), or None when it reads its input plan itself."""

    act_quantizer: type | None = None

    @classmethod
    def accepts(cls, plan) -> bool:
        return True

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

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return y
        return y + (self.bias.view(1, -1, 1, 1) if self.is_conv else self.bias)


def integer_weight(plan: WeightPlan, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(integers, scale float32, zero point int8/uint8)`` of a float weight, ONNX layout."""
    g = plan.grid
    return plan.integers(w), plan.dq_scale, g.zero_point.to(zp_dtype(g.signed))
