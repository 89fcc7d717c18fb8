"""Names and defaults every layer agrees on.

Target names: a recipe is calibrated for a ``profile`` (one of ``QUANT_TARGETS``) and exported for a
target of the same name; ``float`` exports the float graphs only. The manifest of an export folder
records the target, so the runtime reads the same names.
"""

from __future__ import annotations

# The paper's semantics (reference graph), what TensorRT executes, what ONNX Runtime's CPU integer
# kernels run.
QUANT_TARGETS = ("faithful", "tensorrt", "onnxruntime")
TARGETS = ("float", *QUANT_TARGETS)

# Classifier-free guidance scale of every default (calibration, generation, evaluation, runtime). The
# built-in default model was trained and measured at 5 (every guidance-dependent figure in the README
# uses 5), and calibrating at the guidance one generates with keeps the recorded activation ranges
# those of inference.
DEFAULT_GUIDANCE = 5.0

# DGQ's K by default: 16 groups where groups are per-element scales (the faithful target, the paper's
# setting), 4 where every group of a channel-grouped layer is a branch of the graph (tensorrt and
# onnxruntime targets: each branch is a GEMM of its own; README, what the branches cost).
FAITHFUL_GROUPS = 16
BRANCH_GROUPS = 4

# Sampler steps when none are given (a quantized export's own calibration steps win over it).
DEFAULT_STEPS = 25

# The ONNX opsets the exporter is tested at: 17 (the default, at which the float and TensorRT graphs
# are compared with PyTorch) through 21 (INT4 tensors, block-wise DequantizeLinear and the INT16 zero
# points of the faithful target need it). Outside it the legacy exporter fails with a traceback (below
# 7, above 21) or writes graphs nothing here was checked against.
SUPPORTED_OPSETS = (17, 18, 19, 20, 21)

__all__ = [
    "BRANCH_GROUPS",
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "FAITHFUL_GROUPS",
    "QUANT_TARGETS",
    "SUPPORTED_OPSETS",
    "TARGETS",
]
