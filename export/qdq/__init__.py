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

The numbers come from the recipe's plan (``dgq.plan``), the same objects the simulator reads.
The package, by job: ``ops`` (the inserter, shared helpers), ``faithful``, ``tensorrt``,
``onnxruntime`` (one module per target's lowering classes), ``lower`` (the registry from (target,
layer kind) to lowering class, the lowered UNet).

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
  need a constant scale). Linear layers: a per-step per-tensor uint8 QuantizeLinear feeding
  MatMulInteger with the (in, out) int8 weight, Cast, the scales' Mul and the bias Add, which fuses
  into one MatMulIntegerToFloat with the bias inside. Weights stay in INT8 containers
  (4-bit values included): the integer kernels take int8.

Weights are integer initializers (int8/uint8, or int4/uint4 at opset >= 21) with a
DequantizeLinear (the onnxruntime target's Linears: read by MatMulInteger directly), so the file
holds 1 byte (or half a byte) per weight. The ``step_index`` input is
added only when the recipe has more than one timestep slot.
"""

from export.qdq.faithful import FaithfulActQuant, FaithfulLayer
from export.qdq.lower import LOWERINGS, TARGETS, Lowered, QuantUNetForExport, lower, lowering_for, site_counts
from export.qdq.onnxruntime import OrtConvLayer, OrtLinearLayer
from export.qdq.ops import QDQ, STEP_INPUT, LoweredLayer, LoweringError, SiteSummary, Slotted, WeightDQ
from export.qdq.tensorrt import BranchedLayer, FoldedActQuant, FoldedLayer, UnitLayer, UnitScaleActQuant

__all__ = [
    "LOWERINGS",
    "QDQ",
    "STEP_INPUT",
    "TARGETS",
    "BranchedLayer",
    "FaithfulActQuant",
    "FaithfulLayer",
    "FoldedActQuant",
    "FoldedLayer",
    "Lowered",
    "LoweredLayer",
    "LoweringError",
    "OrtConvLayer",
    "OrtLinearLayer",
    "QuantUNetForExport",
    "SiteSummary",
    "Slotted",
    "UnitLayer",
    "UnitScaleActQuant",
    "WeightDQ",
    "lower",
    "lowering_for",
    "site_counts",
]
