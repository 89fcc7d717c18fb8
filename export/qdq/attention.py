"""The attention processor the exporter traces: DGQ's own, with its data movement written as the few
ONNX nodes it is.

Traced as written, diffusers' head reshapes read the tensor's shape and rebuild it (Shape, Gather,
Div, Cast, Unsqueeze, Concat before every Reshape), the scores' ``baddbmm`` adds a zero tensor built
from the shapes, and the BOS split is a pair of Slices, which TensorRT's parser expands into shape
arithmetic of its own when the batch is dynamic. Here each is an ``autograd.Function`` whose
``forward`` computes what :class:`~dgq.attention.DGQAttnProcessor` computes (so the lowered UNet
still equals the simulator exactly) and whose ``symbolic`` writes:

- heads to batch: ``Transpose -> Reshape [-1, d, 0] -> Transpose`` (0 keeps the token count);
- batch to heads: ``Transpose -> Reshape [-1, width, 0] -> Transpose``;
- scores: ``MatMul(q, Transpose(k)) -> Mul(scale)``;
- the BOS split: two Gathers with constant int32 indices along the text-token axis, which is
  static in every export (``iospec``: the tokenizer's length).

With ``fused=True`` an attention block whose operands are float (no q/k/v or probability
quantizer, no mask) is traced as one ONNX Runtime ``com.microsoft.MultiHeadAttention`` node from the
projected q, k, v to the merged heads: the same numbers up to float32 rounding, in one kernel that
never writes the scores out (``scripts/ort_attention_kernels.py``). It is a contrib op of ONNX
Runtime, not an ONNX standard one: TensorRT cannot build such a graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from dgq.attention import DGQAttnProcessor, StepContext, scaled_scores
from export.qdq.ops import LoweringError, f32

# The opset of ONNX Runtime's contrib domain a fused graph imports (torch.onnx.export's custom_opsets).
CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_OPSETS = {CONTRIB_DOMAIN: 1}


def _const(g, values, dtype: torch.dtype):
    return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))


class SplitHeads(torch.autograd.Function):
    """``(B, N, heads * d) -> (B * heads, N, d)``, diffusers' ``head_to_batch_dim`` (the module is not
    an argument: a traced Function takes tensors and plain values)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, heads: int, d: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, heads, d).permute(0, 2, 1, 3).reshape(b * heads, n, d)

    @staticmethod
    def symbolic(g, x, heads: int, d: int):
        t = g.op("Transpose", x, perm_i=[0, 2, 1])  # (B, heads * d, N)
        t = g.op("Reshape", t, _const(g, [-1, d, 0], torch.int64))  # (B * heads, d, N)
        return g.op("Transpose", t, perm_i=[0, 2, 1])


class MergeHeads(torch.autograd.Function):
    """``(B * heads, N, d) -> (B, N, heads * d)``, diffusers' ``batch_to_head_dim``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, heads: int, width: int) -> torch.Tensor:
        bh, n, d = x.shape
        return x.reshape(bh // heads, heads, n, d).permute(0, 2, 1, 3).reshape(bh // heads, n, width)

    @staticmethod
    def symbolic(g, x, heads: int, width: int):
        t = g.op("Transpose", x, perm_i=[0, 2, 1])  # (B * heads, d, N)
        t = g.op("Reshape", t, _const(g, [-1, width, 0], torch.int64))  # (B, heads * d, N)
        return g.op("Transpose", t, perm_i=[0, 2, 1])


class Scores(torch.autograd.Function):
    """``scale * q @ k^T`` (float32 q, k), computed as the base processor computes it."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        return scaled_scores(q, k, scale)

    @staticmethod
    def symbolic(g, q, k, scale: float):
        s = g.op("MatMul", q, g.op("Transpose", k, perm_i=[0, 2, 1]))
        return g.op("Mul", s, _const(g, scale, torch.float32))


class Columns(torch.autograd.Function):
    """``x`` at positions ``start .. stop - 1`` of axis ``dim``, whose length must be ``size``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, start: int, stop: int, size: int) -> torch.Tensor:
        if x.shape[dim] != size:
            raise LoweringError(
                f"cross-attention over {x.shape[dim]} text tokens, but the export was lowered for {size}"
            )
        return x.narrow(dim, start, stop - start)

    @staticmethod
    def symbolic(g, x, dim: int, start: int, stop: int, size: int):
        return g.op("Gather", x, _const(g, list(range(start, stop)), torch.int32), axis_i=dim)


class FusedAttention(torch.autograd.Function):
    """Float attention of projected ``(B, N, heads * d)`` q and ``(B, M, heads * d)`` k, v to the
    merged ``(B, N, heads * d)`` output, as the unfused core computes it (split heads, scaled scores,
    softmax, probabilities times v, merge); traced as one ``com.microsoft.MultiHeadAttention``."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        width = q.shape[-1]
        d = width // heads
        qh, kh, vh = (SplitHeads.forward(None, x, heads, d) for x in (q, k, v))
        probs = scaled_scores(qh, kh, scale).softmax(dim=-1)
        return MergeHeads.forward(None, torch.bmm(probs, vh), heads, width)

    @staticmethod
    def symbolic(g, q, k, v, heads: int, scale: float):
        out = g.op(f"{CONTRIB_DOMAIN}::MultiHeadAttention", q, k, v, num_heads_i=heads, scale_f=scale)
        out.setType(q.type())
        return out


class ExportAttnProcessor(DGQAttnProcessor):
    """:class:`~dgq.attention.DGQAttnProcessor` with compact traced data movement (module docstring).

    ``tokens`` is the text-token count of the export; without it the BOS split stays two Slices.
    ``fused``: a block with float operands and no mask is one MultiHeadAttention node (module
    docstring); a block with quantized operands is refused.
    """

    def __init__(self, ctx: StepContext, *hooks, tokens: int | None = None, fused: bool = False, **options) -> None:
        super().__init__(ctx, *hooks, **options)
        self.tokens = tokens
        self.fused = fused
        if fused and any(h is not None for h in (self.q, self.k, self.v, self.probs)):
            raise LoweringError("fused attention keeps attention float; this block quantizes its operands")

    def core(self, attn, query, key, value, attention_mask, slot, is_cross) -> torch.Tensor:
        if not self.fused or attention_mask is not None or attn.inner_dim != attn.inner_kv_dim:
            return super().core(attn, query, key, value, attention_mask, slot, is_cross)
        return FusedAttention.apply(f32(query), f32(key), f32(value), attn.heads, float(attn.scale))

    def split_heads(self, attn: Attention, x: torch.Tensor, width: int) -> torch.Tensor:
        return SplitHeads.apply(x, attn.heads, width // attn.heads)

    def merge_heads(self, attn: Attention, x: torch.Tensor, width: int) -> torch.Tensor:
        return MergeHeads.apply(x, attn.heads, width)

    def scores(self, attn: Attention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return Scores.apply(f32(q), f32(k), float(attn.scale))

    def bos_split(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokens is None:
            return super().bos_split(x, dim)
        n = self.tokens
        return Columns.apply(x, dim, 0, 1, n), Columns.apply(x, dim, 1, n, n)


# Processors whose computation DGQAttnProcessor reproduces (diffusers' plain attention); a UNet with
# any other (qk-norm, added key/values, IP-Adapter...) is refused rather than fused into other numbers.
PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0, DGQAttnProcessor)


def check_fusable(processors: dict) -> None:
    """Refuse fused attention for a UNet with an attention processor the fused trace does not reproduce."""
    other = sorted({type(p).__name__ for p in processors.values() if not isinstance(p, PLAIN_PROCESSORS)})
    if other:
        raise LoweringError(
            f"fused attention reproduces diffusers' plain attention only; this UNet has {other} processors "
            "(export without fused attention)"
        )


def fusion_blocker(unet: torch.nn.Module, config=None) -> str | None:
    """Why ``unet`` (lowered with a recipe of ``config``; None: float) cannot take fused attention,
    or None where it can: the same conditions ``lower`` and ``fused_attention`` refuse on."""
    from dgq.sites import attention_sites

    if config is not None and attention_sites(unet, config):
        return "the recipe quantizes attention operands"
    try:
        check_fusable(unet.attn_processors)
    except LoweringError as err:
        return str(err)
    return None


@contextmanager
def fused_attention(unet: torch.nn.Module, ctx: StepContext | None = None) -> Iterator[torch.nn.Module]:
    """``unet`` with every attention block on a fused :class:`ExportAttnProcessor` (float operands),
    its own processors put back on exit: for tracing a float graph meant for ONNX Runtime."""
    saved = dict(unet.attn_processors)
    check_fusable(saved)
    if ctx is None:
        ctx = StepContext()
        ctx.slot = 0  # float operands: the slot picks nothing
    try:
        unet.set_attn_processor({name: ExportAttnProcessor(ctx, fused=True) for name in saved})
        yield unet
    finally:
        unet.set_attn_processor(saved)
