"""One runner interface over ONNX Runtime sessions, TensorRT engines and PyTorch callables.

The protocol follows Polygraphy's runners: ``activate()`` loads what is heavy (a session, an engine
and its execution context), ``infer(feed)`` runs one call, ``deactivate()`` frees it; a runner is
also a context manager. Every runner owns the :class:`~export.iospec.NetworkSpec` of its network:
``infer`` checks the feed against it (names, dtypes, shapes inside the profile) before anything
runs, and checks the outputs' shapes against it afterwards.

``feed`` values are numpy arrays or torch tensors with exactly the spec's dtypes (cast before
calling: a silent cast would hide a float16/float32 mix-up). Outputs come back as numpy arrays
(:class:`OnnxRuntimeRunner`) or torch tensors on the runner's device (:class:`TorchRunner`,
:class:`TensorRTRunner`); :func:`to_torch` turns either into a torch tensor.

TensorRT is imported only when a :class:`TensorRTRunner` is activated, from ``tensorrt`` or, when
that is absent, ``tensorrt_rtx`` (same Python API for what is used here), so this module imports on
machines without either.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from export.iospec import FeedError, NetworkSpec

log = logging.getLogger(__name__)

Array = np.ndarray | torch.Tensor
TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx")
# ONNX Runtime's type strings for the spec's dtypes.
_ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "int32": "tensor(int32)",
    "int64": "tensor(int64)",
    "bool": "tensor(bool)",
}
_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}


class RunnerError(RuntimeError):
    """A runner used out of order (infer before activate) or a graph/engine that contradicts its spec."""


class BackendUnavailable(ValueError):
    """The requested backend cannot run on this machine (no CUDA, no TensorRT module)."""


def to_torch(value: Array) -> torch.Tensor:
    """A torch view of a runner output (numpy arrays are wrapped without a copy)."""
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))


def to_numpy(value: Array) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class Runner(ABC):
    """Runs one network under its IO contract.

    Subclasses implement ``_activate``, ``_infer`` and ``_deactivate``; the public methods add the
    state checks and feed/output validation that every backend shares.
    """

    device: str = "cpu"

    def __init__(self, spec: NetworkSpec, name: str | None = None):
        if not isinstance(spec, NetworkSpec):
            raise TypeError(f"spec must be an export.iospec.NetworkSpec, got {type(spec).__name__}")
        self.spec = spec
        self.name = name or f"{type(self).__name__}({spec.name})"
        self.is_active = False

    # --- protocol --------------------------------------------------------------------------------
    def activate(self) -> Self:
        """Load the session/engine. Activating an active runner does nothing."""
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        """Free the session/engine; the runner can be activated again."""
        if self.is_active:
            self._deactivate()
            self.is_active = False

    def infer(self, feed: Mapping[str, Array], check: bool = True) -> dict[str, Array]:
        """Run one call. ``feed``: ``{input name: array}`` matching the spec; returns ``{output name: array}``.

        Raises :class:`~export.iospec.FeedError` for a feed outside the spec (before running) and
        :class:`RunnerError` when inactive or when the outputs contradict the spec.
        """
        if not self.is_active:
            raise RunnerError(f"{self.name} is not active: call activate() first or use it as a context manager")
        dims = self.spec.check_feed(feed) if check else None
        outputs = self._infer(feed)
        if dims is not None:
            self._check_outputs(outputs, dims)
        return outputs

    def __enter__(self) -> Self:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def __repr__(self) -> str:
        return f"<{self.name} {'active' if self.is_active else 'inactive'}>"

    # --- backend hooks ---------------------------------------------------------------------------
    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _infer(self, feed: Mapping[str, Array]) -> dict[str, Array]: ...

    def _deactivate(self) -> None:  # noqa: B027 (optional hook: most backends hold nothing to release)
        pass

    def _check_outputs(self, outputs: Mapping[str, Array], dims: Mapping[str, int]) -> None:
        want = self.spec.output_shapes(dims)
        if set(outputs) != set(want):
            raise RunnerError(f"{self.name} returned outputs {sorted(outputs)}, the spec names {sorted(want)}")
        for name, shape in want.items():
            got = tuple(int(s) for s in outputs[name].shape)
            if got != shape:
                raise RunnerError(
                    f"{self.name}: output {name!r} has shape {got}, the spec gives {shape} for dims {dict(dims)}"
                )


# --- ONNX Runtime ---------------------------------------------------------------------------------
def default_ort_providers() -> list[str]:
    """CUDA first when this onnxruntime build exposes it (onnxruntime-gpu), then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeRunner(Runner):
    """An ONNX Runtime ``InferenceSession`` over ``path`` (a ``<name>.onnx.data`` beside it is loaded too).

    ``providers``: execution providers in priority order (default :func:`default_ort_providers`).
    ``optimization``: ``"all"`` (ORT_ENABLE_ALL: fusions and, for Q/DQ graphs, integer kernels) or
    ``"off"`` (ORT_DISABLE_ALL: the graph as written, the exact reference for Q/DQ emulation).
    ``threads``: intra-op threads (default: ONNX Runtime's choice, one per core).
    Outputs are numpy arrays.
    """

    OPTIMIZATIONS = ("all", "off")

    def __init__(
        self,
        path: str | os.PathLike,
        spec: NetworkSpec,
        providers: list[str] | None = None,
        optimization: str = "all",
        threads: int | None = None,
        name: str | None = None,
    ):
        super().__init__(spec, name or f"onnxruntime({spec.name})")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.name}: no ONNX graph at {self.path}")
        if optimization not in self.OPTIMIZATIONS:
            raise ValueError(f"optimization must be one of {self.OPTIMIZATIONS}, got {optimization!r}")
        self.providers = list(providers) if providers is not None else None
        self.optimization = optimization
        self.threads = threads
        self.session = None

    def _activate(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.optimization == "all"
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        if self.threads is not None:
            options.intra_op_num_threads = int(self.threads)
        # ORT rewrites DQ -> MatMul into MatMulNBits whose default accuracy level 4 quantizes the
        # activations too; level 0 keeps the graph's own semantics (the export is held to the simulator).
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        providers = self.providers if self.providers is not None else default_ort_providers()
        unknown = [p for p in providers if p not in ort.get_available_providers()]
        if unknown:
            raise BackendUnavailable(
                f"{self.name}: execution provider(s) {unknown} are not in this onnxruntime build "
                f"(available: {ort.get_available_providers()})"
            )
        session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        got = [(i.name, i.type) for i in session.get_inputs()]
        want = [(t.name, _ORT_TYPES[t.dtype]) for t in self.spec.inputs]
        if got != want:
            raise RunnerError(f"{self.path.name}: graph inputs {got} differ from the IO spec {want}")
        self.session = session
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    @property
    def active_providers(self) -> list[str]:
        return self.session.get_providers() if self.session is not None else []

    def _infer(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        inputs = {n: to_numpy(feed[n]) for n in self.spec.input_names}
        values = self.session.run(self.spec.output_names, inputs)
        return dict(zip(self.spec.output_names, values, strict=True))

    def _deactivate(self) -> None:
        self.session = None


# --- PyTorch --------------------------------------------------------------------------------------
class TorchRunner(Runner):
    """A ``torch.nn.Module`` or callable taking the spec's inputs positionally, in spec order.

    It returns one tensor (one-output specs), a tuple/list in spec output order, or a mapping with
    the spec's output names. ``device``: where inputs are moved (default: the module's parameters'
    device, else CPU). Runs under ``torch.inference_mode``; outputs are torch tensors.
    """

    def __init__(
        self,
        module_or_callable: Callable[..., Any],
        spec: NetworkSpec,
        device: str | torch.device | None = None,
        name: str | None = None,
    ):
        if not callable(module_or_callable):
            raise TypeError(f"TorchRunner needs a module or callable, got {type(module_or_callable).__name__}")
        super().__init__(spec, name or f"torch({spec.name})")
        self.fn = module_or_callable
        if device is None and isinstance(module_or_callable, torch.nn.Module):
            param = next(module_or_callable.parameters(), None)
            device = param.device if param is not None else "cpu"
        self.device = str(torch.device(device or "cpu"))

    def _activate(self) -> None:
        if isinstance(self.fn, torch.nn.Module):
            self.fn.eval()

    def _infer(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        args = [to_torch(feed[n]).to(self.device) for n in self.spec.input_names]
        with torch.inference_mode():
            out = self.fn(*args)
        names = self.spec.output_names
        if isinstance(out, torch.Tensor):
            out = (out,)
        if isinstance(out, Mapping) and set(names) <= set(out):
            return {n: out[n] for n in names}
        values = list(out.values()) if isinstance(out, Mapping) else list(out)
        if len(values) != len(names) or not all(isinstance(v, torch.Tensor) for v in values):
            raise RunnerError(
                f"{self.name}: the callable returned {type(out).__name__} with {len(values)} value(s); "
                f"expected tensors for {names}"
            )
        return dict(zip(names, values, strict=True))


# --- TensorRT -------------------------------------------------------------------------------------
def tensorrt_module_name() -> str | None:
    """``tensorrt`` or ``tensorrt_rtx``, whichever is installed (in that order), without importing it."""
    return next((m for m in TENSORRT_MODULES if importlib.util.find_spec(m) is not None), None)


def tensorrt_available() -> bool:
    """A TensorRT module is installed and torch sees a CUDA device."""
    return tensorrt_module_name() is not None and torch.cuda.is_available()


def _trt_to_torch(trt_dtype: Any) -> torch.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "INT8": torch.int8,
        "UINT8": torch.uint8,
        "BOOL": torch.bool,
    }
    if name not in table:
        raise RunnerError(f"TensorRT data type {name} has no torch equivalent here")
    return table[name]


class DeviceMemoryPool:
    """One CUDA scratch buffer shared by the execution contexts of several engines.

    The pipeline runs its engines one after another (each call synchronizes its stream), so the text
    encoder, UNet and VAE decoder can share the activation memory TensorRT would otherwise allocate
    per context: the pool grows to the largest engine's need. ``generation`` changes when it grows,
    which tells a runner to rebind (and to drop a captured CUDA graph that holds the old address).
    """

    def __init__(self, device: str = "cuda:0"):
        self.device = device
        self.buffer: torch.Tensor | None = None
        self.generation = 0

    def reserve(self, nbytes: int) -> None:
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=self.device)
            self.generation += 1

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.numel())


def _engine_scratch_bytes(engine: Any) -> int:
    for attr in ("device_memory_size_v2", "device_memory_size"):
        if hasattr(engine, attr):
            return int(getattr(engine, attr))
    return 0


class TensorRTRunner(Runner):
    """A serialized TensorRT (or TensorRT-RTX) engine, run on a torch CUDA stream.

    ``module``: ``"tensorrt"`` or ``"tensorrt_rtx"`` (default: the first installed); an engine only
    loads in the flavour and version that built it (``runtime.build`` records both).

    IO buffers are torch CUDA tensors: inputs are copied to the device (and cast to the engine's
    dtypes only when the spec already agreed), outputs are allocated from the spec's shapes and
    returned as CUDA tensors. ``cuda_graph=True`` captures one CUDA graph per input-shape signature
    (after one plain warm-up run, as TensorRT requires) and replays it while the shapes stay the
    same: the graph reads persistent input buffers, so each call copies its feed into them.
    Engines are tied to the GPU model and TensorRT version they were built with; deserialization
    fails otherwise, and this runner says so.
    """

    # torch device type of the IO buffers: "cuda" always, except in tests, where stand-ins for
    # TensorRT and torch.cuda run the real control flow on CPU tensors.
    device_type = "cuda"

    def __init__(
        self,
        engine_path: str | os.PathLike,
        spec: NetworkSpec,
        cuda_graph: bool = False,
        device: int = 0,
        module: str | None = None,
        name: str | None = None,
        memory_pool: DeviceMemoryPool | None = None,
    ):
        super().__init__(spec, name or f"tensorrt({spec.name})")
        self.memory_pool = memory_pool
        self._pool_generation = -1
        self.engine_path = Path(engine_path)
        if not self.engine_path.is_file():
            raise FileNotFoundError(f"{self.name}: no TensorRT engine at {self.engine_path} (build it first)")
        if module is not None and module not in TENSORRT_MODULES:
            raise ValueError(f"module must be one of {TENSORRT_MODULES}, got {module!r}")
        self.module = module
        self.cuda_graph = cuda_graph
        self.device = f"{self.device_type}:{device}"
        self.trt = None
        self.engine = None
        self.context = None
        self.stream = None
        self._graph = None  # (shape signature, CUDAGraph, input buffers, output buffers)

    def _activate(self) -> None:
        module = self.module or tensorrt_module_name()
        if module is None or importlib.util.find_spec(module) is None:
            raise BackendUnavailable(f"{self.name}: {module or ' nor '.join(TENSORRT_MODULES)} is not installed")
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"{self.name}: TensorRT engines need a CUDA GPU, and torch sees none "
                "(use the onnxruntime backend on this machine)"
            )
        trt = importlib.import_module(module)
        self.trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise RunnerError(
                f"{self.name}: {module} {getattr(trt, '__version__', '?')} could not deserialize {self.engine_path} "
                f"on {torch.cuda.get_device_name(self.device)}; engines only load with the TensorRT version "
                "and GPU model they were built with: rebuild it here"
            )
        self._check_engine_io(engine)
        self.engine = engine
        self.context = self._create_context(trt, engine)
        if self.context is None:
            raise RunnerError(f"{self.name}: could not create an execution context (out of GPU memory?)")
        self.stream = torch.cuda.Stream(device=self.device)
        self._runtime = runtime  # the engine must not outlive its runtime

    def _create_context(self, trt: Any, engine: Any) -> Any:
        """A context that uses the shared pool when one is given and this TensorRT can (10.x:
        ``ExecutionContextAllocationStrategy.USER_MANAGED``, older: ``..._without_device_memory``)."""
        pool = self.memory_pool
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if pool is not None and strategy is not None and hasattr(strategy, "USER_MANAGED"):
            context = engine.create_execution_context(strategy.USER_MANAGED)
        elif pool is not None and hasattr(engine, "create_execution_context_without_device_memory"):
            context = engine.create_execution_context_without_device_memory()
        else:
            self.memory_pool = None  # this TensorRT cannot share: the context owns its memory
            return engine.create_execution_context()
        pool.reserve(_engine_scratch_bytes(engine))
        return context

    def _bind_pool(self) -> None:
        pool = self.memory_pool
        if pool is None or pool.generation == self._pool_generation:
            return
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(pool.buffer.data_ptr(), pool.nbytes)
        else:
            self.context.device_memory = pool.buffer.data_ptr()
        self._pool_generation = pool.generation
        self._graph = None  # a captured graph holds the old address

    def _check_engine_io(self, engine: Any) -> None:
        trt = self.trt
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if sorted(inputs) != sorted(self.spec.input_names) or sorted(outputs) != sorted(self.spec.output_names):
            raise RunnerError(
                f"{self.engine_path.name}: engine inputs {inputs} / outputs {outputs} differ from the "
                f"IO spec {self.spec.input_names} / {self.spec.output_names}"
            )
        for t in self.spec.inputs + self.spec.outputs:
            got = _trt_to_torch(engine.get_tensor_dtype(t.name))
            if got != _TORCH_DTYPES[t.dtype]:
                raise RunnerError(
                    f"{self.engine_path.name}: tensor {t.name!r} is {got} in the engine, {t.dtype} in the spec"
                )

    def _infer(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        dims = self.spec.check_feed(feed)
        shapes = {n: tuple(int(s) for s in feed[n].shape) for n in self.spec.input_names}
        out_shapes = self.spec.output_shapes(dims)
        signature = tuple(sorted(shapes.items()))
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self._bind_pool()
            if self.cuda_graph and self._graph is not None and self._graph[0] == signature:
                _, graph, in_bufs, out_bufs = self._graph
                for n in in_bufs:
                    in_bufs[n].copy_(to_torch(feed[n]), non_blocking=True)
                graph.replay()
            else:
                in_bufs = {
                    n: to_torch(feed[n]).to(self.device, _TORCH_DTYPES[self.spec.input(n).dtype]).contiguous()
                    for n in self.spec.input_names
                }
                out_bufs = {
                    t.name: torch.empty(out_shapes[t.name], dtype=_TORCH_DTYPES[t.dtype], device=self.device)
                    for t in self.spec.outputs
                }
                self._bind(in_bufs, out_bufs)
                self._execute()
                if self.cuda_graph:
                    graph = torch.cuda.CUDAGraph()
                    self.stream.synchronize()
                    with torch.cuda.graph(graph, stream=self.stream):
                        self._execute()
                    self._graph = (signature, graph, in_bufs, out_bufs)
            self.stream.synchronize()
        # With a graph, the buffers are reused by the next call: hand out copies.
        return {n: (b.clone() if self.cuda_graph else b) for n, b in out_bufs.items()}

    def _bind(self, in_bufs: Mapping[str, torch.Tensor], out_bufs: Mapping[str, torch.Tensor]) -> None:
        for n, t in in_bufs.items():
            if not self.context.set_input_shape(n, tuple(t.shape)):
                raise FeedError(
                    f"{self.name}: TensorRT refused shape {tuple(t.shape)} for {n!r} (outside the engine's profile?)"
                )
        for n, t in {**in_bufs, **out_bufs}.items():
            self.context.set_tensor_address(n, t.data_ptr())

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RunnerError(f"{self.name}: execute_async_v3 failed (see TensorRT's log above)")

    def _deactivate(self) -> None:
        self._graph = None
        self.context = None
        self.engine = None
        self._runtime = None
        self.stream = None
