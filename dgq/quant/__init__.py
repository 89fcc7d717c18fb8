"""Quantizer math on tensors: primitives (ONNX-exact affine, log2, range searches) and the DGQ grouping search."""

from dgq.quant.grouping import (
    CHANNEL,
    LAYER,
    LAYOUTS,
    PIXEL,
    AxisStats,
    ConvGeometry,
    GroupingResult,
    axis_minmax,
    axis_spread,
    choose_axis,
    group_ranges,
    kmeans_groups,
    search_groups,
)
from dgq.quant.primitives import (
    SCALE_FLOOR,
    SUPPORTED_BITS,
    affine_params_from_range,
    dequantize_affine,
    fake_log2_quantize,
    fake_quantize_affine,
    log2_dequantize,
    log2_quantize,
    minmax_range,
    mse_search_range,
    quant_range,
    quantize_affine,
    symmetric_scale_from_absmax,
)

__all__ = [
    "CHANNEL", "LAYER", "LAYOUTS", "PIXEL", "SCALE_FLOOR", "SUPPORTED_BITS",
    "AxisStats", "ConvGeometry", "GroupingResult",
    "affine_params_from_range", "axis_minmax", "axis_spread", "choose_axis", "dequantize_affine",
    "fake_log2_quantize", "fake_quantize_affine", "group_ranges", "kmeans_groups", "log2_dequantize",
    "log2_quantize", "minmax_range", "mse_search_range", "quant_range", "quantize_affine",
    "search_groups", "symmetric_scale_from_absmax",
]
