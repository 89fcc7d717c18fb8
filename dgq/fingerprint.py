"""Model identity: stable hashes of a network's config and weights.

Recipes, exports and engines record these so a recipe made for one model is refused on another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a config mapping, ignoring keys that start with ``_`` (diffusers bookkeeping
    such as ``_diffusers_version`` or ``_name_or_path`` that does not change the network)."""
    clean = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    return hashlib.sha256(json.dumps(_jsonable(clean), sort_keys=True).encode()).hexdigest()


def weights_hash(module: torch.nn.Module, dtype: torch.dtype | None = None) -> str:
    """SHA-256 (hex) over every state-dict tensor (name, dtype, shape, raw bytes), sorted by name.

    ``dtype``: hash the floating tensors as if cast to it first (the hash of ``module.to(dtype)``,
    without the copy)."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating parameters (float32 for a model without any)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def model_identity(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, str]:
    """``{"class", "config_hash", "weights_hash"}`` of a diffusers/transformers model, plus ``"dtype"``
    when its weights are not float32 (a model calibrated in float16 is the float32 model cast).

    ``dtype``: the identity of the model as if cast to ``dtype`` (how a float32 model is matched with a
    recipe calibrated on its float16 cast)."""
    config = getattr(model, "config", {})
    if not isinstance(config, Mapping):
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    ident = {
        "class": type(model).__name__,
        "config_hash": config_hash(config),
        "weights_hash": weights_hash(model, dtype),
    }
    effective = dtype or float_dtype(model)
    if effective != torch.float32:
        ident["dtype"] = str(effective).removeprefix("torch.")
    return ident
