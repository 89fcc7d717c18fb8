"""Float ONNX export of a Stable Diffusion pipeline's UNet, text encoder and VAE decoder.

Each network is traced through a small ``nn.Module`` wrapper that fixes its call signature to the
IO contract in :mod:`export.iospec` (no diffusers code is copied or patched), exported with the
legacy TorchScript exporter (``dynamo=False``: measured here to export SD UNets in seconds and to
write valid graphs at opset 17, where the dynamo exporter took ~40 s and wrote an invalid one),
checked with ``onnx.checker``, and written atomically with the folder's ``iospec.json``.

``fp16=True`` casts the module's weights to float16 and traces it with float16 example inputs, so
the graph's float inputs, outputs and weights are float16 (the timestep stays float32; the
graph casts it where diffusers does). The trace runs the fp16 model on the CPU, which PyTorch
supports but slowly; ONNX Runtime's CPU provider lacks float16 kernels for most of these ops, so
fp16 graphs are for TensorRT (and GPU ONNX Runtime), and their numerical checks need a GPU.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from dgq.fsutil import atomic_dir
from export.iospec import ONNX_ELEM_TYPE, NetworkSpec, specs_to_json, text_encoder_spec, unet_spec, vae_decoder_spec

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "vae_decoder")
DEFAULT_OPSET = 17
# Protobuf cannot serialize a message over 2 GiB; past this many bytes of weights the graph keeps
# its tensors in one ``<name>.onnx.data`` file next to it.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # 2 GiB minus headroom for the graph itself
# Tensors smaller than this stay inline even in external-data graphs (shapes, small constants).
EXTERNAL_DATA_MIN_TENSOR_BYTES = 1024
_PIPELINE_ATTR = {"unet": "unet", "text_encoder": "text_encoder", "vae_decoder": "vae"}


class ExportError(RuntimeError):
    """A pipeline or component this exporter cannot turn into the documented graph."""


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
    return int(tokenizer.model_max_length)


def _check_supported(pipe: Any, components: Sequence[str]) -> None:
    if "text_encoder" in components and getattr(pipe, "text_encoder_2", None) is not None:
        raise ExportError(
            f"{type(pipe).__name__} has two text encoders whose penultimate hidden states and pooled output "
            "are combined; exporting them is not supported. Export components=('unet', 'vae_decoder') "
            "(the SDXL UNet is supported, with text_embeds and time_ids inputs)"
        )


def pipeline_specs(
    pipe: Any,
    components: Iterable[str] = COMPONENTS,
    *,
    fp16: bool = False,
    static_size: int | Sequence[int] | None = None,
    unet_batch: tuple[int, int, int] = (1, 2, 8),
    batch: tuple[int, int, int] = (1, 1, 4),
) -> dict[str, NetworkSpec]:
    """The IO specs of ``components`` of a diffusers SD pipeline, read from its configs.

    ``static_size`` is a latent (h, w) (or one int) that pins the UNet's and VAE decoder's spatial
    dims; ``unet_batch`` is the UNet's batch profile (already doubled for classifier-free
    guidance), ``batch`` the text encoder's and VAE decoder's (images per call).
    """
    components = tuple(components)
    _check_supported(pipe, components)
    specs = {}
    for c in components:
        module = _module(pipe, c)
        try:
            if c == "unet":
                specs[c] = unet_spec(module.config, _max_tokens(pipe), batch=unet_batch, static_size=static_size, fp16=fp16)
            elif c == "text_encoder":
                specs[c] = text_encoder_spec(module.config.to_dict(), _max_tokens(pipe), batch=batch, fp16=fp16)
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
        if t.dtype.startswith("int"):
            vocab_safe = 1000  # below any real vocabulary size
            out[name] = torch.randint(0, vocab_safe, shape, generator=gen, dtype=getattr(torch, t.dtype))
        elif name == "timestep":
            out[name] = torch.tensor(500.0, dtype=torch.float32)
        else:
            out[name] = torch.randn(shape, generator=gen).to(getattr(torch, t.dtype))
    return out


def _external_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _check_io(model: onnx.ModelProto, spec: NetworkSpec, path: Path) -> None:
    """The graph's inputs and outputs are exactly the spec's, in order, with its element types."""
    for kind, graph_io, spec_io in (("input", model.graph.input, spec.inputs), ("output", model.graph.output, spec.outputs)):
        got = [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in graph_io]
        want = [(t.name, ONNX_ELEM_TYPE[t.dtype], len(t.shape)) for t in spec_io]
        if got != want:
            raise ExportError(f"{path.name}: graph {kind}s (name, elem type, rank) {got} differ from the IO spec {want}")


def export_component(
    module: nn.Module,
    spec: NetworkSpec,
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Trace ``module`` (already wrapped and in the spec's precision) to ``path`` and check it."""
    inputs = example_inputs(spec)
    args = tuple(inputs[n] for n in spec.input_names)
    with tempfile.TemporaryDirectory(prefix=f".{spec.name}.trace.", dir=path.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        # The tracer warns at every Python branch on a shape (diffusers' size checks, CLIP's causal
        # mask); those branches are fixed for the documented profiles, and the tests run each graph
        # at several batch sizes and resolutions, so the warnings carry no information here.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module,
                args,
                str(raw),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        # Loads external tensors too when the exporter spilled a >2 GB model into per-tensor files.
        model = onnx.load(str(raw))
    _check_io(model, spec, path)
    model.doc_string = f"dgq float export of {spec.name} (IO contract: iospec.json)"
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
    unet_batch: tuple[int, int, int] = (1, 2, 8),
    batch: tuple[int, int, int] = (1, 1, 4),
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Export float ONNX graphs of a diffusers SD pipeline into ``out_dir``.

    Writes ``unet.onnx``, ``text_encoder.onnx``, ``vae_decoder.onnx`` (those in ``components``;
    ``<name>.onnx.data`` beside a graph whose weights pass ``external_data_threshold`` bytes) and
    ``iospec.json``. The folder appears only when every graph exported and passed the checker.
    Same pipeline and arguments give byte-identical files. Returns ``{component: path, "iospec": path}``.

    The modules are exported in eval mode and left as they were; with ``fp16`` they are traced from
    a float16 copy (see the module docstring for what that means on CPU).
    """
    components = tuple(components)
    if not components:
        raise ExportError("components is empty; choose from " + str(list(COMPONENTS)))
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown:
        raise ExportError(f"unknown component(s) {unknown}; choose from {list(COMPONENTS)}")
    specs = pipeline_specs(pipe, components, fp16=fp16, static_size=static_size, unet_batch=unet_batch, batch=batch)
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for c in components:
            module = _module(pipe, c)
            wrapper = WRAPPERS[c](_precision_copy(module, fp16)).eval()
            start = time.perf_counter()
            export_component(wrapper, specs[c], tmp / f"{c}.onnx", opset=opset, external_data_threshold=external_data_threshold)
            log.info("exported %s (opset %d, %s) in %.1f s", c, opset, specs[c].metadata["precision"], time.perf_counter() - start)
            written[c] = out_dir / f"{c}.onnx"
        (tmp / "iospec.json").write_text(specs_to_json(specs))
    written["iospec"] = out_dir / "iospec.json"
    return written


def _precision_copy(module: nn.Module, fp16: bool) -> nn.Module:
    """The module itself (float32), or a float16 copy so the caller's pipeline is left untouched."""
    if not fp16:
        return module
    import copy

    return copy.deepcopy(module).to(torch.float16)
