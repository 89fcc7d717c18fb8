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


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-256 (hex) over every state-dict tensor (name, dtype, shape, raw bytes), sorted by name."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_identity(model: torch.nn.Module) -> dict[str, str]:
    """``{"class", "config_hash", "weights_hash"}`` of a diffusers/transformers model."""
    config = getattr(model, "config", {})
    if not isinstance(config, Mapping):
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    return {
        "class": type(model).__name__,
        "config_hash": config_hash(config),
        "weights_hash": weights_hash(model),
    }
