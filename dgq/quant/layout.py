"""Where a quantizer's axes lie in its input tensor: one definition for the statistics of
calibration (``grouping.AxisStats``), the simulator and every export target.

The two candidate axes of an input (plus ``layer``, one range for the whole tensor):

* ``conv`` ``(B, C, H, W)``: channel = dim 1; pixel = the ``H*W`` positions, on the
  ``(B, C, H*W)`` view (``quant_view``), dim 2;
* ``linear`` ``(B, N, C)`` or ``(B, C)``, and q/k/v ``(B*heads, N, d)``: channel = the last dim;
  pixel/token = dim 1.
"""

from __future__ import annotations

from torch import Tensor

CHANNEL, PIXEL, LAYER = "channel", "pixel", "layer"
CONV_LAYOUT = "conv"


def quant_view(x: Tensor, layout: str, axis: str) -> Tensor:
    """``x`` as its quantizer sees it: a conv input grouped per pixel is flattened to (B, C, H*W)."""
    return x.flatten(2) if layout == CONV_LAYOUT and axis == PIXEL else x


def axis_dim(layout: str, axis: str, ndim: int) -> int | None:
    """The dim of ``quant_view``'s result that per-element parameters of ``axis`` run along (None
    for ``layer``); ``ndim`` is that view's rank."""
    if axis == LAYER:
        return None
    if layout == CONV_LAYOUT:
        return 1 if axis == CHANNEL else 2
    return ndim - 1 if axis == CHANNEL else 1


def along(t: Tensor, ndim: int, dim: int | None) -> Tensor:
    """A 1-D per-element tensor shaped to broadcast along ``dim`` of an ``ndim``-D tensor."""
    if dim is None:
        return t
    shape = [1] * ndim
    shape[dim] = -1
    return t.reshape(shape)
