"""Where an exported graph departs from its PyTorch lowering: per-layer comparison, first divergence.

``layer_divergence(lowered, onnx_path, inputs)`` runs the lowered UNet in PyTorch with forward
hooks on every lowered Conv2d/Linear, exposes the matching tensors of the ONNX graph as extra
outputs (a layer's tensor is the output of the last node the exporter put under the layer's scope,
``/unet/down_blocks.0/resnets.0/conv1/...``), runs ONNX Runtime with optimizations off, and returns
the SQNR of every layer in execution order (:func:`dgq.eval.metrics.sqnr_db`). ``first_divergence``
(:func:`dgq.eval.metrics.first_divergence`, exported here too) names the first layer below a threshold: the
place to look when a whole-graph parity check fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from dgq.eval.metrics import first_divergence, sqnr_db


@dataclass
class LayerParity:
    name: str  # module name in the UNet
    tensor: str  # ONNX tensor compared
    sqnr_db: float


def module_scope(name: str) -> str:
    """The TorchScript exporter's node-name prefix of UNet module ``name``: "a.0.b" -> "/unet/a.0/b/"."""
    parts: list[str] = []
    for p in name.split("."):
        if p.isdigit() and parts:
            parts[-1] += "." + p
        else:
            parts.append(p)
    return "/unet/" + "/".join(parts) + "/"


def layer_tensors(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """Module name -> the output tensor of the last node in its scope (nodes are in execution order)."""
    scopes = {module_scope(n): n for n in names}
    out: dict[str, str] = {}
    for node in model.graph.node:
        for scope, name in scopes.items():
            if node.name.startswith(scope) and node.output:
                out[name] = node.output[0]
    return out


def layer_divergence(lowered, onnx_path: str | Path, inputs: tuple, feeds: dict[str, np.ndarray]) -> list[LayerParity]:
    """Per-layer SQNR (dB) of the ONNX graph at ``onnx_path`` (ONNX Runtime, optimizations off) against
    ``lowered`` (an :class:`export.qdq.Lowered`) called with ``inputs``; ``feeds`` are the same
    inputs by graph input name. Layers in execution order."""
    from export.ort_session import create_session
    from export.qdq import LoweredLayer

    module = lowered.module
    layers = {
        n[len("unet.") :]: m for n, m in module.named_modules() if isinstance(m, LoweredLayer) and n.startswith("unet.")
    }
    captured: dict[str, torch.Tensor] = {}
    order: list[str] = []
    hooks = []
    for name, m in layers.items():

        def hook(_m, _args, out, name=name):
            if name not in captured:
                order.append(name)
            captured[name] = out.detach()

        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    model = onnx.load(str(onnx_path))
    tensors = layer_tensors(model, order)
    existing = {o.name for o in model.graph.output}
    for name in order:
        t = tensors.get(name)
        if t is not None and t not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
            existing.add(t)
    session = create_session(model.SerializeToString(), optimize=False)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds), strict=True))
    return [
        LayerParity(n, tensors[n], sqnr_db(captured[n], torch.from_numpy(values[tensors[n]])))
        for n in order
        if n in tensors
    ]


__all__ = ["LayerParity", "first_divergence", "layer_divergence", "layer_tensors", "module_scope"]
