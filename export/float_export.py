"""Float ONNX export of a Stable Diffusion pipeline's UNet, text encoder and VAE decoder.

Each network is traced through a small ``nn.Module`` wrapper that fixes its call signature to the
IO contract in :mod:`export.iospec` (no diffusers code is copied or patched), exported with the
legacy TorchScript exporter (``dynamo=False``: measured here to export SD UNets in seconds and to
write valid graphs at opset 17, where the dynamo exporter took ~40 s and wrote an invalid one),
checked with ``onnx.checker``, and written atomically with the folder's ``iospec.json``.

``fp16=True`` exports the float32 graph and then converts it to float16 with ONNX Runtime's
float16 converter: weights, float inputs and outputs become float16, except the ``timestep`` input
and the sinusoidal timestep (and SDXL ``time_ids``) projections, which stay float32 as they do in
diffusers' own fp16 pipelines (sin/cos of t * freq with t near 1000 loses its phase in float16).
Converting the graph rather than tracing a float16 module matters on CPU: the legacy tracer
mistypes the float16 CLIP text encoder (measured: a float32 Cast before a float16 LayerNorm, which
ONNX Runtime refuses to load). A graph past 2 GB (its weights spilled to files by the tracer) is
converted without holding its float32 weights: the converter rewrites the graph alone, and each
weight is converted as it is read. The fp16 graphs are meant for TensorRT and GPU ONNX Runtime. They
also run on ONNX Runtime's CPU provider, which wraps the ops it has no float16 kernel for in casts
to float32 (so CPU timings of fp16 graphs say nothing about GPU speed); the tests compare them
there to float32 PyTorch within a float16 tolerance.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from common.constants import SUPPORTED_OPSETS
from common.fsutil import TMP_PREFIX, atomic_dir
from dgq.fingerprint import model_identity
from export.errors import ExportError
from export.iospec import (
    ONNX_ELEM_TYPE,
    NetworkSpec,
    specs_to_json,
    text_encoder_spec,
    text_encoders_xl_spec,
    unet_spec,
    vae_decoder_spec,
)
from export.manifest import COMPONENTS, MANIFEST, is_export_folder, write_manifest

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# Protobuf cannot serialize a message over 2 GiB; past this many bytes of weights the graph keeps
# its tensors in one ``<name>.onnx.data`` file next to it.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # 2 GiB minus headroom for the graph itself
# Tensors smaller than this stay inline even in external-data graphs (shapes, small constants).
EXTERNAL_DATA_MIN_TENSOR_BYTES = 1024
_PIPELINE_ATTR = {"unet": "unet", "text_encoder": "text_encoder", "vae_decoder": "vae"}


# --- wrappers: the IO contract as a forward signature -----------------------------------------------
class UNetForExport(nn.Module):
    """``(sample, timestep, encoder_hidden_states[, text_embeds, time_ids]) -> noise_pred``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        self.sdxl = unet.config.get("addition_embed_type") == "text_time"

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if self.sdxl else None
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class TextEncoderForExport(nn.Module):
    """``input_ids (int32) -> last_hidden_state``, called without an attention mask as the SD pipeline does."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids.to(torch.int64), return_dict=False)[0]


class TextEncodersXLForExport(nn.Module):
    """SDXL's two text towers as one graph, ``(input_ids, input_ids_2) (int32) -> (prompt_embeds,
    pooled_prompt_embeds)``, as ``StableDiffusionXLPipeline.encode_prompt`` computes them: each tower's
    penultimate hidden states, concatenated (first tower first), and the second tower's projected pooled
    output. One graph, so the runtime keeps one text-encoder stage (and one engine) for both towers."""

    def __init__(self, text_encoder: nn.Module, text_encoder_2: nn.Module):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2

    def forward(self, input_ids, input_ids_2):
        first = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True)
        second = self.text_encoder_2(input_ids_2.to(torch.int64), output_hidden_states=True)
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return embeds, second[0]


class VaeDecoderForExport(nn.Module):
    """``latent -> images``: undoes the VAE's latent scaling in-graph, then decodes (raw output, ~[-1, 1])."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = vae.config.get("shift_factor")
        self.shift_factor = None if shift is None else float(shift)

    def forward(self, latent):
        z = latent / self.scaling_factor
        if self.shift_factor is not None:
            z = z + self.shift_factor
        return self.vae.decode(z, return_dict=False)[0]


WRAPPERS = {"unet": UNetForExport, "text_encoder": TextEncoderForExport, "vae_decoder": VaeDecoderForExport}


def is_xl(pipe: Any) -> bool:
    """True for an SDXL-type pipeline (two text towers: a ``text_encoder_2``, even one not loaded)."""
    return hasattr(pipe, "text_encoder_2") or "text_encoder_2" in (getattr(pipe, "components", None) or {})


def component_wrapper(pipe: Any, component: str) -> nn.Module:
    """The export wrapper of a pipeline component (:data:`WRAPPERS`; SDXL's text encoder takes both
    towers, :class:`TextEncodersXLForExport`), in eval mode."""
    module = _module(pipe, component)
    if component == "text_encoder" and is_xl(pipe):
        return TextEncodersXLForExport(module, pipe.text_encoder_2).eval()
    return WRAPPERS[component](module).eval()


# --- specs from a pipeline --------------------------------------------------------------------------
def _module(pipe: Any, component: str) -> nn.Module:
    if component not in COMPONENTS:
        raise ExportError(f"unknown component {component!r}; choose from {list(COMPONENTS)}")
    attr = _PIPELINE_ATTR[component]
    module = getattr(pipe, attr, None)
    if module is None:
        raise ExportError(
            f"{type(pipe).__name__} has no {attr!r} (it is None or absent), so {component} cannot be exported; "
            f"load the pipeline with its {attr}, or leave {component!r} out of components"
        )
    return module


def _max_tokens(pipe: Any) -> int:
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        raise ExportError(f"{type(pipe).__name__} has no tokenizer; the token count of the text inputs comes from it")
    tokens = int(tokenizer.model_max_length)
    if tokens > 4096:  # transformers' VERY_LARGE_INTEGER: the tokenizer was saved without a limit
        raise ExportError(
            f"the tokenizer's model_max_length is {tokens}, i.e. unset; the pipeline pads prompts to it, so set it"
        )
    return tokens


def _check_supported(pipe: Any, components: Sequence[str]) -> None:
    if "text_encoder" not in components or not is_xl(pipe):
        return
    for attr in ("text_encoder_2", "tokenizer_2"):
        if getattr(pipe, attr, None) is None:
            raise ExportError(
                f"{type(pipe).__name__} has no {attr}: SDXL's text encoder graph combines both text towers, "
                f"so load the pipeline with {attr}, or leave 'text_encoder' out of components"
            )
    first, second = int(pipe.tokenizer.model_max_length), int(pipe.tokenizer_2.model_max_length)
    if first != second:
        raise ExportError(f"the two tokenizers pad to {first} and {second} tokens; SDXL's both pad to the same")


def pipeline_specs(
    pipe: Any,
    components: Iterable[str] = COMPONENTS,
    *,
    fp16: bool = False,
    static_size: int | Sequence[int] | None = None,
    batch: tuple[int, int, int] = (1, 1, 4),
) -> dict[str, NetworkSpec]:
    """The IO specs of ``components`` of a diffusers SD pipeline, read from its configs.

    ``static_size`` is a latent (h, w) (or one int) that pins the UNet's and VAE decoder's spatial
    dims. ``batch`` is the (min, opt, max) number of images per call: the VAE decoder's batch.
    The UNet and the text encoder see negative and positive prompts together under
    classifier-free guidance, so their profile is (min, 2 * opt, 2 * max).
    """
    components = tuple(components)
    cond_batch = (batch[0], 2 * batch[1], 2 * batch[2])
    _check_supported(pipe, components)
    specs = {}
    for c in components:
        module = _module(pipe, c)
        try:
            if c == "unet":
                specs[c] = unet_spec(
                    module.config, _max_tokens(pipe), batch=cond_batch, static_size=static_size, fp16=fp16
                )
            elif c == "text_encoder" and is_xl(pipe):
                specs[c] = text_encoders_xl_spec(
                    module.config.to_dict(),
                    pipe.text_encoder_2.config.to_dict(),
                    _max_tokens(pipe),
                    batch=cond_batch,
                    fp16=fp16,
                    force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
                )
            elif c == "text_encoder":
                specs[c] = text_encoder_spec(module.config.to_dict(), _max_tokens(pipe), batch=cond_batch, fp16=fp16)
            else:
                specs[c] = vae_decoder_spec(module.config, batch=batch, static_size=static_size, fp16=fp16)
        except (KeyError, ValueError) as err:
            raise ExportError(f"{c} of {type(pipe).__name__}: {err}") from err
    return specs


# --- export -----------------------------------------------------------------------------------------
def example_inputs(spec: NetworkSpec, seed: int = 0, **dims: int) -> dict[str, torch.Tensor]:
    """Seeded random inputs matching ``spec`` at its opt shapes (``dims`` overrides a dim)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in spec.example_shapes(**dims).items():
        t = spec.input(name)
        if t.dtype.startswith("int") and name != "step_index":
            vocab_safe = 1000  # below any real vocabulary size
            out[name] = torch.randint(0, vocab_safe, shape, generator=gen, dtype=getattr(torch, t.dtype))
        elif name == "timestep":
            out[name] = torch.tensor(500.0, dtype=torch.float32)
        elif name == "step_index":
            out[name] = torch.tensor(0, dtype=torch.int64)
        else:
            out[name] = torch.randn(shape, generator=gen).to(getattr(torch, t.dtype))
    return out


def _external_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _check_io(model: onnx.ModelProto, spec: NetworkSpec, path: Path) -> None:
    """The graph's inputs and outputs are exactly the spec's, in order, with its element types."""
    for kind, graph_io, spec_io in (
        ("input", model.graph.input, spec.inputs),
        ("output", model.graph.output, spec.outputs),
    ):
        got = [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in graph_io]
        want = [(t.name, ONNX_ELEM_TYPE[t.dtype], len(t.shape)) for t in spec_io]
        if got != want:
            raise ExportError(
                f"{path.name}: graph {kind}s (name, elem type, rank) {got} differ from the IO spec {want}"
            )


# Nodes of these modules (and everything upstream of them) stay float32 in fp16 graphs.
FP32_MODULE_PREFIXES = ("/unet/time_proj/", "/unet/add_time_proj/")


def _float32_spec(spec: NetworkSpec) -> NetworkSpec:
    def f32(tensors):
        return tuple(replace(t, dtype="float32") if t.dtype == "float16" else t for t in tensors)

    return replace(spec, inputs=f32(spec.inputs), outputs=f32(spec.outputs))


def _fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the timestep-projection nodes and all their ancestors (the path from ``timestep``)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    keep = [n for n in model.graph.node if n.name.startswith(FP32_MODULE_PREFIXES)]
    seen = {n.name for n in keep}
    while keep:
        for name in keep.pop().input:
            parent = producer.get(name)
            if parent is not None and parent.name not in seen:
                seen.add(parent.name)
                keep.append(parent)
    return sorted(seen)


def _to_fp16(model: onnx.ModelProto, spec: NetworkSpec) -> onnx.ModelProto:
    """Float16 copy of a shape-inferred float32 graph; IO stays float32 where ``spec`` says so."""
    from onnxruntime.transformers import float16 as converter
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep_float32 = [t.name for t in spec.inputs + spec.outputs if t.dtype == "float32"]
    # The converter reads each converted weight whole just to learn its shape, which fails on a graph
    # loaded without its external weights (_load_external_as_fp16); the dims say the same.
    with _swapped(converter, "make_value_info_from_tensor", _value_info_from_dims):
        model = convert_float_to_float16(
            model, keep_io_types=keep_float32, node_block_list=_fp32_nodes(model), disable_shape_infer=True
        )
    _drop_fp16_round_trips(model.graph)
    return model


def _value_info_from_dims(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


@contextlib.contextmanager
def _swapped(owner: Any, name: str, value: Any):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def _load_external_as_fp16(model: onnx.ModelProto, base: Path) -> None:
    """Read the external tensors of a graph whose converter pass ran without them (loaded with
    ``load_external_data=False``): each tensor the converter marked float16 is converted as its
    bytes are read, with the converter's own clamping, so the float32 weights are never all held.
    Every tensor ends up inline (``raw_data``); the save decides what goes to a data file."""
    import numpy as np
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    from onnxruntime.transformers.float16 import convert_np_to_float16

    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = ExternalDataInfo(tensor)
        with open(base / info.location, "rb") as f:
            f.seek(info.offset or 0)
            data = f.read(info.length) if info.length else f.read()
        if tensor.data_type == onnx.TensorProto.FLOAT16:  # the converter marked it; its bytes are float32
            data = convert_np_to_float16(np.frombuffer(data, dtype=np.float32)).tobytes()
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = data


def _drop_fp16_round_trips(graph: onnx.GraphProto) -> None:
    """Remove the converter's Cast(fp16) -> Cast(fp32) pairs, then re-sort the nodes topologically.

    The converter casts every edge between two float32-blocked nodes down to float16 and back, so
    the timestep path would still be rounded to float16 between each op. A Cast-to-float16 feeding a
    Cast-to-float32 only appears on such float32 edges, so its consumers read the float32 source.
    """
    FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {o: n for n in graph.node for o in n.output}
    rewire = {}
    for node in graph.node:
        parent = producer.get(node.input[0]) if node.input else None
        if cast_to(node) == FLOAT and parent is not None and cast_to(parent) == FLOAT16:
            rewire[node.output[0]] = parent.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            while name in rewire:
                name = rewire[name]
            node.input[i] = name
    graph_outputs = {o.name for o in graph.output}
    nodes = list(graph.node)
    while True:  # drop nodes nothing reads any more (the bypassed casts)
        used = {i for n in nodes for i in n.input} | graph_outputs
        alive = [n for n in nodes if any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            break
        nodes = alive
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:  # stable Kahn sort: keeps the exporter's order wherever it is already valid
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ExportError(f"fp16 conversion left a cycle or a dangling input at {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def export_component(
    module: nn.Module,
    spec: NetworkSpec,
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    doc: str | None = None,
    postprocess: Any = None,
    custom_opsets: dict[str, int] | None = None,
) -> Path:
    """Trace the float32 ``module`` (a wrapper from :data:`WRAPPERS`) to ``path`` and check it.

    ``postprocess(model)`` edits the traced ``onnx.ModelProto`` in place before it is saved and
    checked (the Q/DQ exporter packs 4-bit weights and lints there). ``custom_opsets``: the opset of
    each non-standard domain the module traces nodes of (ONNX Runtime's contrib ops).

    A spec with float16 tensors gets the float32 trace converted to float16 (module docstring).
    """
    trace_spec = _float32_spec(spec)
    inputs = example_inputs(trace_spec)
    args = tuple(inputs[n] for n in trace_spec.input_names)
    # Beside the graph under the project's temporary prefix: removed on exit, and after a kill by the
    # next run that claims the same output.
    with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{path.name}.", dir=path.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        # The tracer warns at every Python branch on a shape (diffusers' size checks, CLIP's causal
        # mask); those branches are fixed for the documented profiles, and the tests run each graph
        # at several batch sizes and resolutions, so the warnings carry no information here.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The legacy exporter is a deliberate choice (module docstring); its notice is not news.
            warnings.filterwarnings(
                "ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning
            )
            torch.onnx.export(
                module,
                args,
                str(raw),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                custom_opsets=custom_opsets,
                dynamo=False,
            )
        if trace_spec == spec:
            # Loads external tensors too when the exporter spilled a >2 GB model into per-tensor files.
            model = onnx.load(str(raw))
            _check_io(model, trace_spec, path)
        else:
            # The fp16 converter needs every intermediate tensor's type. In-memory shape inference
            # cannot serialize a >2 GB model (SD UNets); the file-based one can.
            inferred = Path(tmp) / "inferred.onnx"
            onnx.shape_inference.infer_shapes_path(str(raw), str(inferred))
            # The converter rewrites the graph and marks which tensors become float16; the weights a
            # >2 GB export spilled to files are then read and converted one at a time (the float32
            # graph, its float16 copy and the torch module together do not fit a 24 GiB machine for
            # SDXL's UNet: measured, killed at 24.3 GiB).
            model = onnx.load(str(inferred), load_external_data=False)
            _check_io(model, trace_spec, path)
            model = _to_fp16(model, spec)
            _load_external_as_fp16(model, Path(tmp))
    _check_io(model, spec, path)
    model.doc_string = doc or f"dgq float export of {spec.name} (IO contract: iospec.json)"
    if postprocess is not None:
        postprocess(model)
    if _external_bytes(model) > external_data_threshold:
        data = path.name + ".data"
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data,
            size_threshold=EXTERNAL_DATA_MIN_TENSOR_BYTES,
        )
    else:
        onnx.save_model(model, str(path))
    del model
    onnx.checker.check_model(str(path))  # by path: works past 2 GB and checks the external data
    return path


def export_float(
    pipe: Any,
    out_dir: str | Path,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    components: Iterable[str] = COMPONENTS,
    *,
    static_size: int | Sequence[int] | None = None,
    batch: tuple[int, int, int] = (1, 1, 4),
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    overwrite: bool = False,
    assets: bool = True,
    fused_attention: bool = False,
) -> dict[str, Path]:
    """Export float ONNX graphs of a diffusers SD pipeline into ``out_dir``.

    Writes ``unet.onnx``, ``text_encoder.onnx``, ``vae_decoder.onnx`` (those in ``components``;
    ``<name>.onnx.data`` beside a graph whose weights pass ``external_data_threshold`` bytes) and
    ``iospec.json``. The folder appears only when every graph exported and passed the checker.
    Same pipeline and arguments give byte-identical files. Returns ``{component: path, "iospec": path}``.

    ``opset``: ONNX opset of the legacy exporter, one of :data:`SUPPORTED_OPSETS`. ``components``: any of
    ``unet``, ``text_encoder``, ``vae_decoder``. ``static_size`` / ``batch``: the shape profiles
    (see :func:`pipeline_specs`). ``external_data_threshold``: weight bytes past which a graph
    keeps its tensors in ``<name>.onnx.data``. ``overwrite``: replace an existing ``out_dir`` that an
    export wrote (:func:`is_export_output`); any other existing path is refused.
    ``assets``: also write ``tokenizer/``, ``scheduler/`` and ``manifest.json`` (target ``float``),
    which make the folder self-contained for a runtime (see :mod:`export.manifest`).

    The modules are put in eval mode and must be float32; ``fp16`` converts the exported graphs
    (see the module docstring). ``fused_attention``: the UNet's attention blocks as ONNX Runtime's
    contrib MultiHeadAttention (``export.qdq.attention``; a float32 graph for ONNX Runtime, which
    TensorRT cannot build); the pipeline's own processors are put back afterwards.
    """
    from export.qdq.attention import CONTRIB_OPSETS, check_fusable
    from export.qdq.attention import fused_attention as fused_attention_processors
    from export.qdq.ops import LoweringError

    check_opset(opset)
    components = tuple(components)
    if fused_attention:
        if "unet" not in components:
            raise ExportError("fused attention is an option of the UNet's graph; components has no unet")
        if fp16:
            raise ExportError(
                "fused attention is for float32 graphs run by ONNX Runtime; an fp16 export is for TensorRT, "
                "which cannot build ONNX Runtime's contrib MultiHeadAttention"
            )
        try:
            check_fusable(pipe.unet.attn_processors)
        except LoweringError as err:
            raise ExportError(str(err)) from err
    if not components:
        raise ExportError("components is empty; choose from " + str(list(COMPONENTS)))
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ExportError(f"unknown component(s) {unknown}; choose from {list(COMPONENTS)}")
    specs = pipeline_specs(pipe, components, fp16=fp16, static_size=static_size, batch=batch)
    if fp16 and "vae_decoder" in components and pipe.vae.config.get("force_upcast"):
        log.warning(
            "this VAE is marked force_upcast (it overflows in float16, as SDXL's does); prefer a float32 vae_decoder"
        )
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    with atomic_dir(out_dir, overwrite=overwrite, owned=is_export_output, what="export folder") as tmp:
        for c in components:
            wrapper = component_wrapper(pipe, c)
            dtypes = {p.dtype for p in wrapper.parameters()}
            if dtypes != {torch.float32}:
                raise ExportError(
                    f"{c} has {sorted(map(str, dtypes))} weights; load the pipeline in float32 "
                    "(fp16=True converts the exported graph, which keeps the timestep path in float32)"
                )
            start = time.perf_counter()
            fused = fused_attention and c == "unet"
            with fused_attention_processors(pipe.unet) if fused else contextlib.nullcontext():
                export_component(
                    wrapper,
                    specs[c],
                    tmp / f"{c}.onnx",
                    opset=opset,
                    external_data_threshold=external_data_threshold,
                    custom_opsets=CONTRIB_OPSETS if fused else None,
                )
            log.info(
                "exported %s (opset %d, %s) in %.1f s",
                c,
                opset,
                specs[c].metadata["precision"],
                time.perf_counter() - start,
            )
            written[c] = out_dir / f"{c}.onnx"
        (tmp / "iospec.json").write_text(specs_to_json(specs))
        if assets:
            write_assets(pipe, tmp)
            write_manifest(
                tmp,
                {
                    "target": "float",
                    "components": list(components),
                    "versions": versions(),
                    "model": model_identity(pipe.unet) if "unet" in components else None,
                }
                | ({"fused_attention": True} if fused_attention and "unet" in components else {}),
            )
    written["iospec"] = out_dir / "iospec.json"
    if assets:
        written["manifest"] = out_dir / MANIFEST
    return written


def check_opset(opset: int) -> None:
    """Refuse an opset outside :data:`SUPPORTED_OPSETS` before anything is traced."""
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"opset {opset} is not supported: choose one of {list(SUPPORTED_OPSETS)}, the opsets the "
            "exporter is tested at (21 is needed for 4-bit weights and the faithful target)"
        )


def is_export_output(path: str | Path) -> bool:
    """True for a folder ``export_float``/``export_onnx`` wrote: an export with its manifest, or graphs
    exported without assets (only ``iospec.json``, ``<name>.onnx`` and ``<name>.onnx.data``)."""
    path = Path(path)
    if is_export_folder(path):
        return True
    if path.is_symlink() or not path.is_dir() or not (path / "iospec.json").is_file():
        return False
    graphs = {f"{c}{ext}" for c in COMPONENTS for ext in (".onnx", ".onnx.data")}
    return all(p.name in graphs | {"iospec.json"} and p.is_file() and not p.is_symlink() for p in path.iterdir())


def write_assets(pipe: Any, folder: Path) -> None:
    """Save the pipeline's tokenizer(s) and scheduler beside the graphs (what a runtime needs besides
    them: ``tokenizer/``, SDXL's ``tokenizer_2/``, ``scheduler/``); a pipeline-like object without them
    (a bare UNet export) gets none."""
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if not hasattr(tokenizer, "save_pretrained"):
            continue
        tokenizer.save_pretrained(str(folder / name))
        # A fast tokenizer saves the padding/truncation state of its last call; drop it so the
        # same pipeline always writes the same bytes (transformers sets both per call anyway).
        fast = folder / name / "tokenizer.json"
        if fast.is_file():
            state = json.loads(fast.read_text(encoding="utf-8"))
            state["padding"] = state["truncation"] = None
            fast.write_text(json.dumps(state, indent=2, ensure_ascii=False), encoding="utf-8")
    if hasattr(getattr(pipe, "scheduler", None), "save_pretrained"):
        pipe.scheduler.save_pretrained(str(folder / "scheduler"))


def versions() -> dict[str, str]:
    import diffusers
    import onnxruntime

    return {
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
