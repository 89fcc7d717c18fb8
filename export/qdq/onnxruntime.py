"""The ``onnxruntime`` target: the node patterns ONNX Runtime's CPU integer kernels fuse.

Every quantized conv is one QLinearConv node unit on its input times ``1 / fold scale`` per channel
(the channel groups folded into the weight columns, ``fold_conv``), or a sum of branches, one per
input-channel group (one branch for a layer-wise site), each a whole QLinearConv node unit: uint8
Q/DQ of the group with the step's scale and zero point (Gathered from per-step tables: ONNX Runtime
fuses those), the DQ'd int8 weight slice, the conv without bias, and a uint8 Q/DQ of the branch's
calibrated per-step output range; the float bias is added after the sum (a bias inside the unit
would need a constant scale). Linear layers: a per-step per-tensor uint8 QuantizeLinear feeding
MatMulInteger with the (in, out) int8 weight, then Cast, Mul by the two scales and the bias Add,
which ONNX Runtime fuses into one MatMulIntegerToFloat that adds the bias itself.
Weights stay in INT8 containers (4-bit values included): the integer kernels take int8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgq.attention import StepContext
from dgq.plan import UINT8_GRID, LayerPlan
from dgq.recipe import RecipeError
from export.qdq.faithful import FaithfulLayer
from export.qdq.ops import (
    QDQ,
    IntegerMatMul,
    LoweredLayer,
    LoweringError,
    SiteSummary,
    WeightDQ,
    at_slot,
    f32,
    integer_weight,
)


class OrtConvLayer(LoweredLayer):
    """``onnxruntime`` Conv2d (:class:`dgq.simulate.BranchConvLayer` lowered): per input-channel
    group a whole QLinearConv node unit, the branches summed in float, then the float bias; a folded
    input is one unit on ``x * (1 / fold scale)``.

    Branch g: Gather the group's channels (none for a single branch) -> uint8 Q/DQ with the step's
    scale and zero point (Gather of a per-step table by ``step_index``) -> Conv with the DQ'd int8
    weight slice (per output channel, zero points 0) and no bias -> uint8 Q/DQ with the branch's
    per-step output range. ONNX Runtime fuses each branch into QLinearConv; it does not fuse a unit
    with a bias whose scale is not a constant, so the bias is added after the sum.
    """

    @classmethod
    def accepts(cls, plan: LayerPlan) -> bool:
        return plan.branch_outputs

    def __init__(self, plan: LayerPlan, inner: nn.Module, ctx: StepContext, act: nn.Module | None = None):
        super().__init__(plan.name, inner, ctx)
        wp = plan.weight
        if wp is None or not wp.grid.signed or wp.granularity == "block":
            raise LoweringError(
                f"{plan.name}: the onnxruntime target needs symmetric per-channel or per-tensor int8 conv weights"
            )
        if plan.output is None:
            raise LoweringError(
                f"{plan.name}: the recipe has no output ranges for this conv (calibrate with --profile onnxruntime)"
            )
        try:
            self.branches = plan.input.branches(inner.in_channels)
        except RecipeError as err:
            raise LoweringError(f"{err}; calibrate with --profile onnxruntime") from err
        self.n_slots, self.bits = plan.input.n_slots, plan.input.bits
        q_full, s, z = integer_weight(wp, inner.weight.detach().float())
        self.register_buffer("w_scale", s)
        self.register_buffer("w_zp", z)
        self.w_axis = wp.axis
        self.whole = len(self.branches) == 1
        # A folded input (dgq.plan.Fold, no centre) is one branch on x * (1 / fold.scale): a Mul in
        # front of the unit's QuantizeLinear. (A per-channel QuantizeLinear would need no Mul, but ONNX
        # Runtime moves it into NHWC, where its per-channel loop is several times slower than the Mul.)
        fold = plan.input.fold
        self.folded = fold is not None
        if self.folded and (fold.centred or not self.whole):
            raise LoweringError(f"{plan.name}: a folded conv input is one branch with no centre")
        self.register_buffer("fold_inverse", fold.inverse.view(1, -1, 1, 1) if self.folded else None)
        out = plan.output
        # normalized outputs: w_scale above is divided by these per output channel; multiplied back
        self.register_buffer(
            "out_channel_scale", None if out.channel_scale is None else out.channel_scale.float().view(1, -1, 1, 1)
        )
        for b in self.branches:
            g = b.group
            self.register_buffer(f"b{g}_idx", b.index)
            self.register_buffer(f"b{g}_w", q_full[:, b.index].contiguous())
            self.register_buffer(f"b{g}_xs", b.scale.float())
            self.register_buffer(f"b{g}_xz", b.zero_point.to(torch.uint8))
            self.register_buffer(f"b{g}_ys", out.scale[:, g].float())
            self.register_buffer(f"b{g}_yz", out.zero_point[:, g].to(torch.uint8))
            if (b.qmin, b.qmax) != UINT8_GRID:  # bounds of x on the narrower grid
                self.register_buffer(f"b{g}_lo", ((b.qmin - b.zero_point) * b.scale).float())
                self.register_buffer(f"b{g}_hi", ((b.qmax - b.zero_point) * b.scale).float())

    def _pick(self, name: str, slot) -> torch.Tensor:
        return at_slot(getattr(self, name), self.n_slots, slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slot = self.ctx.current()
        x = f32(x)
        out = None
        for b in self.branches:
            g = b.group
            xg = x if self.whole else torch.index_select(x, 1, getattr(self, f"b{g}_idx"))
            if self.folded:
                xg = xg * self.fold_inverse
            if (b.qmin, b.qmax) != UINT8_GRID:
                xg = torch.minimum(torch.maximum(xg, self._pick(f"b{g}_lo", slot)), self._pick(f"b{g}_hi", slot))
            xg = QDQ.apply(xg, self._pick(f"b{g}_xs", slot), self._pick(f"b{g}_xz", slot), None)
            w = WeightDQ.apply(getattr(self, f"b{g}_w"), self.w_scale, self.w_zp, self.w_axis, None)
            y = F.conv2d(xg, w, None, *self.conv_args)
            y = QDQ.apply(y, self._pick(f"b{g}_ys", slot), self._pick(f"b{g}_yz", slot), None)
            out = y if out is None else out + y
        if self.out_channel_scale is not None:
            out = out * self.out_channel_scale
        return self._add_bias(out)

    def summary(self) -> SiteSummary:
        return SiteSummary(
            self.name,
            "branches",
            {
                "branches": [{"channels": int(b.index.numel()), "bits": self.bits} for b in self.branches],
                "slots": self.n_slots,
                "quantized_output": True,
                "normalized_output": self.out_channel_scale is not None,
                "folded": self.folded,
            },
        )


class OrtLinearLayer(FaithfulLayer):
    """``onnxruntime`` Linear: the input's per-tensor integers (its shared QuantizeLinear), then
    MatMulInteger with the (in, out) int8 weight, Cast, Mul by the input's and the weight's (per
    output column) scales and the bias Add (:class:`~export.qdq.ops.IntegerMatMul`): ONNX Runtime
    fuses that into one MatMulIntegerToFloat with the bias inside. In PyTorch it computes the
    simulator's Q/DQ numbers op for op. A Linear with a float weight, or a weight-only one, keeps
    the Q/DQ form (MatMul with a DQ'd weight; a Transpose between the weight's DQ and the MatMul
    would leave a weight-only MatMulNBits)."""

    def __init__(self, plan: LayerPlan, inner: nn.Module, ctx: StepContext, act: nn.Module | None = None):
        super().__init__(plan, inner, ctx, act)
        if self.wbits is None:
            self.w_float = self.w_float.t().contiguous()
        else:
            if self.w_axis == 1:
                raise LoweringError(
                    f"{plan.name}: block-wise weights cannot feed MatMulIntegerToFloat; use per-channel weights"
                )
            self.w_q = self.w_q.t().contiguous()
            self.w_axis = None if self.w_axis is None else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None and self.wbits is not None and self.act.per_tensor:
            q, s, z = self.act.quantize(x, self.ctx.current())
            return IntegerMatMul.apply(q, s, z, self.w_q, self.w_scale, self.w_zp, self.w_axis, self.bias)
        # The Q/DQ form. A 2-D input (e.g. the time embedding's, one row per sample) is multiplied as
        # one token per row: ONNX Runtime turns a 2-D MatMul and its bias Add into a float Gemm
        # before its Q/DQ fusions run, and that Gemm would dequantize the whole weight at every call.
        # The Unsqueeze goes before the input's Q/DQ: between the DQ and the MatMul it would leave a
        # weight-only MatMulNBits.
        rows = x.ndim == 2
        if rows:
            x = x.unsqueeze(1)
        if self.act is not None:
            x = self.act(x, self.ctx.current())
        y = torch.matmul(f32(x), self.weight())
        if rows:
            y = y.squeeze(1)
        return y if self.bias is None else y + self.bias
