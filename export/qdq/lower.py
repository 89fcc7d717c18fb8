"""Dispatch: a UNet and its recipe's plan -> the lowered UNet of one export target.

A registry maps (target, layer kind) to the lowering classes that may take a layer, in order; the
first whose ``accepts(plan)`` is true lowers it. Attention operands get the target's activation
quantizer module inside :class:`~export.qdq.attention.ExportAttnProcessor` (the simulator's processor,
its data movement traced as compact ONNX).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from common.constants import QUANT_TARGETS
from dgq.attention import StepContext
from dgq.plan import ActPlan, LayerPlan, build_plan
from dgq.recipe import Recipe, RecipeError
from dgq.simulate import ProbsFakeQuant
from dgq.sites import CONV, LINEAR, set_module
from export.qdq.attention import ExportAttnProcessor, check_fusable
from export.qdq.faithful import FaithfulActQuant, FaithfulLayer
from export.qdq.onnxruntime import OrtConvLayer, OrtLinearLayer
from export.qdq.ops import LoweredLayer, LoweringError, SiteSummary, Slotted
from export.qdq.tensorrt import BranchedLayer, FoldedLayer, UnitLayer, UnitScaleActQuant

TARGETS = QUANT_TARGETS

# (target, layer kind) -> lowering classes, tried in order (the first that accepts the layer's plan).
LOWERINGS: dict[tuple[str, str], tuple[type[LoweredLayer], ...]] = {
    ("faithful", CONV): (FaithfulLayer,),
    ("faithful", LINEAR): (FaithfulLayer,),
    ("tensorrt", CONV): (FoldedLayer, BranchedLayer, UnitLayer),
    ("tensorrt", LINEAR): (FoldedLayer, BranchedLayer, UnitLayer),
    ("onnxruntime", CONV): (OrtConvLayer, FaithfulLayer),  # weight-only convs: DQ'd weight, float input
    ("onnxruntime", LINEAR): (OrtLinearLayer,),
}
# The activation quantizer of attention operands (q, k, v) per target.
ATTENTION_QUANTIZERS: dict[str, type[Slotted]] = {
    "faithful": FaithfulActQuant,
    "tensorrt": UnitScaleActQuant,
    "onnxruntime": FaithfulActQuant,
}
QKV_PROJECTIONS = ("to_q", "to_k", "to_v")


def lowering_for(target: str, plan: LayerPlan) -> type[LoweredLayer]:
    for cls in LOWERINGS[(target, plan.kind)]:
        if cls.accepts(plan):
            return cls
    raise LoweringError(f"{plan.name}: no {target} lowering takes this {plan.kind} layer")


class QuantUNetForExport(nn.Module):
    """``(sample, timestep, encoder_hidden_states[, text_embeds, time_ids][, step_index]) -> noise_pred``:
    the lowered UNet; ``step_index`` selects the recipe's per-step parameters."""

    def __init__(self, unet: nn.Module, ctx: StepContext, n_slots: int):
        super().__init__()
        self.unet, self.ctx, self.n_slots = unet, ctx, n_slots
        self.sdxl = unet.config.get("addition_embed_type") == "text_time"

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        for m in self.unet.modules():
            if isinstance(m, Slotted):
                m.clear_memo()
        rest = list(rest)
        # one Cast of the step index for every per-step table lookup (TensorRT's parser would add
        # one per int64 Gather otherwise)
        step = rest.pop().to(torch.int32) if self.n_slots > 1 else 0
        self.ctx.slot = step
        added = {"text_embeds": rest[0], "time_ids": rest[1]} if self.sdxl else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


@dataclass
class Lowered:
    module: QuantUNetForExport
    sites: list[SiteSummary]
    n_slots: int


def _same_quantizer(a: ActPlan, b: ActPlan) -> bool:
    """Two sites that quantize identically (q/k/v projections reading one tensor)."""
    if a.layout != b.layout or a.bits != b.bits or a.n_slots != b.n_slots:
        return False
    if (a.fold is None) != (b.fold is None) or (
        a.fold is not None
        and not (torch.equal(a.fold.scale, b.fold.scale) and torch.equal(a.fold.centre, b.fold.centre))
    ):
        return False
    for x, y in zip(a.slots, b.slots, strict=True):
        if x.axis != y.axis or x.outlier_group != y.outlier_group or not torch.equal(x.group_index, y.group_index):
            return False
        for gx, gy in ((x.grid, y.grid), (x.outlier, y.outlier)):
            if (gx is None) != (gy is None):
                return False
            if gx is not None and not (
                (gx.qmin, gx.qmax) == (gy.qmin, gy.qmax)
                and torch.equal(gx.scale, gy.scale)
                and torch.equal(gx.zero_point, gy.zero_point)
            ):
                return False
    return True


def _check_target(target: str, profile: str) -> None:
    if target not in TARGETS:
        raise LoweringError(f"target {target!r} is not one of {list(TARGETS)}")
    if target == "tensorrt" and profile != "tensorrt":
        raise LoweringError(
            "the tensorrt target needs a recipe calibrated with --profile tensorrt "
            f"(symmetric, one grouping across steps); this recipe's profile is {profile!r}"
        )
    if (target == "onnxruntime") != (profile == "onnxruntime"):
        raise LoweringError(
            f"the {target} target cannot run a recipe calibrated with --profile {profile} "
            "(the onnxruntime target and profile go together: quantized conv outputs, uint8 zero points on the grid)"
        )


def lower(
    unet: nn.Module, recipe: Recipe, target: str, tokens: int | None = None, fused_attention: bool = False
) -> Lowered:
    """A copy of ``unet`` with every quantized site replaced by its lowering for ``target``.

    ``tokens``: the export's (static) text-token count, which lets the BOS split be two Gathers
    (``ExportAttnProcessor``); None keeps it two Slices. ``fused_attention``: every attention block
    as one ONNX Runtime MultiHeadAttention node (the onnxruntime target only; its attention must be
    float)."""
    config = recipe.config
    _check_target(target, config.profile)
    if fused_attention and target != "onnxruntime":
        raise LoweringError(
            f"fused attention is an ONNX Runtime contrib op: the {target} target cannot use it "
            "(it is for the onnxruntime target and float graphs meant for ONNX Runtime)"
        )
    recipe.check_model(unet)
    try:
        plan = build_plan(unet, recipe)
    except RecipeError as err:
        raise LoweringError(str(err)) from err
    if fused_attention:
        if plan.attention:
            raise LoweringError(
                "fused attention keeps attention float, but this recipe quantizes the attention operands of "
                f"{len(plan.attention)} blocks (calibrate without quantize_qkv and with float probabilities)"
            )
        check_fusable(unet.attn_processors)
    unet = copy.deepcopy(unet).float().eval()
    ctx = StepContext()
    sites: list[SiteSummary] = []
    siblings: dict[str, list[tuple[ActPlan, nn.Module]]] = {}

    def act_module(cls: type[Slotted], name: str, act: ActPlan) -> nn.Module:
        """The layer's input quantizer; q/k/v projections of one attention block that quantize
        identically (the same tensor's statistics) share one module, hence one Q/DQ in the graph."""
        parent, _, leaf = name.rpartition(".")
        group = siblings.setdefault(parent, []) if leaf in QKV_PROJECTIONS else []
        for other, m in group:
            if type(m) is cls and _same_quantizer(other, act):
                sites.append(SiteSummary(act.key, "shared_act", {"shares": m.key}))
                return m
        m = cls(act)
        group.append((act, m))
        sites.append(m.summary())
        return m

    for name, lp in plan.layers.items():
        module = unet.get_submodule(name)
        cls = lowering_for(target, lp)
        aq = None
        if cls.act_quantizer is not None and lp.input is not None:
            aq = act_module(cls.act_quantizer, name, lp.input)
        new = cls(lp, module, ctx, aq)
        if cls.act_quantizer is None:
            sites.append(new.summary())
        if cls is FoldedLayer:
            outliers = 0 if aq.outlier_index is None else int(aq.outlier_index.numel())
            sites.append(SiteSummary(name, "folded", {"outlier_channels": outliers}))
        if lp.weight is not None:
            w = lp.weight
            sites.append(SiteSummary(name, "weight", {"bits": w.bits, "granularity": w.granularity, "block": w.block}))
        set_module(unet, name, new)
    processors = dict(unet.attn_processors)
    if fused_attention:
        processors = {name: ExportAttnProcessor(ctx, tokens=tokens, fused=True) for name in processors}
    act_cls = ATTENTION_QUANTIZERS[target]
    holders = nn.ModuleDict()
    for name, ap in plan.attention.items():

        def act(p: ActPlan | None) -> nn.Module | None:
            if p is None:
                return None
            m = act_cls(p)
            holders[p.key.replace(".", "__")] = m
            sites.append(m.summary())
            return m

        if ap.probs is not None:
            sites.append(SiteSummary(f"{name}.probs", "probs", {"kind": ap.probs.kind, "scale": ap.probs.mode}))
        processors[f"{name}.processor"] = ExportAttnProcessor(
            ctx,
            q=act(ap.q),
            k=act(ap.k),
            v=act(ap.v),
            probs=None if ap.probs is None else ProbsFakeQuant(ap.probs),
            keep_bos=ap.keep_bos,
            tokens=tokens,
        )
    unet.set_attn_processor(processors)
    unet.dgq_act_quant = holders  # registered so their buffers move and trace with the UNet
    return Lowered(QuantUNetForExport(unet, ctx, plan.n_slots), sites, plan.n_slots)


def site_counts(sites: list[SiteSummary]) -> dict[str, int]:
    c = Counter(s.kind for s in sites)
    c["branch_layers"] = sum(1 for s in sites if s.kind == "branches")
    c["branches"] = sum(len(s.detail["branches"]) for s in sites if s.kind == "branches")
    return dict(c)
