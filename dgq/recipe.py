"""The recipe: the result of a DGQ calibration as one versioned, replayable artifact.

File format: one safetensors file. Its metadata entry ``"dgq_recipe"`` holds a JSON header (format
version, the QuantConfig, the model identity, library versions, timestep slots, and per quantizer
its layout, axis per slot and group counts); the tensors hold group membership, ranges and weight
parameters.

The file verifies itself: the header lists the sha256 of every tensor (``tensors``: over dtype, shape
and bytes) and carries the sha256 of its own canonical JSON (``digest``). ``load`` checks both, then
every header field against its schema (enums, types, slot counts, tensor shapes and dtypes, finite
ranges), and names the field or tensor that fails; :meth:`Recipe.check_model` refuses a recipe made for
another model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from common.errors import DGQError
from common.fsutil import atomic_file
from common.timesteps import SlotTable
from dgq.config import WEIGHT_GRANULARITIES, QuantConfig
from dgq.fingerprint import float_dtype, model_identity
from dgq.quant import CHANNEL, LAYER, PIXEL
from dgq.sites import CONV, LINEAR, QKV

log = logging.getLogger(__name__)

RECIPE_FORMAT = "dgq-recipe"
RECIPE_VERSION = 2  # 2: tensor digests, header digest, strict header schema
HEADER_KEY = "dgq_recipe"
AXES = (CHANNEL, PIXEL, LAYER)
LAYOUTS = (CONV, LINEAR, QKV)  # an activation site's kind
_HEADER_FIELDS = {
    "format",
    "version",
    "digest",
    "config",
    "model",
    "slots",
    "acts",
    "probs",
    "weights",
    "outputs",
    "meta",
    "tensors",
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
# What dtype each tensor is written with (``Recipe.tensors``), by the last part of its name.
_DTYPES = {
    "group_index": torch.int16,
    "ranges": torch.float32,
    "static_max": torch.float32,
    "scale": torch.float32,
    "zero_point": torch.float32,
    "channel_scale": torch.float32,
}


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
    _slot_table: SlotTable | None = field(default=None, init=False, repr=False, compare=False)

    # ---- lookups ------------------------------------------------------------------------------

    def slot_of(self, timestep: float) -> int:
        """Slot of a timestep *value* (not of the call count: PNDM repeats a timestep): its own slot when
        calibrated, else the nearest calibrated timestep's (:mod:`common.timesteps`, which logs that once
        and warns once for a timestep far outside the calibrated range)."""
        if not self.config.time_aware:
            return 0
        if self._slot_table is None or self._slot_table.slots != [float(s) for s in self.slots]:
            self._slot_table = SlotTable(self.slots, "this recipe")
        return self._slot_table.index(timestep)

    def check_model(self, unet: torch.nn.Module) -> None:
        """Raise :class:`RecipeError` when ``unet`` is not the model this recipe was made for."""
        # A recipe calibrated on a float16/bfloat16 cast names that dtype: ``unet`` matches when its
        # weights, cast to it, are the ones calibrated.
        dtype = self.model.get("dtype")
        have = str(float_dtype(unet)).removeprefix("torch.")
        if have not in ("float32", dtype or "float32"):
            raise RecipeError(
                f"this recipe was calibrated on the {dtype or 'float32'} model and this UNet is {have}: run the "
                f"model in {dtype or 'float32'} (--dtype {dtype or 'float32'}), or calibrate with --dtype {have}"
            )
        ident = model_identity(unet, getattr(torch, dtype) if dtype in ("float16", "bfloat16") else None)
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

    def to(self, device: torch.device | str) -> Recipe:
        """A copy with every tensor on ``device`` (the simulator runs where the UNet is; tensors already
        there are shared, not copied)."""
        device = torch.device(device)
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self,
            acts={
                k: dataclasses.replace(a, group_index=[mv(g) for g in a.group_index], ranges=[mv(r) for r in a.ranges])
                for k, a in self.acts.items()
            },
            probs={k: ProbsQuant(mv(p.static_max)) for k, p in self.probs.items()},
            weights={
                k: dataclasses.replace(w, scale=mv(w.scale), zero_point=mv(w.zero_point))
                for k, w in self.weights.items()
            },
            outputs={k: OutputQuant(mv(o.ranges), mv(o.channel_scale)) for k, o in self.outputs.items()},
            meta=dict(self.meta),
        )

    # ---- serialization ------------------------------------------------------------------------

    def header(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """The JSON header, with the digest of every tensor (of :meth:`tensors` unless given) and its own."""
        tensors = self.tensors() if tensors is None else tensors
        header = {
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
            "tensors": {name: tensor_digest(t) for name, t in sorted(tensors.items())},
        }
        header["digest"] = header_digest(header)
        return header

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

    def save(self, path: str | Path, overwrite: bool = True) -> Path:
        """Write atomically; the same recipe always gives the same bytes. ``overwrite`` replaces an
        existing recipe file, never another file (:func:`is_recipe_file`)."""
        path = Path(path)
        tensors = self.tensors()
        metadata = {HEADER_KEY: json.dumps(self.header(tensors), sort_keys=True)}
        data = save_bytes(tensors, metadata=metadata)
        with atomic_file(path, overwrite=overwrite, owned=is_recipe_file) as f:
            f.write(data)
        return path


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 over a tensor's dtype, shape and bytes (as the file stores them)."""
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}:{list(t.shape)}:".encode())
    h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def header_digest(header: dict[str, Any]) -> str:
    """sha256 of the header's canonical JSON (sorted keys, no whitespace), ``digest`` left out."""
    body = {k: v for k, v in header.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_metadata(data: bytes) -> dict[str, Any] | None:
    """The ``__metadata__`` of a safetensors file's header, or None when the bytes are not safetensors."""
    if len(data) < 8:
        return None
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        return None
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else None


def is_recipe_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a recipe file (a safetensors file with a dgq recipe header; ``--overwrite``
    may replace it). Reads the file's header only."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:  # a recipe's header is a few MB at most
            return False
        meta = _read_metadata(head + f.read(n))
    return meta is not None and HEADER_KEY in meta


def load(path: str | Path) -> Recipe:
    """Read and validate a recipe file (see the module docstring); :class:`RecipeError` names what fails."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = path.read_bytes()
        tensors = load_bytes(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise RecipeError(f"{path} is not a readable recipe (truncated or not safetensors): {err}") from err
    metadata = _read_metadata(data)
    if metadata is None:
        raise RecipeError(f"{path} is not a readable recipe (its safetensors header is not valid JSON)")
    if HEADER_KEY not in metadata:
        raise RecipeError(f"{path} is a safetensors file but not a dgq recipe (no {HEADER_KEY!r} header)")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (TypeError, json.JSONDecodeError, RecursionError) as err:
        raise RecipeError(f"{path}: the recipe header is not valid JSON: {err}") from err
    return _from_header(path, header, tensors)


def _from_header(path: Path, header: Any, tensors: dict[str, torch.Tensor]) -> Recipe:
    def bad(what: str, why: str) -> RecipeError:
        return RecipeError(f"{path}: {what} {why} (the file was edited or damaged; recalibrate)")

    if not isinstance(header, dict):
        raise bad("the header", "is not a JSON object")
    if header.get("format") != RECIPE_FORMAT:
        raise RecipeError(f"{path}: format {header.get('format')!r} is not {RECIPE_FORMAT!r}")
    if not _is_int(header.get("version")) or header["version"] != RECIPE_VERSION:
        raise RecipeError(
            f"{path}: recipe format version {header.get('version')} is not supported (this dgq reads version "
            f"{RECIPE_VERSION}); recalibrate with this version"
        )
    missing = sorted(_HEADER_FIELDS - set(header))
    if missing:
        raise bad(f"header field {missing[0]!r}", "is missing")
    unknown = sorted(set(header) - _HEADER_FIELDS)
    if unknown:
        raise bad(f"header field {unknown[0]!r}", "is not a recipe header field")
    if not isinstance(header["digest"], str) or header_digest(header) != header["digest"]:
        raise bad("the header", "does not match its digest")

    # ---- tensors: exactly those listed, each with its digest and dtype
    listed = header["tensors"]
    if not isinstance(listed, dict):
        raise bad("header field 'tensors'", "is not an object")
    for name in sorted(listed):
        if name not in tensors:
            raise RecipeError(f"{path}: tensor {name!r} is missing (the file is incomplete or was edited)")
    extra = sorted(set(tensors) - set(listed))
    if extra:
        raise bad(f"tensor {extra[0]!r}", "is not listed in the header")
    for name in sorted(listed):
        t = tensors[name]
        if t.dtype != _DTYPES.get(name.rsplit("/", 1)[-1]):
            raise bad(f"tensor {name!r}", f"has dtype {t.dtype}")

    def take(name: str) -> torch.Tensor:
        if name not in listed:
            raise RecipeError(f"{path}: tensor {name!r} is missing (the file is incomplete or was edited)")
        return tensors[name]

    # ---- header fields
    try:
        if not isinstance(header["config"], dict):
            raise TypeError("not an object")
        config = QuantConfig.from_dict(header["config"])
    except (TypeError, ValueError) as err:
        raise bad("header field 'config'", f"is not a valid QuantConfig: {err}") from err
    model = header["model"]
    if not isinstance(model, dict) or not all(
        isinstance(model.get(k), str) for k in ("class", "config_hash", "weights_hash")
    ):
        raise bad("header field 'model'", "is not a model identity {class, config_hash, weights_hash}")
    slots = header["slots"]
    if not isinstance(slots, list) or not slots or not all(_is_number(s) for s in slots):
        raise bad("header field 'slots'", "is not a non-empty list of timestep values")
    if len(set(slots)) != len(slots):
        raise bad("header field 'slots'", "repeats a timestep")
    n_slots = len(slots) if config.time_aware else 1
    if not isinstance(header["meta"], dict):
        raise bad("header field 'meta'", "is not an object")
    recipe = Recipe(config=config, model=dict(model), slots=[float(s) for s in slots], meta=header["meta"])

    for key, info in _entries(header, "acts", bad):
        where = f"quantizer {key!r}"
        if set(info) != {"layout", "axis", "k"} or info["layout"] not in LAYOUTS:
            raise bad(where, f"has no valid layout (one of {list(LAYOUTS)})")
        axis, ks = info["axis"], info["k"]
        if not isinstance(axis, list) or len(axis) != n_slots or any(a not in AXES for a in axis):
            raise bad(where, f"needs an axis (one of {list(AXES)}) for each of its {n_slots} timestep slot(s)")
        if not isinstance(ks, list) or len(ks) != n_slots or not all(_is_int(k) and k >= 1 for k in ks):
            raise bad(where, f"needs a group count >= 1 for each of its {n_slots} timestep slot(s)")
        gi, rg = [], []
        for s in range(n_slots):
            g, r = take(f"act/{key}/{s}/group_index").long(), take(f"act/{key}/{s}/ranges")
            if (
                g.ndim != 1
                or not len(g)
                or int(g.min()) < 0
                or int(g.max()) >= ks[s]
                or r.shape != (ks[s], 2)
                or not bool(torch.isfinite(r).all())
                or bool((r[:, 0] > r[:, 1]).any())
            ):
                raise bad(f"{where} slot {s}", "has inconsistent group tensors")
            gi.append(g)
            rg.append(r)
        recipe.acts[key] = ActQuant(info["layout"], list(axis), gi, rg)
    for key, info in _entries(header, "probs", bad):
        if set(info) != {"static"} or not isinstance(info["static"], bool):
            raise bad(f"probability quantizer {key!r}", "needs 'static': true or false")
        static = take(f"probs/{key}/static_max") if info["static"] else None
        if static is not None and (static.shape != (n_slots,) or not bool(torch.isfinite(static).all())):
            raise bad(f"probability quantizer {key!r}", f"needs {n_slots} finite static maxima")
        recipe.probs[key] = ProbsQuant(static)
    for key, info in _entries(header, "weights", bad):
        where = f"weight {key!r}"
        if set(info) != {"bits", "granularity", "block", "symmetric"}:
            raise bad(where, "needs bits, granularity, block and symmetric")
        if not _is_int(info["bits"]) or not 2 <= info["bits"] <= 8:
            raise bad(where, f"has bits {info['bits']!r}, not in 2..8")
        if info["granularity"] not in WEIGHT_GRANULARITIES or not isinstance(info["symmetric"], bool):
            raise bad(where, f"has granularity {info['granularity']!r}, not one of {list(WEIGHT_GRANULARITIES)}")
        block = info["block"]
        if (info["granularity"] == "block") != (block is not None) or (block is not None and not _is_int(block)):
            raise bad(where, "has a block size exactly when its granularity is 'block'")
        scale, zp = take(f"weight/{key}/scale"), take(f"weight/{key}/zero_point")
        ndim = {"tensor": 0, "channel": 1, "block": 2}[info["granularity"]]
        if (
            scale.ndim != ndim
            or zp.shape != scale.shape
            or not bool(torch.isfinite(scale).all() & torch.isfinite(zp).all())
            or not bool((scale > 0).all())
        ):
            raise bad(where, f"has scale/zero point tensors unfit for {info['granularity']} granularity")
        recipe.weights[key] = WeightQuant(info["bits"], info["granularity"], block, info["symmetric"], scale, zp)
    for key, info in _entries(header, "outputs", bad):
        ranges = take(f"output/{key}/ranges")
        shape = info.get("shape")
        if (
            not set(info) <= {"shape", "channel_scale"}
            or list(ranges.shape) != shape
            or ranges.ndim != 3
            or ranges.shape[0] != n_slots
            or ranges.shape[-1] != 2
            or not bool(torch.isfinite(ranges).all())
        ):
            raise bad(f"output quantizer {key!r}", "has inconsistent ranges")
        scale = None
        if info.get("channel_scale", False) is not False:
            if info["channel_scale"] is not True:
                raise bad(f"output quantizer {key!r}", "has a 'channel_scale' field that is not true or false")
            scale = take(f"output/{key}/channel_scale")
            if scale.ndim != 1 or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
                raise bad(f"output quantizer {key!r}", "has channel scales that are not a positive finite (O,) tensor")
        recipe.outputs[key] = OutputQuant(ranges, scale)
    # Last, so that a tensor of the wrong shape or with non-finite values is named for that; what the
    # schema cannot see (a value changed within its range) only the digest catches.
    for name in sorted(listed):
        if tensor_digest(tensors[name]) != listed[name]:
            raise bad(f"tensor {name!r}", "does not match its digest")
    return recipe


def _entries(header: dict[str, Any], field: str, bad) -> list[tuple[str, dict[str, Any]]]:
    section = header[field]
    if not isinstance(section, dict) or not all(isinstance(v, dict) for v in section.values()):
        raise bad(f"header field {field!r}", "is not an object of objects")
    return list(section.items())


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
