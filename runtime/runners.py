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
machines without either. Supported: TensorRT 10.x and TensorRT-RTX 1.x (``runtime.build.SUPPORTED_MAJORS``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from common.errors import DGQError
from export.iospec import FeedError, NetworkSpec
from runtime.build import TENSORRT_MODULES

log = logging.getLogger(__name__)

Array = np.ndarray | torch.Tensor
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


class RunnerError(DGQError, RuntimeError):
    """A runner used out of order (infer before activate) or a graph/engine that contradicts its spec."""


class BackendUnavailable(DGQError, ValueError):
    """The requested backend cannot run on this machine (no CUDA, no TensorRT module)."""


def to_torch(value: Array) -> torch.Tensor:
    """A torch view of a runner output or feed value, same shape (0-d stays 0-d); numpy arrays are
    wrapped without a copy when already C-contiguous."""
    if isinstance(value, torch.Tensor):
        return value
    # np.ascontiguousarray would make a 0-d array (a scalar timestep) 1-d; asarray(order="C") keeps the rank.
    return torch.from_numpy(np.asarray(value, order="C"))


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

        from export.ort_session import create_session

        providers = self.providers if self.providers is not None else default_ort_providers()
        unknown = [p for p in providers if p not in ort.get_available_providers()]
        if unknown:
            raise BackendUnavailable(
                f"{self.name}: execution provider(s) {unknown} are not in this onnxruntime build "
                f"(available: {ort.get_available_providers()})"
            )
        # The project's session options: the optimized graph computes what its nodes say on every CPU
        # (MatMulNBits at accuracy level 0; ORT's exact integer path where its fast one saturates).
        try:
            session = create_session(self.path, self.optimization == "all", self.threads, providers)
        except _ort_errors() as err:
            raise RunnerError(f"{self.path.name}: ONNX Runtime cannot load the graph: {_first_line(err)}") from err
        got = [(i.name, i.type) for i in session.get_inputs()]
        want = [(t.name, _ORT_TYPES[t.dtype]) for t in self.spec.inputs]
        if got != want:
            raise RunnerError(f"{self.path.name}: graph inputs {got} differ from the IO spec {want}")
        # Static sizes too: a graph of another model (say, another text width) has the same input names.
        for i, t in zip(session.get_inputs(), self.spec.inputs, strict=True):
            graph = list(i.shape)
            if len(graph) != len(t.shape) or any(
                isinstance(w, int) and isinstance(g, int) and g != w for g, w in zip(graph, t.shape, strict=True)
            ):
                raise RunnerError(
                    f"{self.path.name}: input {t.name!r} has shape {graph} but the IO spec says {list(t.shape)}; "
                    "the graph is not this export's (re-export)"
                )
        self.session = session
        self.device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    @property
    def active_providers(self) -> list[str]:
        return self.session.get_providers() if self.session is not None else []

    def _infer(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        inputs = {n: to_numpy(feed[n]) for n in self.spec.input_names}
        try:
            values = self.session.run(self.spec.output_names, inputs)
        except _ort_errors() as err:
            raise RunnerError(f"{self.path.name}: ONNX Runtime failed: {_first_line(err)}") from err
        return dict(zip(self.spec.output_names, values, strict=True))

    def _deactivate(self) -> None:
        self.session = None


def _ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's own exception classes (they derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = (
        "Fail",
        "InvalidArgument",
        "NoSuchFile",
        "NoModel",
        "EngineError",
        "RuntimeException",
        "InvalidProtobuf",
        "ModelLoaded",
        "NotImplemented",
        "InvalidGraph",
        "EPFail",
    )
    return tuple(c for n in names if isinstance(c := getattr(state, n, None), type))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return " ".join(text.split())[:400] if text else type(err).__name__


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
    per context: the pool grows to the largest engine's need. ``generation`` changes whenever the
    buffer changes (grown or freed), which tells a runner to rebind (and to drop a captured CUDA graph
    that holds the old address). Runners ``acquire`` it on activation and ``release`` it on
    deactivation; the buffer is freed when the last one releases it.

    ``device``: where the buffer lives (default: the device of the first runner that reserves);
    every runner sharing the pool must run there.
    """

    def __init__(self, device: str | None = None):
        self.device = device
        self.buffer: torch.Tensor | None = None
        self.generation = 0
        self._users: set[int] = set()

    def reserve(self, nbytes: int, device: str | None = None) -> None:
        """Grow the buffer to at least ``nbytes``; ``device``: the caller's, refused when it differs."""
        if device is not None:
            if self.device is None:
                self.device = device
            elif not _same_device(self.device, device):
                raise RunnerError(
                    f"the memory pool is on {self.device} but a runner sharing it runs on {device}; "
                    "give each device its own DeviceMemoryPool"
                )
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=self.device or "cuda")
            self.generation += 1

    def acquire(self, user: object) -> None:
        self._users.add(id(user))

    def release(self, user: object) -> None:
        """Forget ``user``; free the buffer when no runner holds the pool any more."""
        self._users.discard(id(user))
        if not self._users and self.buffer is not None:
            self.buffer = None
            self.generation += 1

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else int(self.buffer.numel())


def _same_device(a: str, b: str) -> bool:
    """``cuda`` and ``cuda:0`` are one device here (torch's current device is 0 unless set otherwise)."""
    da, db = torch.device(a), torch.device(b)
    return da.type == db.type and (da.index or 0) == (db.index or 0)


def _engine_scratch_bytes(engine: Any) -> int:
    for attr in ("device_memory_size_v2", "device_memory_size"):
        if hasattr(engine, attr):
            return int(getattr(engine, attr))
    return 0


# How many CUDA graphs (one per input-shape signature) a runner keeps: enough for a pipeline that
# alternates between a few shapes (guidance on/off, two resolutions) without re-capturing, each
# capture costing a device synchronize, a gc pass and an empty_cache.
MAX_CUDA_GRAPHS = 4
GRAPH_MODES = ("off", "manual", "tensorrt-rtx")


class TensorRTRunner(Runner):
    """A serialized TensorRT (or TensorRT-RTX) engine, run on its own torch CUDA stream.

    ``module``: ``"tensorrt"`` or ``"tensorrt_rtx"`` (default: the first installed); an engine only
    loads in the flavour and version that built it (``runtime.build`` records both). A TensorRT major
    version this code does not support is refused on activation (:class:`BackendUnavailable`).

    IO buffers are torch CUDA tensors: inputs are copied to the device (and cast to the engine's
    dtypes only when the spec already agreed), outputs are allocated from the spec's shapes, checked
    against the engine's own (``get_tensor_shape``) before anything runs, and returned as CUDA
    tensors. Streams: the runner's stream first waits for the caller's current stream (which wrote the
    inputs); the caller's stream then waits for the runner's, and the outputs are recorded on it, so
    the caching allocator does not hand their memory to the next call while the caller still reads
    them. Calls return synchronized (the pipeline's per-stage timings rely on it).

    ``cuda_graph=True``: with TensorRT-RTX, its built-in CUDA graphs (``CudaGraphStrategy``, captured
    per shape by TensorRT-RTX itself; manual capture of dynamic-shape engines is unreliable there);
    otherwise one CUDA graph per input-shape signature (up to :data:`MAX_CUDA_GRAPHS`), captured after
    one plain run, as TensorRT requires, and replayed while the shapes repeat. A captured graph reads
    runner-owned input buffers, into which each call copies its feed. When TensorRT says the context
    cannot be captured on its stream (``is_stream_capturable``), or capture fails, the runner warns
    once and runs plainly. ``graph_mode`` says which applies (``"off"``, ``"manual"``,
    ``"tensorrt-rtx"``) once active.

    ``memory_pool``: a :class:`DeviceMemoryPool` shared with other runners (the context is created
    ``USER_MANAGED`` and bound to the pool before every run that follows a change of the pool).
    ``runtime_cache`` (TensorRT-RTX): a file for its runtime cache of compiled kernels, loaded on
    activation and written on deactivation; without one the cache lives as long as this runner, so
    re-activation does not recompile.

    Engines are tied to the GPU model and TensorRT version they were built with; deserialization
    fails otherwise, and this runner says so.
    """

    # torch device type of the IO buffers: "cuda" always, except in tests, where stand-ins for
    # TensorRT and torch.cuda run the real control flow on CPU tensors (device "cpu", which, like a
    # CUDA device, .to() returns a tensor already on it from unchanged).
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
        runtime_cache: str | os.PathLike | None = None,
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
        self.device = f"{self.device_type}:{device}" if self.device_type == "cuda" else self.device_type
        self.runtime_cache_path = Path(runtime_cache) if runtime_cache is not None else None
        self.trt = None
        self.engine = None
        self.context = None
        self.stream = None
        self.graph_mode = "off"
        self._graphs: OrderedDict[tuple, tuple[Any, dict, dict]] = OrderedDict()  # signature -> graph, in, out
        self._bound: tuple | None = None  # the input-shape signature the context is bound to
        self._capture_refused: str | None = None
        self._runtime_cache = None
        self._runtime_cache_blob: bytes | None = None

    # --- activation ------------------------------------------------------------------------------
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
        from runtime.build import unsupported_tensorrt

        problem = unsupported_tensorrt(module, getattr(trt, "__version__", "?"))
        if problem is not None:
            raise BackendUnavailable(f"{self.name}: {problem}")
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
        self._runtime = runtime  # the engine must not outlive its runtime
        self.graph_mode = "manual" if self.cuda_graph else "off"
        self._capture_refused = None
        self.context = self._create_context(trt, engine)
        if self.context is None:
            raise RunnerError(f"{self.name}: could not create an execution context (out of GPU memory?)")
        # A new context has no device memory bound, whatever the pool's generation says.
        self._pool_generation = -1
        self._graphs.clear()
        self._bound = None
        self.stream = torch.cuda.Stream(device=self.device)

    def _create_context(self, trt: Any, engine: Any) -> Any:
        """A context that uses the shared pool when one is given and this TensorRT can (10.x:
        ``ExecutionContextAllocationStrategy.USER_MANAGED``, older: ``..._without_device_memory``).
        TensorRT-RTX contexts come from a runtime config that also carries the runtime cache and the
        built-in CUDA-graph strategy."""
        pool = self.memory_pool
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        user_managed = pool is not None and strategy is not None and hasattr(strategy, "USER_MANAGED")
        config = engine.create_runtime_config() if hasattr(engine, "create_runtime_config") else None
        if config is not None and hasattr(config, "create_runtime_cache"):  # TensorRT-RTX
            if user_managed:
                config.set_execution_context_allocation_strategy(strategy.USER_MANAGED)
            self._attach_runtime_cache(config)
            if self.cuda_graph and hasattr(trt, "CudaGraphStrategy"):
                config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
                self.graph_mode = "tensorrt-rtx"
            context = engine.create_execution_context(config)
        elif user_managed:
            context = engine.create_execution_context(strategy.USER_MANAGED)
        elif pool is not None and hasattr(engine, "create_execution_context_without_device_memory"):
            context = engine.create_execution_context_without_device_memory()
        else:
            self.memory_pool = None  # this TensorRT cannot share: the context owns its memory
            return engine.create_execution_context()
        if pool is not None and context is not None:
            pool.reserve(_engine_scratch_bytes(engine), device=self.device)
            pool.acquire(self)
        return context

    def _attach_runtime_cache(self, config: Any) -> None:
        cache = config.create_runtime_cache()
        blob = self._runtime_cache_blob
        if blob is None and self.runtime_cache_path is not None and self.runtime_cache_path.is_file():
            blob = self.runtime_cache_path.read_bytes()
        if blob and not cache.deserialize(blob):
            log.info("%s: the runtime cache is for another GPU, driver or TensorRT-RTX; starting empty", self.name)
        config.set_runtime_cache(cache)
        self._runtime_cache = cache

    def _save_runtime_cache(self) -> None:
        if self._runtime_cache is None:
            return
        self._runtime_cache_blob = bytes(self._runtime_cache.serialize())
        if self.runtime_cache_path is not None:
            try:
                self.runtime_cache_path.write_bytes(self._runtime_cache_blob)
            except OSError as err:
                log.warning("%s: could not write the runtime cache %s: %s", self.name, self.runtime_cache_path, err)

    def _bind_pool(self) -> None:
        pool = self.memory_pool
        if pool is None or pool.generation == self._pool_generation:
            return
        if hasattr(self.context, "set_device_memory"):
            self.context.set_device_memory(pool.buffer.data_ptr(), pool.nbytes)
        else:
            self.context.device_memory = pool.buffer.data_ptr()
        self._pool_generation = pool.generation
        self._graphs.clear()  # a captured graph holds the old address

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

    # --- inference -------------------------------------------------------------------------------
    def _infer(self, feed: Mapping[str, Array]) -> dict[str, Array]:
        dims = self.spec.check_feed(feed)
        shapes = {n: tuple(int(s) for s in feed[n].shape) for n in self.spec.input_names}
        out_shapes = self.spec.output_shapes(dims)
        signature = tuple(sorted(shapes.items()))
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the feed may still be being written on the caller's stream
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            self._bind_pool()
            captured = self._graphs.get(signature) if self.graph_mode == "manual" else None
            if captured is not None:
                self._graphs.move_to_end(signature)
                graph, in_bufs, out_bufs = captured
                if self._bound != signature:
                    # The graph holds this signature's shapes and addresses; keep the context's state
                    # (which a plain run for another shape changed) the same as when it was captured.
                    self._bind(in_bufs, out_bufs)
                    self._bound = signature
                for n, buf in in_bufs.items():
                    buf.copy_(to_torch(feed[n]), non_blocking=True)
                graph.replay()
                graph_owned = True
            else:
                capture = self.graph_mode == "manual"
                in_bufs = {n: self._input_buffer(n, feed[n], owned=capture) for n in self.spec.input_names}
                out_bufs = {
                    t.name: torch.empty(out_shapes[t.name], dtype=_TORCH_DTYPES[t.dtype], device=self.device)
                    for t in self.spec.outputs
                }
                self._bind(in_bufs, out_bufs)
                self._bound = signature
                self._execute()
                graph_owned = capture and self._capture(signature, in_bufs, out_bufs)
            # A graph's buffers are rewritten by its next replay: hand out copies.
            outputs = {n: b.clone() for n, b in out_bufs.items()} if graph_owned else dict(out_bufs)
            self.stream.synchronize()
        caller.wait_stream(self.stream)
        for t in outputs.values():
            t.record_stream(caller)  # allocated on the runner's stream, read on the caller's
        return outputs

    def _input_buffer(self, name: str, value: Array, owned: bool) -> torch.Tensor:
        """The device buffer TensorRT reads ``name`` from: the feed itself when it already is one, or a
        runner-owned copy when a graph will be captured on it (replays copy later feeds into it)."""
        dtype = _TORCH_DTYPES[self.spec.input(name).dtype]
        value = to_torch(value)
        if owned:
            buf = torch.empty(tuple(value.shape), dtype=dtype, device=self.device)
            buf.copy_(value, non_blocking=True)
            return buf
        return value.to(self.device, dtype).contiguous()

    def _bind(self, in_bufs: Mapping[str, torch.Tensor], out_bufs: Mapping[str, torch.Tensor]) -> None:
        for n, t in in_bufs.items():
            if not self.context.set_input_shape(n, tuple(t.shape)):
                raise FeedError(
                    f"{self.name}: TensorRT refused shape {tuple(t.shape)} for {n!r} (outside the engine's profile?)"
                )
        for n, t in out_bufs.items():
            # TensorRT writes the shape it infers, whatever buffer it is given: a disagreement with the
            # spec would write past the buffer, so refuse it before running.
            engine_shape = tuple(int(d) for d in self.context.get_tensor_shape(n))
            if engine_shape != tuple(t.shape):
                raise RunnerError(
                    f"{self.name}: the engine's output {n!r} has shape {engine_shape} (get_tensor_shape) for "
                    f"these inputs, the IO spec gives {tuple(t.shape)}; the engine was built from another graph "
                    "than this spec describes: rebuild it"
                )
        for n, t in {**in_bufs, **out_bufs}.items():
            self.context.set_tensor_address(n, t.data_ptr())

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RunnerError(f"{self.name}: execute_async_v3 failed (see TensorRT's log above)")

    def _capture(self, signature: tuple, in_bufs: dict, out_bufs: dict) -> bool:
        """Capture the bound engine into a CUDA graph for ``signature``; False (and plain runs from now
        on) when TensorRT or CUDA refuses."""
        capturable = getattr(self.context, "is_stream_capturable", None)
        if capturable is not None and not capturable(self.stream.cuda_stream):
            self._refuse_capture("TensorRT says this context cannot be captured on its stream (is_stream_capturable)")
            return False
        graph = torch.cuda.CUDAGraph()
        try:
            # Each graph gets its own memory pool: torch lets graphs share one only when they replay in
            # capture order, and a pipeline alternates shapes freely.
            with torch.cuda.graph(graph, stream=self.stream):
                self._execute()
        except (RuntimeError, RunnerError) as err:
            self._refuse_capture(f"capture failed: {err}")
            return False
        self._graphs[signature] = (graph, in_bufs, out_bufs)
        while len(self._graphs) > MAX_CUDA_GRAPHS:
            self._graphs.popitem(last=False)
        return True

    def _refuse_capture(self, reason: str) -> None:
        self.graph_mode = "off"
        self._capture_refused = reason
        self._graphs.clear()
        log.warning("%s: running without a CUDA graph: %s", self.name, reason)

    def _deactivate(self) -> None:
        self._save_runtime_cache()
        self._graphs.clear()
        self._bound = None
        self._runtime_cache = None
        self.context = None
        self.engine = None
        self._runtime = None
        self.stream = None
        self._pool_generation = -1
        if self.memory_pool is not None:
            self.memory_pool.release(self)
