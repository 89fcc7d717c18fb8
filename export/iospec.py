"""One IO contract per network: tensor names, dtypes, dynamic axes and min/opt/max shape profiles.

Export (ONNX input/output names and ``dynamic_axes``), engine build (TensorRT optimization profiles)
and runtime (feed checks, output buffer shapes) all read the same :class:`NetworkSpec`, and the
exported folder carries them as ``iospec.json``.

This module imports only the standard library and numpy, so a Jetson runtime without diffusers can
load it. The ``*_spec`` constructors take plain config mappings (``pipe.unet.config`` etc. are
dicts), never modules.

Contracts of the three float networks (B: batch, h/w: latent height/width, T: tokens):

``unet``
    ``sample`` float (B, C_in, h, w), ``timestep`` float32 scalar (shape ``()``),
    ``encoder_hidden_states`` float (B, T, D) [, SDXL: ``text_embeds`` float (B, E),
    ``time_ids`` float32 (B, 6)] -> ``noise_pred`` float (B, C_out, h, w).
    The timestep is a 0-d tensor because one UNet call is one denoising step for the whole batch
    (classifier-free guidance doubles the batch at the same t), the same way DGQ's per-step
    parameters will be chosen by a scalar step index that the Q/DQ exporter adds as an extra input
    (:meth:`NetworkSpec.with_inputs`). It (and SDXL's ``time_ids``) stays float32 in fp16 graphs:
    Euler-type schedulers pass fractional timesteps that fp16 would round, and the sinusoidal
    projection of t ~ 1000 needs float32 (diffusers computes it in float32 too).
    "float" above means float32, or float16 in an fp16 export (``metadata["precision"]``).
    ``noise_pred`` is the UNet's raw output: epsilon or v, as the scheduler's ``prediction_type`` says.
``text_encoder``
    ``input_ids`` int32 (B, T) -> ``last_hidden_state`` float (B, T, D). T is fixed at the
    tokenizer's ``model_max_length`` because the SD pipelines always pad to it. No attention mask,
    as ``StableDiffusionPipeline.encode_prompt`` calls CLIP and BERT encoders. int32 because
    TensorRT prefers it; the graph casts to int64 before the embedding lookup.
``vae_decoder``
    ``latent`` float (B, C_lat, h, w) -> ``images`` float (B, 3, h*f, w*f), f the VAE's upsampling
    factor. ``latent`` is what the denoising loop produces (the scheduler's latent space): the graph
    divides by the VAE's ``scaling_factor`` (and adds ``shift_factor`` when the VAE has one) itself,
    so a runtime needs no VAE config. ``images`` is the raw decoder output, about [-1, 1] and not
    clamped; to get [0, 1] pixels compute ``clip(images / 2 + 0.5, 0, 1)``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DGQError

SPEC_FORMAT = "dgq.iospec"
SPEC_VERSION = 1

# A shape entry: a fixed size, a dim name, or "name*k" (an output k times a named input dim).
DimExpr = int | str
_DERIVED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\*([0-9]+)$")
DTYPES = ("float32", "float16", "int32", "int64", "bool")
# ONNX TensorProto element types, kept here so runtime code needs no onnx import to compare.
ONNX_ELEM_TYPE = {"float32": 1, "float16": 10, "int32": 6, "int64": 7, "bool": 9}


class FeedError(DGQError, ValueError):
    """A feed that does not satisfy a network's IO contract (names the tensor and the dim)."""


def dtype_name(dtype: Any) -> str:
    """Canonical dtype name of a numpy dtype, a torch dtype, or a string (``torch.float16`` -> ``float16``)."""
    text = str(dtype)
    text = text.removeprefix("torch.")
    try:
        return np.dtype(text).name
    except TypeError as err:
        raise ValueError(f"unknown dtype {dtype!r}") from err


@dataclass(frozen=True)
class Dim:
    """A dynamic dimension: the TensorRT profile range ``min <= opt <= max`` and a divisibility rule."""

    min: int
    opt: int
    max: int
    multiple_of: int = 1

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"a dim needs 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")
        if self.multiple_of < 1 or any(v % self.multiple_of for v in (self.min, self.opt, self.max)):
            raise ValueError(f"min/opt/max {self.min}/{self.opt}/{self.max} must be multiples of {self.multiple_of}")

    def allows(self, value: int) -> bool:
        return self.min <= value <= self.max and value % self.multiple_of == 0


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` entries are ints, dim names, or ``"name*k"`` (outputs)."""

    name: str
    dtype: str
    shape: tuple[DimExpr, ...]

    def __post_init__(self):
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype} is not one of {DTYPES}")
        for d in self.shape:
            if not (isinstance(d, int) and d >= 1) and not (
                isinstance(d, str) and (d.isidentifier() or _DERIVED.match(d))
            ):
                raise ValueError(f"tensor {self.name!r}: shape entry {d!r} is neither a size >= 1 nor a dim name")

    def dim_names(self) -> list[str]:
        return [d for d in self.shape if isinstance(d, str) and d.isidentifier()]

    def concrete(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        """The shape with every named (or derived) entry replaced by its value in ``dims``."""
        out = []
        for d in self.shape:
            if isinstance(d, int):
                out.append(d)
            elif (m := _DERIVED.match(d)) is not None:
                out.append(dims[m.group(1)] * int(m.group(2)))
            else:
                out.append(dims[d])
        return tuple(out)


@dataclass(frozen=True)
class NetworkSpec:
    """The IO contract of one network.

    ``inputs`` / ``outputs`` are in graph order. ``dims`` maps every dim name used by an input to its
    :class:`Dim`; a name shared by several inputs (``batch``) must take the same value in all of them.
    Output shapes may only use input dims (plain or ``"name*k"``). ``metadata`` holds JSON-able facts
    a runtime needs (VAE scale factor, latent channels, the precision of the float graph).
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: Mapping[str, Dim]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "dims", dict(self.dims))
        object.__setattr__(self, "metadata", dict(self.metadata))
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: tensor names must be unique, got {names}")
        used = {d for t in self.inputs for d in t.dim_names()}
        if used != set(self.dims):
            raise ValueError(f"{self.name}: input dims {sorted(used)} do not match declared dims {sorted(self.dims)}")
        for t in self.outputs:
            for d in t.shape:
                base = _DERIVED.match(d).group(1) if isinstance(d, str) and _DERIVED.match(d) else d
                if isinstance(base, str) and base not in self.dims:
                    raise ValueError(f"{self.name}: output {t.name!r} uses dim {base!r}, which no input defines")

    # --- views used by export and engine build ---------------------------------------------------
    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no input {name!r}; inputs are {self.input_names}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes``: tensor -> {axis: dim name}, inputs and outputs."""
        axes = {}
        for t in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if named:
                axes[t.name] = named
        return axes

    def shape_profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) concrete shapes of every input, as a TensorRT optimization profile takes them.

        Fully static inputs (the scalar timestep) have min == opt == max; a builder may skip them.
        """
        pick = {k: {n: getattr(d, k) for n, d in self.dims.items()} for k in ("min", "opt", "max")}
        return {t.name: tuple(t.concrete(pick[k]) for k in ("min", "opt", "max")) for t in self.inputs}

    def example_shapes(self, **dims: int) -> dict[str, tuple[int, ...]]:
        """Concrete input shapes at the ``opt`` point, with any dim overridden by keyword."""
        unknown = set(dims) - set(self.dims)
        if unknown:
            raise KeyError(f"{self.name} has no dim(s) {sorted(unknown)}; dims are {sorted(self.dims)}")
        values = {n: d.opt for n, d in self.dims.items()} | dims
        return {t.name: t.concrete(values) for t in self.inputs}

    def output_shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        """Output buffer shapes for bound dim values (as returned by :meth:`check_feed`)."""
        return {t.name: t.concrete(dims) for t in self.outputs}

    # --- feed validation -------------------------------------------------------------------------
    def check_feed(self, feed: Mapping[str, Any]) -> dict[str, int]:
        """Check names, dtypes and shapes of ``feed`` (numpy arrays or torch tensors); return the dims.

        Raises :class:`FeedError` naming the tensor, and for shapes the dim and its allowed range.
        """
        missing = [n for n in self.input_names if n not in feed]
        extra = sorted(set(feed) - set(self.input_names))
        if missing or extra:
            raise FeedError(
                f"{self.name}: feed is missing {missing} and has unexpected {extra}; inputs are {self.input_names}"
            )
        bound: dict[str, tuple[int, str]] = {}
        for t in self.inputs:
            value = feed[t.name]
            got_dtype = dtype_name(value.dtype)
            if got_dtype != t.dtype:
                raise FeedError(f"{self.name}: input {t.name!r} has dtype {got_dtype}, the graph expects {t.dtype}")
            shape = tuple(int(s) for s in value.shape)
            if len(shape) != len(t.shape):
                raise FeedError(
                    f"{self.name}: input {t.name!r} has shape {shape} (rank {len(shape)}), expected rank "
                    f"{len(t.shape)}: {t.shape}"
                )
            for axis, (want, got) in enumerate(zip(t.shape, shape, strict=True)):
                if isinstance(want, int):
                    if got != want:
                        raise FeedError(
                            f"{self.name}: input {t.name!r} axis {axis} is {got}, the graph fixes it at {want}"
                        )
                    continue
                dim = self.dims[want]
                if not dim.allows(got):
                    rule = f" and a multiple of {dim.multiple_of}" if dim.multiple_of > 1 else ""
                    raise FeedError(
                        f"{self.name}: input {t.name!r} axis {axis} ({want}) is {got}, "
                        f"outside the profile: must be in [{dim.min}, {dim.max}]{rule}"
                    )
                if want in bound and bound[want][0] != got:
                    raise FeedError(
                        f"{self.name}: dim {want} is {bound[want][0]} in {bound[want][1]!r} but {got} in {t.name!r}"
                    )
                bound[want] = (got, t.name)
        return {n: v for n, (v, _) in bound.items()}

    # --- extension and serialization -------------------------------------------------------------
    def with_inputs(self, *inputs: TensorSpec, dims: Mapping[str, Dim] | None = None, **metadata) -> NetworkSpec:
        """A copy with extra inputs appended (e.g. the Q/DQ exporter's step index) and extra dims/metadata."""
        return replace(
            self,
            inputs=self.inputs + tuple(inputs),
            dims={**self.dims, **(dims or {})},
            metadata={**self.metadata, **metadata},
        )

    def to_dict(self) -> dict[str, Any]:
        def tensor(t: TensorSpec) -> dict[str, Any]:
            return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}

        return {
            "name": self.name,
            "inputs": [tensor(t) for t in self.inputs],
            "outputs": [tensor(t) for t in self.outputs],
            "dims": {
                n: {"min": d.min, "opt": d.opt, "max": d.max, "multiple_of": d.multiple_of}
                for n, d in self.dims.items()
            },
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NetworkSpec:
        try:
            return cls(
                name=data["name"],
                inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["inputs"]),
                outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["outputs"]),
                dims={n: Dim(**d) for n, d in data["dims"].items()},
                metadata=data.get("metadata", {}),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a network spec: {err!r} in {dict(data)!r:.200}") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> NetworkSpec:
        return cls.from_dict(json.loads(text))


def specs_to_json(specs: Mapping[str, NetworkSpec]) -> str:
    """The ``iospec.json`` document of an export folder: every network's spec, versioned."""
    doc = {"format": SPEC_FORMAT, "version": SPEC_VERSION, "networks": {n: s.to_dict() for n, s in specs.items()}}
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def specs_from_json(text: str) -> dict[str, NetworkSpec]:
    doc = json.loads(text)
    if doc.get("format") != SPEC_FORMAT:
        raise ValueError(f"not a {SPEC_FORMAT} document (format={doc.get('format')!r})")
    if doc.get("version") != SPEC_VERSION:
        raise ValueError(
            f"iospec version {doc.get('version')} is not supported (this code reads version {SPEC_VERSION})"
        )
    return {n: NetworkSpec.from_dict(s) for n, s in doc["networks"].items()}


def read_specs(path: str | os.PathLike) -> dict[str, NetworkSpec]:
    """The specs of an export folder (its ``iospec.json``) or of an ``iospec.json`` file."""
    path = Path(path)
    if path.is_dir():
        path = path / "iospec.json"
    if not path.is_file():
        raise FileNotFoundError(f"no IO spec at {path}: an export folder holds iospec.json next to its graphs")
    return specs_from_json(path.read_text())


# --- constructors from diffusers configs ------------------------------------------------------------
def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, np.integer)) else (int(value[0]), int(value[1]))


def _batch_dim(batch: tuple[int, int, int]) -> Dim:
    return Dim(*batch)


def _spatial(opt: int, multiple: int, span: int) -> Dim:
    """Latent sizes from ``opt // span`` to ``opt * span``, rounded onto the multiple."""
    lo = max(multiple, (opt // span) // multiple * multiple)
    hi = max(opt, opt * span // multiple * multiple)
    opt = max(lo, opt // multiple * multiple)
    return Dim(lo, opt, hi, multiple)


def _latent_hw(
    default_hw: tuple[int, int], multiple: int, static_size: int | Sequence[int] | None, span: int, prefix: str
) -> tuple[tuple[DimExpr, DimExpr], dict[str, Dim]]:
    if static_size is not None:
        h, w = _pair(static_size)
        if h % multiple or w % multiple:
            raise ValueError(f"static latent size {(h, w)} must be a multiple of {multiple} for this network")
        return (h, w), {}
    names = (f"{prefix}height", f"{prefix}width")
    return names, {names[0]: _spatial(default_hw[0], multiple, span), names[1]: _spatial(default_hw[1], multiple, span)}


def unet_spec(
    unet_config: Mapping[str, Any],
    max_tokens: int,
    *,
    batch: tuple[int, int, int] = (1, 2, 8),
    static_size: int | Sequence[int] | None = None,
    size_span: int = 2,
    fp16: bool = False,
) -> NetworkSpec:
    """The UNet's contract from ``UNet2DConditionModel.config``.

    ``batch`` is the (min, opt, max) UNet batch (already doubled for classifier-free guidance).
    ``static_size`` pins the latent (h, w) (a DGQ recipe with pixel groups binds to positions);
    otherwise h and w range from ``sample_size // size_span`` to ``sample_size * size_span`` in
    multiples of the UNet's total downsampling factor.
    """
    addition = unet_config.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise ValueError(f"UNet addition_embed_type={addition!r} is not supported (SD v1/v2: None, SDXL: 'text_time')")
    for key in ("class_embed_type", "time_cond_proj_dim", "encoder_hid_dim_type"):
        if unet_config.get(key) is not None:
            raise ValueError(
                f"UNet config {key}={unet_config[key]!r} needs an extra input this exporter does not support"
            )
    float_t = "float16" if fp16 else "float32"
    multiple = 2 ** (len(unet_config["block_out_channels"]) - 1)
    hw, dims = _latent_hw(_pair(unet_config["sample_size"]), multiple, static_size, size_span, "latent_")
    dims = {"batch": _batch_dim(batch), **dims}
    inputs = [
        TensorSpec("sample", float_t, ("batch", unet_config["in_channels"], *hw)),
        TensorSpec("timestep", "float32", ()),
        TensorSpec("encoder_hidden_states", float_t, ("batch", max_tokens, unet_config["cross_attention_dim"])),
    ]
    if addition == "text_time":
        n_time_ids = 6  # original size (2), crop top-left (2), target size (2)
        text_dim = (
            unet_config["projection_class_embeddings_input_dim"] - n_time_ids * unet_config["addition_time_embed_dim"]
        )
        inputs += [
            TensorSpec("text_embeds", float_t, ("batch", text_dim)),
            TensorSpec("time_ids", "float32", ("batch", n_time_ids)),  # sizes in pixels, like timestep
        ]
    outputs = [TensorSpec("noise_pred", float_t, ("batch", unet_config["out_channels"], *hw))]
    return NetworkSpec("unet", inputs, outputs, dims, {"precision": float_t, "latent_multiple": multiple})


def text_encoder_spec(
    text_config: Mapping[str, Any],
    max_tokens: int,
    *,
    batch: tuple[int, int, int] = (1, 2, 8),
    fp16: bool = False,
) -> NetworkSpec:
    """The text encoder's contract (CLIPTextModel or BERT config: ``hidden_size``, position limit).

    ``batch`` counts prompts per call, negative prompts included (as the UNet's batch does).
    """
    limit = text_config.get("max_position_embeddings")
    if limit is not None and max_tokens > limit:
        raise ValueError(f"max_tokens={max_tokens} exceeds the text encoder's max_position_embeddings={limit}")
    float_t = "float16" if fp16 else "float32"
    return NetworkSpec(
        "text_encoder",
        [TensorSpec("input_ids", "int32", ("batch", max_tokens))],
        [TensorSpec("last_hidden_state", float_t, ("batch", max_tokens, text_config["hidden_size"]))],
        {"batch": _batch_dim(batch)},
        {"precision": float_t, "max_tokens": max_tokens},
    )


def text_encoders_xl_spec(
    text_config: Mapping[str, Any],
    text_2_config: Mapping[str, Any],
    max_tokens: int,
    *,
    batch: tuple[int, int, int] = (1, 2, 8),
    fp16: bool = False,
    force_zeros_for_empty_prompt: bool = True,
) -> NetworkSpec:
    """SDXL's two text towers as one network: ``input_ids`` (first tokenizer) and ``input_ids_2``
    (second) -> ``prompt_embeds`` (the towers' penultimate hidden states, concatenated) and
    ``pooled_prompt_embeds`` (the second tower's projection). ``force_zeros_for_empty_prompt`` (the
    pipeline's setting) tells the runtime to use zeros, not an encoded empty prompt, as the negative
    embeddings when no negative prompt is given, as diffusers does."""
    for config in (text_config, text_2_config):
        limit = config.get("max_position_embeddings")
        if limit is not None and max_tokens > limit:
            raise ValueError(f"max_tokens={max_tokens} exceeds a text encoder's max_position_embeddings={limit}")
    float_t = "float16" if fp16 else "float32"
    width = int(text_config["hidden_size"]) + int(text_2_config["hidden_size"])
    return NetworkSpec(
        "text_encoder",
        [
            TensorSpec("input_ids", "int32", ("batch", max_tokens)),
            TensorSpec("input_ids_2", "int32", ("batch", max_tokens)),
        ],
        [
            TensorSpec("prompt_embeds", float_t, ("batch", max_tokens, width)),
            TensorSpec("pooled_prompt_embeds", float_t, ("batch", int(text_2_config["projection_dim"]))),
        ],
        {"batch": _batch_dim(batch)},
        {
            "precision": float_t,
            "max_tokens": max_tokens,
            "towers": 2,
            "force_zeros_for_empty_prompt": bool(force_zeros_for_empty_prompt),
        },
    )


def vae_decoder_spec(
    vae_config: Mapping[str, Any],
    *,
    batch: tuple[int, int, int] = (1, 1, 4),
    static_size: int | Sequence[int] | None = None,
    size_span: int = 2,
    fp16: bool = False,
) -> NetworkSpec:
    """The VAE decoder's contract from ``AutoencoderKL.config`` (latent sizes as in :func:`unet_spec`)."""
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    float_t = "float16" if fp16 else "float32"
    hw, dims = _latent_hw(_vae_latent_size(vae_config, factor), 1, static_size, size_span, "latent_")
    dims = {"batch": _batch_dim(batch), **dims}
    out_hw = tuple(d * factor if isinstance(d, int) else f"{d}*{factor}" for d in hw)
    shift = vae_config.get("shift_factor")
    return NetworkSpec(
        "vae_decoder",
        [TensorSpec("latent", float_t, ("batch", vae_config["latent_channels"], *hw))],
        [TensorSpec("images", float_t, ("batch", vae_config["out_channels"], *out_hw))],
        dims,
        {
            "precision": float_t,
            "vae_scale_factor": factor,
            # The graph computes decode(latent / scaling_factor + shift_factor): feed the scheduler's
            # latents as they are. The factors are recorded for reference only.
            "latent_scaling": "in graph",
            "scaling_factor": float(vae_config["scaling_factor"]),
            "shift_factor": None if shift is None else float(shift),
            "images_range": "[-1, 1], not clamped",
        },
    )


def _vae_latent_size(vae_config: Mapping[str, Any], factor: int) -> tuple[int, int]:
    h, w = _pair(vae_config["sample_size"])
    return max(1, h // factor), max(1, w // factor)
