"""Model + recipe to ONNX: float export of the SD networks and the IO contract they share.

``export.iospec`` imports only numpy, so runtime code on a Jetson can read ``iospec.json``;
``export.float_export`` needs torch and diffusers and is imported on use.
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
