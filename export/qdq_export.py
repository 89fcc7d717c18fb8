"""Export a pipeline and a DGQ recipe to an export folder: Q/DQ UNet, float text encoder and VAE decoder.

``export_onnx(pipe, out_dir, recipe, target)`` writes, atomically (a failure leaves no folder):
``unet.onnx`` (Q/DQ, see :mod:`export.qdq`), ``text_encoder.onnx`` and ``vae_decoder.onnx`` (float),
``iospec.json`` (the UNet's spec gains a ``step_index`` input when the recipe is time-aware),
``recipe.safetensors``, ``tokenizer/``, ``scheduler/``, ``summary.json`` and ``manifest.json``.
``target="float"`` writes the float graphs only (the reference for sizes and speed).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from common.constants import BRANCH_GROUPS, FAITHFUL_GROUPS, QUANT_TARGETS
from common.fsutil import atomic_dir, scratch_dir
from dgq.config import ORT_MIN_INTENSITY, QuantConfig, preset
from dgq.fingerprint import model_identity
from dgq.quant import PIXEL
from dgq.recipe import Recipe
from export.float_export import (
    COMPONENTS,
    DEFAULT_OPSET,
    WRAPPERS,
    ExportError,
    check_opset,
    component_wrapper,
    export_component,
    is_export_output,
    pipeline_specs,
    versions,
    write_assets,
)
from export.iospec import TensorSpec, specs_to_json
from export.lint import check_tensorrt
from export.manifest import MANIFEST, TARGETS, sha256_file, write_manifest
from export.qdq import STEP_INPUT, Lowered, LoweringError, lower, site_counts
from export.qdq.attention import CONTRIB_OPSETS, fusion_blocker

log = logging.getLogger(__name__)

INT4_OPSET = 21  # INT4 tensors and block-wise DequantizeLinear
# The onnxruntime profile's calibration defaults (export CLI, benchmark): attention q/k/v and
# probabilities stay float, because ONNX Runtime CPU runs quantized attention BMMs slower than
# float at SD latent sizes (its QDQ MatMul fusion needs constant scales and the probabilities' scale
# is per prompt), and the linear/conv integer kernels carry the speed-up.
ORT_PRESET = {"profile": "onnxruntime", "quantize_qkv": False, "attn_probs": "float"}
OUTLIER_BITS = 16  # tensorrt: the widest group stays float


def target_config(
    target: str, wbits: int = 8, abits: int = 8, groups: int | None = None, outlier_bits: int | None = OUTLIER_BITS
) -> QuantConfig:
    """The DGQ config a quantized export ``target`` is calibrated with by default (``groups`` None:
    its default K)."""
    if target == "tensorrt":
        k = BRANCH_GROUPS if groups is None else groups
        return preset("dgq", wbits=wbits, abits=abits, groups=k, profile="tensorrt", outlier_bits=outlier_bits)
    if target == "onnxruntime":
        k = BRANCH_GROUPS if groups is None else groups
        return preset("dgq", wbits=wbits, abits=abits, groups=k, min_intensity=ORT_MIN_INTENSITY, **ORT_PRESET)
    if target == "faithful":
        return preset("dgq", wbits=wbits, abits=abits, groups=FAITHFUL_GROUPS if groups is None else groups)
    raise ExportError(f"target {target!r} has no DGQ config; quantized targets: {list(QUANT_TARGETS)}")


@dataclass
class ExportSummary:
    target: str
    opset: int
    files: dict[str, int]  # file -> bytes
    float_bytes: dict[str, int]  # component -> bytes of its float32 graph (measured by exporting it)
    nodes: dict[str, dict[str, int]]  # component -> op type -> count
    qdq_pairs: int
    sites: dict[str, int]
    warnings: list[str]
    seconds: float
    ort_integer_kernels: dict[str, int] | None = None  # fused integer ops in ORT CPU's optimized UNet graph

    def size_ratio(self, component: str = "unet") -> float | None:
        f = self.float_bytes.get(component)
        return None if not f else self.files[f"{component}.onnx"] / f

    def table(self) -> str:
        lines = [f"target {self.target}, opset {self.opset}, exported in {self.seconds:.1f} s"]
        for c, ops in self.nodes.items():
            top = ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:8])
            lines.append(f"  {c}: {sum(ops.values())} nodes ({top})")
        lines.append(f"  Q/DQ pairs {self.qdq_pairs}; sites {self.sites}")
        if self.ort_integer_kernels is not None:
            lines.append(
                f"  ONNX Runtime CPU integer kernels after its optimizer: {self.ort_integer_kernels or 'none'}"
            )
        for c, fb in self.float_bytes.items():
            b = self.files.get(f"{c}.onnx")
            if b:
                lines.append(f"  {c}.onnx {b / 2**20:.2f} MiB = {b / fb:.3f}x the float32 graph ({fb / 2**20:.2f} MiB)")
        if self.warnings:
            lines.append(f"  {len(self.warnings)} TensorRT lint warning(s), e.g. {self.warnings[0]}")
        return "\n".join(lines)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _latent_size(pipe: Any, recipe: Recipe) -> int:
    size = recipe.meta.get("size")
    if size:
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1) if getattr(pipe, "vae", None) is not None else 8
        return int(size) // factor
    return int(pipe.unet.config.sample_size)


def _has_pixel_groups(recipe: Recipe) -> bool:
    return any(PIXEL in a.axis for a in recipe.acts.values())


def int4_tensor(name: str, values: np.ndarray, signed: bool) -> onnx.TensorProto:
    """An INT4/UINT4 initializer in raw_data, two values per byte, first in the low nibble (the
    ONNX layout; ``helper.make_tensor`` from a list stores varints, ~1.4 bytes per pair)."""
    flat = (values.astype(np.int16).flatten() & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    packed = flat[0::2] | (flat[1::2] << 4)
    return helper.make_tensor(
        name, TensorProto.INT4 if signed else TensorProto.UINT4, list(values.shape), packed.tobytes(), raw=True
    )


def _drop_unread_initializers(g: onnx.GraphProto) -> None:
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(keep)


def own_weight_initializers(model: onnx.ModelProto) -> int:
    """Give every weight DequantizeLinear its own integer weight and zero-point initializers.

    The exporter deduplicates equal initializers (all-zero zero points of equally wide layers) into
    one, read through Identity nodes. ONNX Runtime's exact integer path for x86 CPUs without VNNI
    converts each int8 weight and its zero point to uint8 in place, and refuses a zero point that
    two weights share ("Attempt to replace the existing tensor"). Returns the number of copies made.
    """
    g = model.graph
    init = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def source(name: str) -> str:
        while name not in init and name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        return name

    integer = (TensorProto.INT8, TensorProto.UINT8)
    # every reader of an initializer (an activation Q/DQ's zero point may equal a weight's)
    readers = Counter(source(i) for n in g.node if n.op_type != "Identity" for i in n.input)
    copies: list[onnx.TensorProto] = []
    for n in g.node:
        if n.op_type != "DequantizeLinear" or source(n.input[0]) not in init:
            continue
        for pos in (0, 2):
            if pos >= len(n.input) or source(n.input[pos]) not in init:
                continue
            src = init[source(n.input[pos])]
            if src.data_type not in integer:
                continue
            name = src.name
            if readers[name] > 1:  # someone else reads it too: this weight takes a copy
                readers[name] -= 1
                name = f"{src.name}.{len(copies)}"
                t = onnx.TensorProto()
                t.CopyFrom(src)
                t.name = name
                copies.append(t)
            n.input[pos] = name
    g.initializer.extend(copies)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    while True:  # Identity nodes of deduplicated initializers that nothing reads any more
        dead = [n for n in g.node if n.op_type == "Identity" and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    _drop_unread_initializers(g)
    return len(copies)


def bypass_identities(model: onnx.ModelProto) -> int:
    """Read every Identity node's input directly and drop the node (one the graph outputs stays).

    The exporter reads a deduplicated initializer (a per-step table equal in two quantizers) through
    Identity nodes; each is a layer of its own in TensorRT's network. Returns the number removed.
    """
    g = model.graph
    outputs = {o.name for o in g.output}
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.output[0] not in outputs}

    def source(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    keep = [n for n in g.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = source(name)
    del g.node[:]
    g.node.extend(keep)
    return len(alias)


def drop_zero_points(model: onnx.ModelProto) -> int:
    """Drop the zero-point input of every DequantizeLinear whose zero point is all zeros.

    The input is optional in ONNX (absent, it is 0 of the quantized input's type), and TensorRT only
    takes zero points of 0; its ONNX parser adds a constant layer for each one a graph spells out.
    QuantizeLinear keeps its zero point: below opset 21 its type sets the output's (int8, not uint8).
    Returns the number dropped.
    """
    g = model.graph
    init = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def all_zero(name: str) -> bool:
        if name in init:
            t = init[name]
            if t.data_location == TensorProto.EXTERNAL:
                return False
        elif name in consts and consts[name].attribute and consts[name].attribute[0].name == "value":
            t = consts[name].attribute[0].t
        else:
            return False
        return not numpy_helper.to_array(t).any()

    dropped = 0
    for n in g.node:
        if n.op_type == "DequantizeLinear" and len(n.input) == 3 and n.input[2] and all_zero(n.input[2]):
            del n.input[2]
            dropped += 1
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    nodes = [n for n in g.node if n.op_type != "Constant" or n.output[0] in read]
    del g.node[:]
    g.node.extend(nodes)
    _drop_unread_initializers(g)
    return dropped


def pack_int4_weights(model: onnx.ModelProto, gemm_only: bool = False) -> int:
    """Store the integer weights of every DequantizeLinear as INT4/UINT4 (with their zero points).

    Called for 4-bit recipes at opset >= 21; values already lie on the 4-bit grid. A zero point
    shared with an 8-bit node gets its own copy. ``gemm_only`` (TensorRT: INT4 is a weight-only
    GEMM feature) leaves conv weights in their INT8 container. Returns the number of weights packed.
    """
    from export.lint import GraphIndex, feeds_gemm

    g = model.graph
    lint_graph = GraphIndex(model) if gemm_only else None
    init = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def source(name: str) -> str:  # through the exporter's Identity nodes for deduplicated initializers
        while name not in init and name in producer and producer[name].op_type == "Identity":
            name = producer[name].input[0]
        return name

    for n in g.node:  # read weights and zero points straight from their initializers
        if n.op_type == "DequantizeLinear":
            for pos in (0, 2):
                if pos < len(n.input) and source(n.input[pos]) in init:
                    n.input[pos] = source(n.input[pos])
    users: dict[str, int] = Counter(i for n in g.node for i in n.input)
    packed = 0
    new: dict[str, onnx.TensorProto] = {}
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in init:
            continue
        if gemm_only and not feeds_gemm(lint_graph, n.output[0]):
            continue
        for pos in (0, 2):
            if pos >= len(n.input) or n.input[pos] not in init:
                continue
            src = init[n.input[pos]]
            if src.data_type not in (TensorProto.INT8, TensorProto.UINT8):
                continue
            arr = numpy_helper.to_array(src)
            signed = src.data_type == TensorProto.INT8
            lo, hi = (-8, 7) if signed else (0, 15)
            if arr.size and (arr.min() < lo or arr.max() > hi):
                raise ExportError(f"weight {src.name!r} has values outside the 4-bit grid; is this a 4-bit recipe?")
            name = f"{src.name}.int4"
            if name not in new:
                new[name] = int4_tensor(name, arr, signed)
            users[n.input[pos]] -= 1
            n.input[pos] = name
            packed += pos == 0
    keep = [t for t in g.initializer if users.get(t.name, 0) > 0]
    del g.initializer[:]
    g.initializer.extend(keep + list(new.values()))
    return packed


def export_onnx(
    pipe: Any,
    out_dir: str | Path,
    recipe: Recipe | None = None,
    target: str = "faithful",
    *,
    opset: int | None = None,
    components: Iterable[str] = COMPONENTS,
    batch: tuple[int, int, int] = (1, 1, 4),
    overwrite: bool = False,
    compare_float: bool = True,
    inspect_ort: bool = True,
    progress: bool = False,
    fused_attention: bool | None = None,
) -> ExportSummary:
    """Export ``pipe`` (with ``recipe`` for a quantized ``target``) into ``out_dir``; see the module docstring.

    ``opset``: default 17 for 8-bit tensorrt graphs and the onnxruntime target, 21 for 4-bit weights
    (INT4 tensors) and for the faithful target (INT16 zero points); one of ``SUPPORTED_OPSETS``.
    ``overwrite``: replace an existing ``out_dir`` that an export wrote, never anything else.
    ``compare_float``: also export the float32 UNet to a temporary folder beside ``out_dir`` to report
    the size ratio. ``inspect_ort``: report the integer kernels ONNX Runtime CPU fuses the UNet into
    (``ort_integer_kernels``). The UNet must be float32. ``fused_attention``: the UNet's attention
    blocks as ONNX Runtime's contrib MultiHeadAttention (targets ``float`` and ``onnxruntime``, whose
    graphs run in ONNX Runtime; ``export.qdq.attention``). None, the default: on for the onnxruntime
    target wherever it applies (float attention operands, diffusers' plain attention processors;
    otherwise off, with the reason logged), off for the others; True refuses where it does not apply.
    """
    if target not in TARGETS:
        raise ExportError(f"target {target!r} is not one of {list(TARGETS)}")
    if opset is not None:
        check_opset(opset)
    components = tuple(components)
    start = time.perf_counter()
    if fused_attention is None:
        fused_attention = target == "onnxruntime" and _fuses_by_default(pipe.unet, recipe)
    if target == "float":
        from export.float_export import export_float

        opset = DEFAULT_OPSET if opset is None else opset
        written = export_float(
            pipe,
            out_dir,
            opset=opset,
            components=components,
            batch=batch,
            overwrite=overwrite,
            fused_attention=fused_attention,
        )
        sizes = {p.name: p.stat().st_size for k, p in written.items() if k in COMPONENTS}
        nodes = {c: op_counts(onnx.load(str(written[c]), load_external_data=False)) for c in components}
        return ExportSummary(
            "float", opset, sizes, dict(sizes_by_component(sizes)), nodes, 0, {}, [], time.perf_counter() - start
        )
    if recipe is None:
        raise ExportError(
            f"target {target!r} needs a recipe (calibrate first: dgq calibrate, or let scripts/export_onnx.py do it)"
        )
    if "unet" not in components:
        raise ExportError("a quantized export needs the unet component")
    recipe.check_model(pipe.unet)
    # onnxruntime: its integer kernels take int8 weights, so 4-bit values stay in INT8 containers
    four_bit = recipe.config.wbits <= 4 and target != "onnxruntime"
    # faithful: INT16 zero points for group ranges that exclude 0 (QuantizeLinear-21)
    needs_21 = four_bit or target == "faithful"
    if opset is None:
        opset = INT4_OPSET if needs_21 else DEFAULT_OPSET
    if needs_21 and opset < INT4_OPSET:
        why = (
            "4-bit weights need INT4 tensors and block-wise DequantizeLinear"
            if four_bit
            else "the faithful target needs INT16 zero points for group ranges that exclude 0"
        )
        raise ExportError(f"opset {opset} is too old: {why} (opset >= {INT4_OPSET})")
    static = _latent_size(pipe, recipe) if _has_pixel_groups(recipe) else None
    specs = pipeline_specs(pipe, components, static_size=static, batch=batch)
    text_tokens = specs["unet"].input("encoder_hidden_states").shape[1]
    tokens = text_tokens if isinstance(text_tokens, int) else None  # static: the BOS split as Gathers
    try:
        lowered: Lowered = lower(pipe.unet, recipe, target, tokens=tokens, fused_attention=fused_attention)
    except LoweringError as err:
        raise ExportError(str(err)) from err
    unet_spec = specs["unet"]
    meta = {
        "target": target,
        "recipe_profile": recipe.config.profile,
        "wbits": recipe.config.wbits,
        "abits": recipe.config.abits,
    }
    if lowered.n_slots > 1:
        unet_spec = unet_spec.with_inputs(TensorSpec(STEP_INPUT, "int64", ()), slots=list(recipe.slots), **meta)
    else:
        unet_spec = unet_spec.with_inputs(**meta)
    specs["unet"] = unet_spec
    warnings_found: list[str] = []

    def post(model: onnx.ModelProto) -> None:
        own_weight_initializers(model)
        bypass_identities(model)
        if four_bit:
            n = pack_int4_weights(model, gemm_only=target == "tensorrt")
            log.info("packed %d weights as INT4", n)
        if target == "tensorrt":
            drop_zero_points(model)
            warnings_found.extend(str(v) for v in check_tensorrt(model))

    out_dir = Path(out_dir)
    nodes: dict[str, dict[str, int]] = {}
    with atomic_dir(out_dir, overwrite, is_export_output, "export folder") as tmp:
        steps = [c for c in COMPONENTS if c in components]
        from tqdm.auto import tqdm

        for c in tqdm(steps, desc=f"export ({target})", unit="graph", disable=not progress):
            t0 = time.perf_counter()
            if c == "unet":
                export_component(
                    lowered.module,
                    unet_spec,
                    tmp / "unet.onnx",
                    opset=opset,
                    postprocess=post,
                    doc=f"dgq {target} Q/DQ export of the UNet (recipe: recipe.safetensors; IO: iospec.json)",
                    custom_opsets=CONTRIB_OPSETS if fused_attention else None,
                )
            else:
                export_component(
                    component_wrapper(pipe, c),
                    specs[c],
                    tmp / f"{c}.onnx",
                    opset=opset,
                )
            log.info("exported %s in %.1f s", c, time.perf_counter() - t0)
            nodes[c] = op_counts(onnx.load(str(tmp / f"{c}.onnx"), load_external_data=False))
        (tmp / "iospec.json").write_text(specs_to_json(specs))
        recipe.save(tmp / "recipe.safetensors")
        write_assets(pipe, tmp)
        with scratch_dir(out_dir) as scratch:  # beside the output, under the temporary prefix
            float_bytes = _float_unet_bytes(pipe, specs, opset, scratch) if compare_float else {}
            kernels = ort_integer_kernels(tmp / "unet.onnx", scratch) if inspect_ort else None
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.suffix == ".onnx"}
        qdq = nodes["unet"].get("QuantizeLinear", 0)
        summary = ExportSummary(
            target,
            opset,
            files,
            float_bytes,
            nodes,
            qdq,
            site_counts(lowered.sites),
            warnings_found,
            round(time.perf_counter() - start, 1),
            kernels,
        )
        (tmp / "summary.json").write_text(
            json.dumps(asdict(summary) | {"unet_size_ratio": summary.size_ratio()}, indent=2) + "\n"
        )
        write_manifest(
            tmp,
            {
                "target": target,
                "components": list(components),
                "versions": versions(),
                "model": model_identity(pipe.unet),
                "slots": list(recipe.slots) if lowered.n_slots > 1 else None,
                "steps": recipe.meta.get("num_inference_steps"),
                "guidance": recipe.meta.get("guidance_scale"),
                "recipe": {
                    "file": "recipe.safetensors",
                    "sha256": sha256_file(tmp / "recipe.safetensors"),
                    "config": recipe.config.to_dict(),
                },
            }
            | ({"fused_attention": True} if fused_attention else {}),
        )
    return summary


def _fuses_by_default(unet: torch.nn.Module, recipe: Recipe | None) -> bool:
    """The onnxruntime target's default: fused attention wherever it applies (it runs faster in ONNX
    Runtime, docs/export-targets.md); where not, the plain attention graph and the reason, logged."""
    why = fusion_blocker(unet, None if recipe is None else recipe.config)
    if why is not None:
        log.info("attention exported unfused (the onnxruntime target fuses it where it can): %s", why)
    return why is None


def sizes_by_component(sizes: dict[str, int]) -> dict[str, int]:
    return {Path(k).stem: v for k, v in sizes.items()}


ORT_INTEGER_OPS = (
    "QLinearConv",
    "MatMulIntegerToFloat",
    "QGemm",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulNBits",
    "QAttention",
)


def ort_optimized_ops(path: Path, scratch: Path | None = None) -> Counter:
    """Op counts of ONNX Runtime CPU's optimized version of the graph at ``path`` (MatMulNBits at
    accuracy level 0, as the runtime runs it). The optimized graph is written to a temporary folder
    in ``scratch`` (default: the system's)."""
    import onnxruntime as ort

    from export.ort_session import session_options

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        so = session_options(optimize=True, threads=None)
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)


def ort_integer_kernels(path: Path, scratch: Path | None = None) -> dict[str, int]:
    """Counts of the integer ops in :func:`ort_optimized_ops`."""
    ops = ort_optimized_ops(path, scratch)
    return {k: ops[k] for k in ORT_INTEGER_OPS if ops.get(k)}


def _float_unet_bytes(pipe: Any, specs: dict, opset: int, scratch: Path | None = None) -> dict[str, int]:
    """Bytes of the float32 UNet graph with the same spec (exported to a temporary folder in ``scratch``)."""
    spec = specs["unet"]
    base = replace(spec, inputs=tuple(t for t in spec.inputs if t.name != STEP_INPUT))
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        path = Path(tmp) / "unet.onnx"
        with torch.no_grad():
            export_component(WRAPPERS["unet"](pipe.unet).eval(), base, path, opset=opset)
        return {"unet": path.stat().st_size + sum(p.stat().st_size for p in Path(tmp).glob("*.data"))}


__all__ = ["MANIFEST", "ORT_PRESET", "ExportSummary", "export_onnx", "pack_int4_weights"]
