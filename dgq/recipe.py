"""The recipe: the result of a DGQ calibration as one versioned, replayable artifact.

File format: one safetensors file. Its metadata entry ``"dgq_recipe"`` holds a JSON header (format
version, the QuantConfig, the model identity, library versions, timestep slots, and per quantizer
its layout, axis per slot and group counts); the tensors hold group membership, ranges and weight
parameters. ``load`` validates all of it and refuses a recipe made for another model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.errors import DGQError
from common.fsutil import atomic_file
from dgq.config import QuantConfig
from dgq.fingerprint import model_identity

log = logging.getLogger(__name__)

RECIPE_FORMAT = "dgq-recipe"
RECIPE_VERSION = 1


class RecipeError(DGQError, ValueError):
    """A recipe file that is unreadable, of another version, incomplete, or for another model."""


@dataclass
class ActQuant:
    """Activation quantizer of one site: per timestep slot an axis, a grouping and per-group ranges.

    ``group_index[s]``: int64 ``(n_s,)`` along ``axis[s]`` (``(1,)`` zeros for ``"layer"``);
    ``ranges[s]``: float32 ``(K_s, 2)`` of (min, max) per group, group ``K_s - 1`` the widest.
    """

    layout: str
    axis: list[str]
    group_index: list[torch.Tensor]
    ranges: list[torch.Tensor]

    def k(self, slot: int) -> int:
        return int(self.ranges[slot].shape[0])


@dataclass
class ProbsQuant:
    """Attention-probability quantizer: a static max per slot (only for ``attn_scale="static"``)."""

    static_max: torch.Tensor | None  # float32 (S,) or None for a real-time max


@dataclass
class WeightQuant:
    """Weight parameters of one layer: ``scale``/``zero_point`` per output channel ``(O,)``, per
    tensor ``()``, or block-wise (ONNX blocked shape along the input dim)."""

    bits: int
    granularity: str
    block: int | None
    symmetric: bool
    scale: torch.Tensor
    zero_point: torch.Tensor


@dataclass
class OutputQuant:
    """Quantized outputs of one conv (``onnxruntime`` profile: QLinearConv writes uint8).

    ``ranges``: float32 ``(S, G, 2)``, the (min, max) of each input-channel branch's bias-free conv
    output per timestep slot (``S`` = 1 when not time-aware), observed on the quantized model.
    """

    ranges: torch.Tensor
    # norm_outputs: per-output-channel scale (O,) the branch outputs are divided by before their
    # quantizer (then ``ranges`` are those of the divided outputs); None: plain outputs
    channel_scale: torch.Tensor | None = None


@dataclass
class Recipe:
    config: QuantConfig
    model: dict[str, str]  # model_identity(unet)
    slots: list[float]  # the timestep value of each slot, in calibration order
    acts: dict[str, ActQuant] = field(default_factory=dict)
    probs: dict[str, ProbsQuant] = field(default_factory=dict)
    weights: dict[str, WeightQuant] = field(default_factory=dict)
    outputs: dict[str, OutputQuant] = field(default_factory=dict)  # conv name -> output ranges (onnxruntime)
    meta: dict[str, Any] = field(default_factory=dict)  # calibration settings, versions

    # ---- lookups ------------------------------------------------------------------------------

    def slot_of(self, timestep: float) -> int:
        """Slot of a timestep *value* (not of the call count: PNDM repeats a timestep)."""
        t = float(timestep)
        if not self.config.time_aware:
            return 0
        for i, s in enumerate(self.slots):
            if abs(s - t) <= 1e-4 * max(1.0, abs(s)):
                return i
        raise RecipeError(
            f"timestep {t:g} was not calibrated; this recipe has slots for {[round(s, 3) for s in self.slots]} "
            "(calibrate with the same scheduler and number of steps you generate with)"
        )

    def check_model(self, unet: torch.nn.Module) -> None:
        """Raise :class:`RecipeError` when ``unet`` is not the model this recipe was made for."""
        ident = model_identity(unet)
        if ident["config_hash"] != self.model["config_hash"]:
            raise RecipeError(
                f"this recipe was made for another model architecture ({self.model['class']} with config hash "
                f"{self.model['config_hash'][:12]}), not this {ident['class']} ({ident['config_hash'][:12]})"
            )
        if ident["weights_hash"] != self.model["weights_hash"]:
            raise RecipeError(
                "this recipe was made for the same architecture with other weights "
                f"(weights hash {self.model['weights_hash'][:12]} vs {ident['weights_hash'][:12]}); recalibrate"
            )

    # ---- serialization ------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        return {
            "format": RECIPE_FORMAT,
            "version": RECIPE_VERSION,
            "config": self.config.to_dict(),
            "model": self.model,
            "slots": self.slots,
            "acts": {
                k: {"layout": a.layout, "axis": a.axis, "k": [a.k(s) for s in range(len(a.axis))]}
                for k, a in self.acts.items()
            },
            "probs": {k: {"static": p.static_max is not None} for k, p in self.probs.items()},
            "weights": {
                k: {"bits": w.bits, "granularity": w.granularity, "block": w.block, "symmetric": w.symmetric}
                for k, w in self.weights.items()
            },
            "outputs": {
                k: {"shape": list(o.ranges.shape), "channel_scale": o.channel_scale is not None}
                for k, o in self.outputs.items()
            },
            "meta": self.meta,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, a in self.acts.items():
            for s in range(len(a.axis)):
                out[f"act/{key}/{s}/group_index"] = a.group_index[s].to(torch.int16).contiguous()
                out[f"act/{key}/{s}/ranges"] = a.ranges[s].float().contiguous()
        for key, p in self.probs.items():
            if p.static_max is not None:
                out[f"probs/{key}/static_max"] = p.static_max.float().contiguous()
        for key, w in self.weights.items():
            out[f"weight/{key}/scale"] = w.scale.float().contiguous()
            out[f"weight/{key}/zero_point"] = w.zero_point.float().contiguous()
        for key, o in self.outputs.items():
            out[f"output/{key}/ranges"] = o.ranges.float().contiguous()
            if o.channel_scale is not None:
                out[f"output/{key}/channel_scale"] = o.channel_scale.float().contiguous()
        return out

    def save(self, path: str | Path) -> Path:
        """Write atomically; the same recipe always gives the same bytes."""
        path = Path(path)
        metadata = {"dgq_recipe": json.dumps(self.header(), sort_keys=True)}
        # safetensors writes to a path; write it beside the target and rename.
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_file(self.tensors(), str(tmp), metadata=metadata)
            with atomic_file(path) as f:
                f.write(tmp.read_bytes())
        finally:
            tmp.unlink(missing_ok=True)
        return path


def load(path: str | Path) -> Recipe:
    """Read and validate a recipe file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise RecipeError(f"{path} is not a readable recipe (truncated or not safetensors): {err}") from err
    if "dgq_recipe" not in metadata:
        raise RecipeError(f"{path} is a safetensors file but not a dgq recipe (no 'dgq_recipe' header)")
    try:
        header = json.loads(metadata["dgq_recipe"])
    except json.JSONDecodeError as err:
        raise RecipeError(f"{path}: the recipe header is not valid JSON: {err}") from err
    if header.get("format") != RECIPE_FORMAT:
        raise RecipeError(f"{path}: format {header.get('format')!r} is not {RECIPE_FORMAT!r}")
    if header.get("version") != RECIPE_VERSION:
        raise RecipeError(
            f"{path}: recipe format version {header.get('version')} is not supported (this dgq reads version "
            f"{RECIPE_VERSION}); recalibrate with this version"
        )

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise RecipeError(f"{path}: tensor {name!r} is missing (the file is incomplete or was edited)")
        return tensors[name]

    config = QuantConfig.from_dict(header["config"])
    recipe = Recipe(
        config=config, model=header["model"], slots=[float(s) for s in header["slots"]], meta=header.get("meta", {})
    )
    for key, info in header["acts"].items():
        n_slots = len(info["axis"])
        gi = [take(f"act/{key}/{s}/group_index").long() for s in range(n_slots)]
        rg = [take(f"act/{key}/{s}/ranges") for s in range(n_slots)]
        for s in range(n_slots):
            if rg[s].shape != (info["k"][s], 2) or int(gi[s].max()) >= info["k"][s]:
                raise RecipeError(f"{path}: quantizer {key!r} slot {s} has inconsistent group tensors")
        recipe.acts[key] = ActQuant(info["layout"], list(info["axis"]), gi, rg)
    for key, info in header["probs"].items():
        recipe.probs[key] = ProbsQuant(take(f"probs/{key}/static_max") if info["static"] else None)
    for key, info in header["weights"].items():
        recipe.weights[key] = WeightQuant(
            info["bits"],
            info["granularity"],
            info["block"],
            info["symmetric"],
            take(f"weight/{key}/scale"),
            take(f"weight/{key}/zero_point"),
        )
    for key, info in header.get("outputs", {}).items():
        ranges = take(f"output/{key}/ranges")
        if list(ranges.shape) != info["shape"] or ranges.ndim != 3 or ranges.shape[-1] != 2:
            raise RecipeError(f"{path}: output quantizer {key!r} has inconsistent ranges")
        scale = take(f"output/{key}/channel_scale") if info.get("channel_scale") else None
        recipe.outputs[key] = OutputQuant(ranges, scale)
    return recipe
