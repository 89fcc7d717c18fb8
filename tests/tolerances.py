"""All parity tolerances of the project live here.

Each constant names the comparison it bounds; tests import them instead of writing numbers inline.
"""

# --- quantizer primitives (parity ladder rung 1) ---------------------------------------------------
# Primitives against naive element-by-element references and against ONNX Runtime's
# QuantizeLinear/DequantizeLinear with graph optimizations off: bit-exact.
PRIMITIVE_EXACT_ATOL = 0.0
# A constant group (max == min) quantizes with the 1e-8 scale floor; its reconstruction is exact up
# to float32 rounding of value / 1e-8 and back.
CONSTANT_GROUP_RTOL = 1e-6

# Outlier injection (a few channels 100x larger), 8-bit asymmetric activations: SQNR in dB of the
# regular channels when the outlier channels have their own group, and the ceiling per-tensor
# quantization stays under on the same channels.
OUTLIER_GROUPED_MIN_SQNR_DB = 30.0
OUTLIER_PER_TENSOR_MAX_SQNR_DB = 10.0
