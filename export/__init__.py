"""Model + recipe to ONNX: float export of the SD networks, the Q/DQ export of a DGQ recipe, the
TensorRT rule lint, and the IO contract and manifest the runtime reads.

- :mod:`export.iospec` (numpy only) and :mod:`export.manifest` (stdlib only): what a runtime on a
  device reads; imported here.
- :mod:`export.float_export`, :mod:`export.qdq` (lowering modules), :mod:`export.qdq_export`
  (``export_onnx``), :mod:`export.lint`, :mod:`export.parity` (per-layer graph vs lowering, first
  divergence), :mod:`export.cli` need torch/diffusers/onnx and are imported on use.
"""

from export.iospec import (
    Dim,
    FeedError,
    NetworkSpec,
    TensorSpec,
    read_specs,
    specs_from_json,
    specs_to_json,
    text_encoder_spec,
    unet_spec,
    vae_decoder_spec,
)

__all__ = [
    "Dim",
    "FeedError",
    "NetworkSpec",
    "TensorSpec",
    "read_specs",
    "specs_from_json",
    "specs_to_json",
    "text_encoder_spec",
    "unet_spec",
    "vae_decoder_spec",
]
