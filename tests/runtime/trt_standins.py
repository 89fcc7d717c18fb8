"""Stand-ins for TensorRT and torch.cuda that are strict where the runtime depends on their behaviour.

No machine the suite runs on has a GPU with a TensorRT runtime, so ``TensorRTRunner``, the pipeline
over it and ``scripts/gpu_check.py`` run against these. They follow the parts of the TensorRT 10.x /
TensorRT-RTX 1.x Python API (``pyCore.cpp``) that ``runtime/`` calls, and refuse what TensorRT refuses
or would silently get wrong:

- ``set_input_shape`` returns False for a wrong rank or a shape outside the engine's profile;
- ``execute_async_v3`` on a ``USER_MANAGED`` context without ``set_device_memory`` returns False (TensorRT
  logs an error and runs nothing), and it raises :class:`BufferError` when a bound address is no live
  tensor, has another dtype, or is smaller than the tensor TensorRT reads or writes there for the
  current shapes (``get_tensor_shape``): real TensorRT would read or write past it;
- every ``execute_async_v3`` records the stream handle it was enqueued on; ``is_stream_capturable``
  answers per network;
- the ``tensorrt_rtx`` flavour has runtime configs (allocation strategy, built-in CUDA-graph strategy)
  and runtime caches, and counts kernel compilations per shape signature that no cache held.

The engines compute with torch on the very buffers the runner bound: :class:`AddressRegistry`
resolves an address to the tensor whose ``data_ptr()`` gave it (``Tensor.data_ptr`` is wrapped while
it is installed), so an engine reads its inputs and writes its outputs in place, on CPU tensors with
:class:`FakeCuda` or on a real CUDA stream (``torch.cuda.ExternalStream`` of the handle) on a GPU.

:class:`FakeCuda` stands in for the torch.cuda calls the runner makes: streams that log ``wait_stream``
and ``synchronize``, ``record_stream``, and graph capture that records the work enqueued on the
capturing stream and runs it again on ``replay()`` (so a graph replays the addresses it captured,
as a CUDA graph does).
"""

from __future__ import annotations

import contextlib
import enum
import importlib.machinery
import itertools
import logging
import math
import sys
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.iospec import NetworkSpec

log = logging.getLogger(__name__)

STANDIN_GPU = "Stand-in GPU (no CUDA device)"
_TORCH_DTYPE = {
    "float32": torch.float32,
    "float16": torch.float16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class CudaGraphStrategy(enum.Enum):
    DISABLED = 0
    WHOLE_GRAPH_CAPTURE = 1


# ---- addresses -> tensors --------------------------------------------------------------------------


class AddressRegistry:
    """Maps every address handed out by ``Tensor.data_ptr()`` back to its tensor (weakly: a freed
    tensor's address is reported as such, not silently reused)."""

    def __init__(self):
        self._refs: dict[int, weakref.ref] = {}
        self._original = torch.Tensor.data_ptr

    def _data_ptr(self, tensor: torch.Tensor) -> int:
        ptr = self._original(tensor)
        self._refs[ptr] = weakref.ref(tensor)
        return ptr

    @contextlib.contextmanager
    def installed(self) -> Iterator[AddressRegistry]:
        registry = self

        def data_ptr(tensor):
            return registry._data_ptr(tensor)

        torch.Tensor.data_ptr = data_ptr
        try:
            yield self
        finally:
            torch.Tensor.data_ptr = self._original

    def tensor(self, ptr: int, what: str) -> torch.Tensor:
        ref = self._refs.get(int(ptr))
        tensor = ref() if ref is not None else None
        if tensor is None:
            raise BufferError(f"{what}: address {ptr:#x} is not a live tensor (never bound, or freed since)")
        return tensor

    def view(self, ptr: int, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
        """The ``shape``/``dtype`` tensor TensorRT would read or write at ``ptr``; refuses a smaller buffer."""
        base = self.tensor(ptr, what)
        if base.dtype != dtype:
            raise BufferError(f"{what}: the buffer at {ptr:#x} is {base.dtype}, the engine's tensor is {dtype}")
        if not base.is_contiguous():
            raise BufferError(f"{what}: the buffer at {ptr:#x} is not contiguous (TensorRT reads dense rows)")
        need = math.prod(shape)
        if base.numel() < need:
            raise BufferError(
                f"{what}: TensorRT would access {need} elements {shape} at {ptr:#x}, the buffer holds {base.numel()}"
            )
        return base.reshape(-1)[:need].view(shape)

    def nbytes(self, ptr: int, what: str) -> int:
        base = self.tensor(ptr, what)
        return base.numel() * base.element_size()


_REGISTRY: AddressRegistry | None = None
_FAKE_CUDA: FakeCuda | None = None


@contextlib.contextmanager
def address_registry() -> Iterator[AddressRegistry]:
    """Install a fresh :class:`AddressRegistry` for the stand-in engines (a context manager)."""
    global _REGISTRY
    registry, outer = AddressRegistry(), _REGISTRY
    _REGISTRY = registry
    try:
        with registry.installed():
            yield registry
    finally:
        _REGISTRY = outer


def _registry() -> AddressRegistry:
    if _REGISTRY is None:
        raise RuntimeError("stand-in engines resolve addresses through address_registry(); install it first")
    return _REGISTRY


# ---- networks, engines, contexts ---------------------------------------------------------------------


@dataclass
class FakeNetwork:
    """What a stand-in engine computes: ``compute({input: tensor}) -> {output: tensor}`` under ``spec``.

    ``output_shapes`` (``{input: shape} -> {output: shape}``) is the engine's own shape inference
    (default: the spec's); one that disagrees with the spec models an engine built from another graph.
    ``scratch_bytes``: ``device_memory_size_v2``. ``capturable``: what ``is_stream_capturable`` says.
    """

    spec: NetworkSpec
    compute: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]
    output_shapes: Callable[[Mapping[str, tuple[int, ...]]], dict[str, tuple[int, ...]]] | None = None
    scratch_bytes: int = 4096
    capturable: bool = True
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(init=False)

    def __post_init__(self):
        self.profile = {n: (lo, hi) for n, (lo, _, hi) in self.spec.shape_profile().items()}

    def engine_output_shapes(self, inputs: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        if self.output_shapes is not None:
            return self.output_shapes(inputs)
        dims = {}
        for t in self.spec.inputs:
            for want, got in zip(t.shape, inputs[t.name], strict=True):
                if isinstance(want, str):
                    dims[want] = got
        return self.spec.output_shapes(dims)


class FakeRuntimeCache:
    """TensorRT-RTX's runtime cache: the shape signatures whose kernels were compiled."""

    def __init__(self):
        self.entries: set[tuple] = set()

    def serialize(self) -> bytes:
        return repr(sorted(self.entries)).encode()

    def deserialize(self, blob: bytes) -> bool:
        import ast

        try:
            self.entries |= {tuple(tuple(s) for s in e) for e in ast.literal_eval(bytes(blob).decode())}
        except (ValueError, SyntaxError):
            return False
        return True

    def reset(self) -> bool:
        self.entries.clear()
        return True


class FakeRuntimeConfig:
    def __init__(self):
        self.strategy = ExecutionContextAllocationStrategy.STATIC
        self.cache: FakeRuntimeCache | None = None
        self.cuda_graph_strategy = CudaGraphStrategy.DISABLED

    def set_execution_context_allocation_strategy(self, strategy=ExecutionContextAllocationStrategy.STATIC) -> None:
        self.strategy = strategy

    def get_execution_context_allocation_strategy(self):
        return self.strategy

    def create_runtime_cache(self) -> FakeRuntimeCache:
        return FakeRuntimeCache()

    def set_runtime_cache(self, cache=None) -> bool:
        self.cache = cache
        return True

    def get_runtime_cache(self):
        return self.cache


class FakeEngine:
    def __init__(self, module: types.ModuleType, network: FakeNetwork):
        self._module = module
        self.network = network
        spec = network.spec
        self._names = spec.input_names + spec.output_names
        self._dtypes = {t.name: DataType(t.dtype) for t in spec.inputs + spec.outputs}
        self.device_memory_size_v2 = network.scratch_bytes
        self.contexts: list[FakeContext] = []
        self.compilations = 0  # shape signatures compiled because no runtime cache held them

    @property
    def num_io_tensors(self) -> int:
        return len(self._names)

    def get_tensor_name(self, index: int) -> str:
        return self._names[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in self.network.spec.input_names else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._dtypes[name]

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        lo, hi = self.network.profile[name]
        return [lo, lo, hi]

    def create_execution_context(self, strategy_or_config: Any = ExecutionContextAllocationStrategy.STATIC):
        if isinstance(strategy_or_config, FakeRuntimeConfig):
            context = FakeContext(self, strategy_or_config.strategy, strategy_or_config)
        else:
            context = FakeContext(self, strategy_or_config, None)
        self.contexts.append(context)
        return context


class FakeRtxEngine(FakeEngine):
    """TensorRT-RTX's engine: contexts can also be made from a runtime config."""

    def create_runtime_config(self) -> FakeRuntimeConfig:
        return FakeRuntimeConfig()


class FakeContext:
    def __init__(self, engine: FakeEngine, strategy: Any, config: FakeRuntimeConfig | None):
        self.engine = engine
        self.strategy = strategy
        self.config = config
        self.device_memory: tuple[int, int] | None = None
        self.memory_bindings: list[tuple[int, int]] = []  # every set_device_memory, in order
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.streams: list[int] = []  # the stream handle of every execute_async_v3, in order
        self.errors: list[str] = []
        self._own_cache = FakeRuntimeCache()

    def _error(self, message: str) -> bool:
        self.errors.append(message)
        log.error("[stand-in TensorRT] %s", message)
        return False

    def set_device_memory(self, memory: int, size: int) -> None:
        need = self.engine.device_memory_size_v2
        if size < need:
            raise ValueError(f"set_device_memory: {size} bytes, the engine needs {need}")
        have = _registry().nbytes(memory, "set_device_memory")
        if have < size:
            raise BufferError(f"set_device_memory: {size} bytes declared at {memory:#x}, the buffer holds {have}")
        self.device_memory = (int(memory), int(size))
        self.memory_bindings.append(self.device_memory)

    def set_input_shape(self, name: str, shape) -> bool:
        net = self.engine.network
        if name not in net.profile:
            return self._error(f"set_input_shape: {name!r} is not an input")
        shape = tuple(int(s) for s in shape)
        lo, hi = net.profile[name]
        if len(shape) != len(lo):
            return self._error(f"set_input_shape: {name!r} has rank {len(lo)}, got {shape}")
        if any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
            return self._error(f"set_input_shape: {name!r} {shape} is outside the profile [{lo}, {hi}]")
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        net = self.engine.network
        if name in net.profile:
            return self.shapes.get(name, tuple(-1 for _ in net.profile[name][0]))
        if set(self.shapes) != set(net.profile):
            return tuple(-1 for _ in net.spec.outputs[net.spec.output_names.index(name)].shape)
        return net.engine_output_shapes(self.shapes)[name]

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in self.engine._names:
            return self._error(f"set_tensor_address: no tensor {name!r}")
        self.addresses[name] = int(ptr)
        return True

    def get_tensor_address(self, name: str) -> int:
        return self.addresses.get(name, 0)

    def is_stream_capturable(self, stream: int) -> bool:
        return self.engine.network.capturable

    def execute_async_v3(self, stream_handle: int) -> bool:
        engine, net = self.engine, self.engine.network
        self.streams.append(int(stream_handle))
        if _FAKE_CUDA is not None:
            _FAKE_CUDA.events.append(("execute", int(stream_handle)))
        unset = [n for n in net.spec.input_names if n not in self.shapes]
        if unset:
            return self._error(f"execute_async_v3: input shapes not set for {unset}")
        if self.strategy == ExecutionContextAllocationStrategy.USER_MANAGED and self.device_memory is None:
            return self._error(
                "execute_async_v3: this context was created with USER_MANAGED allocation and has no device memory "
                "(call set_device_memory first)"
            )
        missing = [n for n in engine._names if n not in self.addresses]
        if missing:
            return self._error(f"execute_async_v3: no address for {missing}")
        if self.device_memory is not None:
            _registry().nbytes(self.device_memory[0], "device memory")  # still a live buffer
        out_shapes = net.engine_output_shapes(self.shapes)
        bindings = {n: (self.addresses[n], self.shapes[n]) for n in net.spec.input_names}
        bindings |= {n: (self.addresses[n], out_shapes[n]) for n in net.spec.output_names}
        dtypes = {n: _TORCH_DTYPE[engine._dtypes[n].value] for n in engine._names}

        def run() -> None:
            views = {n: _registry().view(p, s, dtypes[n], f"tensor {n!r}") for n, (p, s) in bindings.items()}
            results = net.compute({n: views[n] for n in net.spec.input_names})
            for n in net.spec.output_names:
                got = results[n]
                if tuple(got.shape) != tuple(views[n].shape):
                    raise BufferError(f"stand-in network gave {n!r} {tuple(got.shape)}, expected {views[n].shape}")
                views[n].copy_(got)

        for n, (p, s) in bindings.items():  # refuse a wrong buffer at enqueue time, as a bad address crashes
            _registry().view(p, s, dtypes[n], f"tensor {n!r}")
        cache = self.config.cache if self.config is not None and self.config.cache is not None else self._own_cache
        signature = tuple(self.shapes[n] for n in net.spec.input_names)
        if signature not in cache.entries:
            engine.compilations += 1
            cache.entries.add(signature)
        if _FAKE_CUDA is not None:
            _FAKE_CUDA.enqueue(int(stream_handle), run)
        elif torch.cuda.is_available():
            with torch.cuda.stream(torch.cuda.ExternalStream(int(stream_handle))):
                run()
        else:
            run()
        return True


class _Logger:
    WARNING = "WARNING"
    ERROR = "ERROR"

    def __init__(self, severity: str = "WARNING"):
        self.severity = severity


class _Runtime:
    def __init__(self, module: types.ModuleType, logger: _Logger):
        self._module = module

    def deserialize_cuda_engine(self, plan: bytes):
        network = self._module.plans.get(bytes(plan))
        if network is None:
            return None
        return (FakeRtxEngine if self._module.is_rtx else FakeEngine)(self._module, network)


def make_tensorrt(module: str = "tensorrt_rtx", version: str | None = None) -> types.ModuleType:
    """A stand-in ``tensorrt`` or ``tensorrt_rtx`` module (put it in ``sys.modules`` under ``module``).

    ``plan_for(network)`` returns the plan bytes its ``Runtime`` deserializes into that network's
    engine; ``engines`` lists every engine deserialized.
    """
    if module not in ("tensorrt", "tensorrt_rtx"):
        raise ValueError(f"no stand-in for {module!r}")
    fake = types.ModuleType(module)
    fake.__spec__ = importlib.machinery.ModuleSpec(module, loader=None)
    fake.__version__ = version or ("1.7.1.116" if module == "tensorrt_rtx" else "10.3.0.26")
    fake.is_rtx = module == "tensorrt_rtx"
    fake.plans = {}
    fake.engines = []
    fake.Logger = _Logger
    fake.DataType = DataType
    fake.TensorIOMode = TensorIOMode
    fake.ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
    if fake.is_rtx:
        fake.CudaGraphStrategy = CudaGraphStrategy
    counter = itertools.count()

    class Runtime(_Runtime):
        def __init__(self, logger):
            super().__init__(fake, logger)

        def deserialize_cuda_engine(self, plan):
            engine = super().deserialize_cuda_engine(plan)
            if engine is not None:
                fake.engines.append(engine)
            return engine

    def plan_for(network: FakeNetwork) -> bytes:
        plan = f"stand-in plan {module} {next(counter)} {network.spec.name}".encode()
        fake.plans[plan] = network
        return plan

    fake.Runtime = Runtime
    fake.plan_for = plan_for
    return fake


# ---- torch.cuda ---------------------------------------------------------------------------------------


class FakeStream:
    _ids = itertools.count(0x5000)

    def __init__(self, cuda: FakeCuda, label: str):
        self._cuda = cuda
        self.label = label
        self.cuda_stream = next(self._ids)

    def wait_stream(self, other: FakeStream) -> None:
        self._cuda.events.append(("wait", self.cuda_stream, other.cuda_stream))

    def synchronize(self) -> None:
        self._cuda.events.append(("synchronize", self.cuda_stream))

    def query(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"<FakeStream {self.label} {self.cuda_stream:#x}>"


class FakeGraph:
    """A captured CUDA graph: the work enqueued on the capturing stream, run again by ``replay()``."""

    def __init__(self, *args, **kwargs):
        self.work: list[Callable[[], None]] = []
        self.replays = 0
        self.captured = False

    def replay(self) -> None:
        if not self.captured:
            raise RuntimeError("replay() of a graph that was never captured")
        self.replays += 1
        for work in self.work:
            work()


class FakeCuda:
    """torch.cuda as the TensorRT runner uses it, on CPU tensors; ``events`` logs what happened in order.

    ``fail_capture``: a message; capture ends with that RuntimeError (as a capture that TensorRT
    invalidated does). ``captures`` counts finished captures.
    """

    def __init__(self):
        self.default = FakeStream(self, "default")
        self.current = self.default
        self.events: list[tuple] = []
        self.capturing: tuple[FakeGraph, FakeStream] | None = None
        self.fail_capture: str | None = None
        self.captures = 0
        self.streams: list[FakeStream] = []

    def enqueue(self, handle: int, work: Callable[[], None]) -> None:
        if self.capturing is not None:
            graph, stream = self.capturing
            if stream.cuda_stream != handle:
                raise RuntimeError(
                    f"work enqueued on stream {handle:#x} while {stream.cuda_stream:#x} is capturing "
                    "(a real capture would be invalidated)"
                )
            graph.work.append(work)
            self.events.append(("captured", handle))
        else:
            work()

    # the torch.cuda functions
    def current_stream(self, device=None) -> FakeStream:
        return self.current

    @contextlib.contextmanager
    def stream(self, stream: FakeStream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    @contextlib.contextmanager
    def graph(self, cuda_graph: FakeGraph, pool=None, stream=None, capture_error_mode="global"):
        stream = stream or self.current
        self.events.append(("capture_begin", stream.cuda_stream))
        previous, self.current = self.current, stream
        self.capturing = (cuda_graph, stream)
        try:
            yield
        finally:
            self.current = previous
            self.capturing = None
        if self.fail_capture is not None:
            cuda_graph.work.clear()
            raise RuntimeError(self.fail_capture)
        cuda_graph.captured = True
        self.captures += 1
        self.events.append(("capture_end", stream.cuda_stream))

    def install(self, monkeypatch) -> FakeCuda:
        """Swap the torch.cuda pieces the runner uses for these (undone by ``monkeypatch``)."""
        from runtime.runners import TensorRTRunner

        cuda = self

        # Classes where torch's are classes: libraries evaluate annotations like `torch.cuda.Stream | None`.
        class Stream(FakeStream):
            def __init__(self, device=None, priority=0):
                super().__init__(cuda, f"stream{len(cuda.streams)}")
                cuda.streams.append(self)

        class Device(contextlib.nullcontext):
            def __init__(self, device=None):
                super().__init__()

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: STANDIN_GPU)
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", self.current_stream)
        monkeypatch.setattr(torch.cuda, "stream", self.stream)
        monkeypatch.setattr(torch.cuda, "device", Device)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
        monkeypatch.setattr(torch.cuda, "graph", self.graph)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.events.append(("device_sync",)))

        def record_stream(tensor, stream):
            cuda.events.append(("record_stream", torch.Tensor.data_ptr(tensor), stream.cuda_stream))

        monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
        monkeypatch.setattr(TensorRTRunner, "device_type", "cpu", raising=False)
        monkeypatch.setattr(sys.modules[__name__], "_FAKE_CUDA", self)
        return self


# ---- one-call helpers used by the tests and scripts/gpu_check.py --------------------------------------


def unet_like_spec(dtype: str = "float32", batch=(1, 2, 4)) -> NetworkSpec:
    """A small UNet-shaped contract: sample (B, 4, h, w), timestep (), encoder_hidden_states (B, 8, 16)."""
    from export.iospec import Dim, TensorSpec

    return NetworkSpec(
        "unet",
        inputs=(
            TensorSpec("sample", dtype, ("batch", 4, "latent_height", "latent_width")),
            TensorSpec("timestep", "float32", ()),
            TensorSpec("encoder_hidden_states", dtype, ("batch", 8, 16)),
        ),
        outputs=(TensorSpec("noise_pred", dtype, ("batch", 4, "latent_height", "latent_width")),),
        dims={"batch": Dim(*batch), "latent_height": Dim(4, 8, 16, 4), "latent_width": Dim(4, 8, 16, 4)},
        metadata={"precision": dtype},
    )


def unet_like_compute(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """noise_pred = sample * 0.5 + timestep * 1e-3 + mean(encoder_hidden_states) per image (in the IO dtype)."""
    sample = inputs["sample"]
    context = inputs["encoder_hidden_states"].float().mean(dim=(1, 2)).view(-1, 1, 1, 1)
    out = sample.float() * 0.5 + inputs["timestep"].float() * 1e-3 + context
    return {"noise_pred": out.to(sample.dtype)}


def unet_like_feed(spec: NetworkSpec, seed: int = 0, batch: int = 2, hw: int = 8, numpy: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    dtype = _TORCH_DTYPE[spec.input("sample").dtype]
    feed = {
        "sample": torch.randn((batch, 4, hw, hw), generator=gen).to(dtype),
        "timestep": torch.tensor(float(100 + seed), dtype=torch.float32),
        "encoder_hidden_states": torch.randn((batch, 8, 16), generator=gen).to(dtype),
    }
    return {k: v.numpy() for k, v in feed.items()} if numpy else feed


def as_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


# ---- stand-in engines of an export folder ----------------------------------------------------------------


def onnx_network(folder: Path, spec: NetworkSpec, perturb: float = 0.0) -> FakeNetwork:
    """A stand-in engine computing with ONNX Runtime on the export's own graph (CPU, 1 thread,
    optimizations off: the graph as written). ``perturb``: added to every float output, a broken engine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(folder / f"{spec.name}.onnx"), options, providers=["CPUExecutionProvider"])

    def compute(inputs):
        values = session.run(spec.output_names, {n: t.cpu().numpy() for n, t in inputs.items()})
        out = {n: torch.from_numpy(v) for n, v in zip(spec.output_names, values, strict=True)}
        return {n: (v + perturb if perturb and v.is_floating_point() else v) for n, v in out.items()}

    return FakeNetwork(spec, compute)


def engine_meta(module: types.ModuleType, spec: NetworkSpec, onnx_sha256: str | None = None) -> dict:
    """The ``.engine.json`` runtime.build writes, for a stand-in engine built ahead of time."""
    return {
        "format": "dgq-engine",
        "version": 1,
        "component": spec.name,
        "tensorrt": {
            "module": module.__name__,
            "flavour": "tensorrt-rtx" if module.__name__ == "tensorrt_rtx" else "tensorrt",
            "version": module.__version__,
        },
        "gpu": {"visible": False, "note": "AOT, no GPU", "target_sm": None},
        "export": {"onnx_sha256": onnx_sha256, "target": "float"},
        "iospec": spec.to_dict(),
    }


def write_engines(
    module: types.ModuleType,
    folder: Path,
    engine_dir: Path | None = None,
    perturb: Mapping[str, float] | None = None,
    **tensorrt: str,
) -> dict:
    """``<component>.engine`` + ``.engine.json`` for every component of an export folder, as
    runtime.build writes them (``tensorrt``: metadata overrides, e.g. ``version``); returns
    runtime.build's ``{component: BuildResult}``."""
    import json

    from export.iospec import read_specs
    from export.manifest import read_manifest
    from runtime.build import BuildResult

    folder = Path(folder)
    engine_dir = Path(engine_dir) if engine_dir is not None else folder
    manifest, specs = read_manifest(folder), read_specs(folder)
    engine_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for component in manifest["components"]:
        path = engine_dir / f"{component}.engine"
        network = onnx_network(folder, specs[component], (perturb or {}).get(component, 0.0))
        path.write_bytes(module.plan_for(network))
        meta = engine_meta(module, specs[component], manifest["files"][f"{component}.onnx"]["sha256"])
        meta["tensorrt"].update(tensorrt)
        meta_path = engine_dir / f"{component}.engine.json"
        meta_path.write_text(json.dumps(meta))
        report = engine_dir / f"{component}.engine.report.json"
        report.write_text("{}")
        results[component] = BuildResult(component, path, meta_path, report, path.stat().st_size, 0.0)
    return results
