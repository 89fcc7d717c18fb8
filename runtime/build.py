"""Build TensorRT engines from an export folder: ``<component>.engine`` + ``.engine.json`` + ``.engine.report.json``.

One code path for both TensorRT Python modules: ``tensorrt`` (desktop, data centre, Jetson's JetPack
build) when it imports, else ``tensorrt_rtx`` (TensorRT-RTX, which compiles ahead of time without a
GPU). Every network is built strongly typed (precisions come from the graph's casts and Q/DQ, as DGQ's
export decides them) with one optimization profile taken from the export's IO spec.

Features the installed TensorRT may lack are applied where its API has them, and the metadata says
what was applied: TensorRT-RTX 1.7, for one, accepts a timing cache but documents it as a no-op.

Engines are tied to the TensorRT flavour and version and, for full TensorRT, to the GPU model;
TensorRT-RTX engines run on any GPU of the compute capabilities they were built for.
:func:`check_engine_compatible` refuses a mismatch before a runtime tries to deserialize. FP8 Q/DQ
is refused for GPUs below compute capability 8.9 (Jetson Orin is 8.7: INT8 and FP16 only).

Supported TensorRT major versions: :data:`SUPPORTED_MAJORS`; another one is refused on import with
a message that says which to install.

Imports: the standard library, ``common``, ``export.iospec``, ``export.manifest`` and TensorRT (lazily).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib
import json
import logging
import os
import platform
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.errors import DGQError
from common.fsutil import NotOwnedError, atomic_files, claim_output
from export.iospec import read_specs
from export.manifest import read_manifest
from runtime.engine_report import format_table, inspect_engine, network_report, uses_fp8

log = logging.getLogger(__name__)

ENGINE_FORMAT = "dgq-engine"
ENGINE_VERSION = 1
# The TensorRT Python modules, in order of preference: full TensorRT, else TensorRT-RTX.
TENSORRT_MODULES = ("tensorrt", "tensorrt_rtx")
FP8_MIN_SM = (8, 9)  # Ada / Hopper; Jetson Orin (8.7) and Ampere have no FP8 tensor cores
# Full TensorRT versions a feature needs (TensorRT-RTX has all of them since 1.0). Strongly typed
# networks came with 9.x and INT4 block-wise weight-only DQ with 10.0; JetPack 5 ships 8.5 (neither),
# JetPack 6 ships 10.3 (both).
MIN_TENSORRT = {"strongly typed networks": (10, 0), "INT4 block-wise weights": (10, 0)}
# The major version of each module this code is written for (pyproject pins the same). TensorRT-RTX
# 1.7 is the one that builds engines in CI; TensorRT 10.x (JetPack 6 ships 10.3) was checked against
# its Python bindings by review only. 8.x lacks strongly typed networks and INT4 weights; 11.x and
# TensorRT-RTX 2.x are releases this code has not been checked against.
SUPPORTED_MAJORS = {"tensorrt": 10, "tensorrt_rtx": 1}
# Export targets whose graphs TensorRT builds: the tensorrt target's Q/DQ and the float graphs. The
# faithful target's asymmetric INT16-zero-point Q/DQ and the onnxruntime target's QLinearConv
# branches are for ONNX Runtime; TensorRT's parser rejects them.
BUILDABLE_TARGETS = ("tensorrt", "float")


class EngineBuildError(DGQError, ValueError):
    """An export folder, graph or setting that cannot become an engine (the message says why)."""


class EngineCompatibilityError(DGQError, ValueError):
    """An engine built by another TensorRT flavour/version or for another GPU."""


@dataclass(frozen=True)
class BuildSettings:
    """What the builder is asked for. ``target_sm`` ("8.7") names the GPU an AOT build targets when
    none is visible (FP8 refusal, TensorRT-RTX compute-capability target); a visible GPU wins.

    ``tf32``: allow TF32 for float32 convolutions/GEMMs (TensorRT's default; about 1e-3 relative
    error per GEMM on Ampere and newer, so float32 parity checks build with it off).
    ``capturable``: where TensorRT has ``BuilderFlag.REQUIRE_USER_ALLOCATION`` (TensorRT-RTX), build
    engines that never allocate at run time, which stream capture into a CUDA graph requires.
    """

    workspace_gib: float | None = 4.0
    timing_cache: str | None = None
    refit: bool = False
    weight_streaming: bool = False
    optimization_level: int | None = None
    target_sm: str | None = None
    tf32: bool = True
    capturable: bool = True

    def __post_init__(self):
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            raise EngineBuildError(f"workspace_gib must be positive, got {self.workspace_gib}")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise EngineBuildError(f"optimization_level must be in 0..5, got {self.optimization_level}")
        if self.target_sm is not None:
            _parse_sm(self.target_sm)


@dataclass(frozen=True)
class BuildResult:
    component: str
    engine: Path
    metadata: Path
    report: Path
    engine_bytes: int
    build_seconds: float


# ---- environment: which TensorRT, which GPU -------------------------------------------------------


def unsupported_tensorrt(module: str, version: str) -> str | None:
    """Why TensorRT ``module`` (``tensorrt`` or ``tensorrt_rtx``) at ``version`` cannot be used here, or None."""
    want = SUPPORTED_MAJORS.get(module)
    if want is None:
        return f"{module} is not a TensorRT module this code knows (expected one of {list(SUPPORTED_MAJORS)})"
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        return f"{module} reports version {version!r}, whose major version cannot be read"
    if major == want:
        return None
    if module == "tensorrt":
        hint = "this code supports TensorRT 10.x (JetPack 6 ships 10.3): install tensorrt>=10.3,<11"
        if major < want:
            hint += "; JetPack 5's TensorRT 8.x cannot build strongly typed or INT4 graphs, use JetPack 6"
    else:
        hint = "this code supports TensorRT-RTX 1.x: install tensorrt-rtx>=1.0,<2"
    return f"{module} {version} is not supported: {hint}"


def load_tensorrt(prefer: Sequence[str] = TENSORRT_MODULES):
    """The first importable TensorRT module among ``prefer``; raises EngineBuildError when none is, or
    when the first one is a major version this code does not support."""
    for name in prefer:
        try:
            trt = importlib.import_module(name)
        except ImportError:
            continue
        problem = unsupported_tensorrt(name, getattr(trt, "__version__", "?"))
        if problem is not None:
            raise EngineBuildError(problem)
        return trt
    raise EngineBuildError(
        "no TensorRT Python module: install tensorrt (desktop; on Jetson it comes with JetPack) or "
        f"tensorrt-rtx; tried {list(prefer)}"
    )


def tensorrt_identity(trt) -> dict[str, str]:
    module = trt.__name__
    return {
        "module": module,
        "flavour": "tensorrt-rtx" if module == "tensorrt_rtx" else "tensorrt",
        "version": trt.__version__,
    }


def sm_of_member(member: str) -> str:
    """The compute capability of a TensorRT-RTX ``ComputeCapability`` member: ``"8.9"`` for ``SM89``,
    ``"12.0"`` for ``SM120`` (the last digit is the minor)."""
    digits = str(member).rsplit(".", 1)[-1].removeprefix("SM")
    if len(digits) < 2 or not digits.isdigit():
        raise EngineBuildError(f"{member!r} is not a ComputeCapability.SM<major><minor> member")
    return f"{int(digits[:-1])}.{digits[-1]}"


def _parse_sm(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(p) for p in str(text).split("."))
    except ValueError as err:
        raise EngineBuildError(f"compute capability {text!r} must look like '8.7'") from err
    return major, minor


def gpu_info() -> dict[str, Any]:
    """The first CUDA device's name and compute capability through the driver API, or ``visible: False``.

    ctypes on ``libcuda`` rather than torch or cuda-python: it is there wherever a GPU is (Jetson
    included) and costs no dependency.
    """
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return {"visible": False, "reason": "no CUDA driver library"}
    count, dev = ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return {"visible": False, "reason": "CUDA driver found but no usable device"}
    cuda.cuDeviceGet(ctypes.byref(dev), 0)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, dev)
    major, minor = ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    return {
        "visible": True,
        "name": name.value.decode(errors="replace"),
        "compute_capability": f"{major.value}.{minor.value}",
    }


def current_environment(trt=None) -> dict[str, Any]:
    """``{"tensorrt": {...}, "gpu": {...}}`` of this process, as :func:`check_engine_compatible` compares them."""
    trt = trt or load_tensorrt()
    return {"tensorrt": tensorrt_identity(trt), "gpu": gpu_info()}


def check_engine_compatible(engine_meta: Mapping[str, Any], environment: Mapping[str, Any] | None = None) -> None:
    """Refuse, with a message saying what differs, an engine this process cannot load.

    The TensorRT flavour and version must match exactly (plans are not portable across versions). When
    a GPU is visible: a full TensorRT engine built on a GPU needs that GPU model (name and compute
    capability); an engine with recorded compute-capability targets (TensorRT-RTX, or an AOT build)
    needs one of them; a TensorRT-RTX engine without targets was built for TensorRT-RTX's default set
    and is left to its runtime to accept or refuse.
    """
    if engine_meta.get("format") != ENGINE_FORMAT:
        raise EngineCompatibilityError(
            f"not a {ENGINE_FORMAT} metadata document (format={engine_meta.get('format')!r})"
        )
    env = environment or current_environment()
    what = f"engine {engine_meta.get('component', '?')!r}"
    built, here = engine_meta["tensorrt"], env["tensorrt"]
    if built["flavour"] != here["flavour"]:
        raise EngineCompatibilityError(
            f"{what} was built by {built['flavour']} but this process runs {here['flavour']}; rebuild it here"
        )
    if built["version"] != here["version"]:
        raise EngineCompatibilityError(
            f"{what} was built by {built['flavour']} {built['version']} but this process runs {here['version']}; "
            "TensorRT plans only load in the version that built them: rebuild it (scripts/build_engine.py)"
        )
    gpu, now = engine_meta["gpu"], env["gpu"]
    if not now.get("visible"):
        return  # nothing to compare; deserialization will need a GPU anyway
    portable = built["flavour"] == "tensorrt-rtx"  # RTX engines target compute capabilities, not one GPU model
    if gpu.get("visible") and not portable:
        if gpu["compute_capability"] != now["compute_capability"] or gpu["name"] != now["name"]:
            raise EngineCompatibilityError(
                f"{what} was built for {gpu['name']} (SM {gpu['compute_capability']}) but this GPU is "
                f"{now['name']} (SM {now['compute_capability']}); engines are tied to the GPU model: rebuild it "
                "on this device"
            )
    elif gpu.get("target_sm") and now["compute_capability"] not in gpu["target_sm"]:
        how = "on a GPU" if gpu.get("visible") else "ahead of time"
        raise EngineCompatibilityError(
            f"{what} was built {how} for SM {', '.join(gpu['target_sm'])} but this GPU is "
            f"{now['name']} (SM {now['compute_capability']}); rebuild it for this GPU"
        )


def check_engine_loadable(engine_meta: Mapping[str, Any]) -> str | None:
    """:func:`check_engine_compatible` against the TensorRT module the engine names (its metadata's
    ``tensorrt.module``), not whichever is installed first: with both ``tensorrt`` and
    ``tensorrt_rtx`` installed, RTX engines load in ``tensorrt_rtx``. Returns that module name (None for
    metadata without one). Raises EngineBuildError when that module is missing or unsupported here,
    EngineCompatibilityError when the engine was built for another version or GPU."""
    module = engine_meta.get("tensorrt", {}).get("module")
    check_engine_compatible(engine_meta, current_environment(load_tensorrt([module] if module else TENSORRT_MODULES)))
    return module


def read_engine_meta(engine_path: str | os.PathLike) -> dict[str, Any]:
    """The ``<component>.engine.json`` beside an engine."""
    path = Path(f"{engine_path}.json")
    if not path.is_file():
        raise FileNotFoundError(
            f"{engine_path} has no metadata file {path.name}; rebuild it with scripts/build_engine.py"
        )
    return json.loads(path.read_text())


# ---- building ---------------------------------------------------------------------------------


class _Interrupts:
    """Ctrl-C while TensorRT runs. TensorRT calls back into Python (its logger, the progress monitor)
    and swallows any exception raised there, so a KeyboardInterrupt raised in a callback would be
    lost and the build would run to the end. Instead a SIGINT is recorded here, the progress monitor
    cancels the build at its next step, and :meth:`raise_pending` raises KeyboardInterrupt once
    TensorRT has returned. The SIGINT is seen even while the main thread waits inside TensorRT: the
    interpreter's C signal handler writes it to a wakeup pipe at once, and the callbacks (on any
    thread) read that pipe.
    """

    def __init__(self) -> None:
        self.pending = False
        self._pipe: tuple[int, int] | None = None

    def interrupted(self) -> bool:
        if not self.pending and self._pipe is not None:
            with contextlib.suppress(OSError):  # BlockingIOError: nothing arrived
                self.pending = signal.SIGINT in os.read(self._pipe[0], 512)
        return self.pending

    def raise_pending(self) -> None:
        if self.interrupted():
            self.pending = False
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Route SIGINT here for the block (main thread only; elsewhere Python delivers no signals)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        self._pipe = (r, w)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old_handler)
            signal.set_wakeup_fd(old_wakeup)
            self.interrupted()  # a SIGINT still in the pipe
            self._pipe = None
            os.close(r)
            os.close(w)

    def _on_sigint(self, signum, frame) -> None:
        self.pending = True


_INTERRUPTS = _Interrupts()


@functools.cache
def _progress_monitor(trt):
    """A progress monitor that cancels the build once Ctrl-C was pressed (None where TensorRT has none)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            pass

        def step_complete(self, phase_name, step):
            try:
                return not _INTERRUPTS.interrupted()  # False cancels the build
            except KeyboardInterrupt:
                _INTERRUPTS.pending = True
                return False

        def phase_finish(self, phase_name):
            pass

    return _Monitor()


@functools.cache
def _logger(trt):
    """TensorRT keeps one logger per process (a second one is ignored with a warning), so one per module."""

    sev = trt.ILogger.Severity
    levels = {
        sev.INTERNAL_ERROR: logging.CRITICAL,
        sev.ERROR: logging.ERROR,
        sev.WARNING: logging.WARNING,
        sev.INFO: logging.DEBUG,
        sev.VERBOSE: logging.DEBUG,
    }

    class _Logger(trt.ILogger):
        def log(self, severity, msg):
            try:
                level = levels.get(severity, logging.INFO)
                if _INTERRUPTS.pending:  # TensorRT reports the build it cancels for Ctrl-C as an error
                    level = min(level, logging.DEBUG)
                log.log(level, "[TensorRT] %s", msg)
            except KeyboardInterrupt:  # TensorRT would swallow it: keep it for raise_pending
                _INTERRUPTS.pending = True

    return _Logger()


def check_tensorrt_version(identity: Mapping[str, str], needs: Iterable[str]) -> None:
    """Refuse a full TensorRT older than what ``needs`` (keys of MIN_TENSORRT) requires."""
    if identity["flavour"] != "tensorrt":
        return
    have = tuple(int(p) for p in identity["version"].split(".")[:2])
    for feature in needs:
        want = MIN_TENSORRT[feature]
        if have < want:
            raise EngineBuildError(
                f"{feature} need TensorRT >= {want[0]}.{want[1]}, this is {identity['version']} "
                "(on Jetson: JetPack 6 ships TensorRT 10.3; JetPack 5's 8.5 cannot build these graphs)"
            )


def _parse(trt, builder, onnx_path: Path):
    check_tensorrt_version(tensorrt_identity(trt), ["strongly typed networks"])
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, _logger(trt))
    parsed = parser.parse_from_file(str(onnx_path))
    _INTERRUPTS.raise_pending()
    if not parsed:
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            node = e.node_name() if hasattr(e, "node_name") else f"#{e.node()}"
            op = e.node_operator() if hasattr(e, "node_operator") else "?"
            errors.append(f"node {node!r} ({op}): {e.desc()}")
        raise EngineBuildError(
            f"{onnx_path.name}: TensorRT's ONNX parser rejected the graph: " + "; ".join(errors or ["(no message)"])
        )
    return network, parser


def _try(applied: dict, key: str, fn: Callable[[], Any], value: Any = True) -> None:
    """Apply one optional builder feature; record the value, a deprecation/no-op note, or why it failed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except (AttributeError, TypeError, RuntimeError) as err:
            applied[key] = {"applied": False, "reason": str(err) or type(err).__name__}
            return
    notes = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    applied[key] = {
        "applied": not any("no-op" in n for n in notes),
        "value": value,
        **({"note": notes[0]} if notes else {}),
    }


def _configure(trt, builder, spec, settings: BuildSettings, gpu: Mapping[str, Any]) -> tuple[Any, dict, Any]:
    config = builder.create_builder_config()
    applied: dict[str, Any] = {"strongly_typed": True}
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.shape_profile().items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    applied["profile"] = {k: [list(s) for s in v] for k, v in spec.shape_profile().items()}
    if settings.workspace_gib is not None:
        _try(
            applied,
            "workspace_gib",
            lambda: config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gib * (1 << 30))),
            settings.workspace_gib,
        )
    if settings.optimization_level is not None:
        _try(
            applied,
            "optimization_level",
            lambda: setattr(config, "builder_optimization_level", settings.optimization_level),
            settings.optimization_level,
        )
    _try(
        applied,
        "profiling_verbosity",
        lambda: setattr(config, "profiling_verbosity", trt.ProfilingVerbosity.DETAILED),
        "DETAILED",
    )
    for wanted, flag in ((settings.refit, "REFIT"), (settings.weight_streaming, "WEIGHT_STREAMING")):
        if not wanted:
            continue
        if not hasattr(trt.BuilderFlag, flag):
            raise EngineBuildError(
                f"{flag.lower()} was asked for but {trt.__name__} {trt.__version__} has no BuilderFlag.{flag}"
            )
        _try(applied, flag.lower(), lambda f=flag: config.set_flag(getattr(trt.BuilderFlag, f)))
    if not settings.tf32:
        _try(applied, "tf32", lambda: config.clear_flag(trt.BuilderFlag.TF32), False)
    if settings.capturable and hasattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION"):
        _try(
            applied,
            "require_user_allocation",
            lambda: config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION),
        )
    if not gpu.get("visible") and settings.target_sm and hasattr(trt, "ComputeCapability"):
        member = "SM" + settings.target_sm.replace(".", "")
        if not hasattr(trt.ComputeCapability, member):
            supported = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
            raise EngineBuildError(
                f"{trt.__name__} {trt.__version__} cannot target SM {settings.target_sm}; it targets {supported}"
            )
        config.num_compute_capabilities = 1
        _try(
            applied,
            "target_sm",
            lambda: config.set_compute_capability(getattr(trt.ComputeCapability, member), 0),
            settings.target_sm,
        )
    cache = None
    if settings.timing_cache is not None:
        path = Path(settings.timing_cache)
        blob = path.read_bytes() if path.is_file() else b""

        def load():
            nonlocal cache
            cache = config.create_timing_cache(blob)
            if not config.set_timing_cache(cache, False):
                raise RuntimeError(f"{path} does not match this TensorRT/GPU")

        _try(applied, "timing_cache", load, {"path": str(path), "loaded_bytes": len(blob)})
        if not applied["timing_cache"]["applied"]:
            cache = None
    return config, applied, cache


def _target_sm(settings: BuildSettings, gpu: Mapping[str, Any]) -> str | None:
    return gpu["compute_capability"] if gpu.get("visible") else settings.target_sm


def _refuse_fp8(component: str, report: Mapping[str, Any], target: str | None) -> None:
    if not uses_fp8(report):
        return
    if target is None:
        log.warning(
            "%s has FP8 Q/DQ and no target GPU is known (no GPU visible, no target_sm); it runs only on SM >= 8.9",
            component,
        )
        return
    if _parse_sm(target) < FP8_MIN_SM:
        orin = " (Jetson Orin)" if target == "8.7" else ""
        raise EngineBuildError(
            f"{component}.onnx has FP8 Q/DQ ({report['qdq_dtypes']['FP8']} Q/DQ layers) but the target GPU is "
            f"SM {target}{orin}: "
            f"FP8 needs compute capability >= {FP8_MIN_SM[0]}.{FP8_MIN_SM[1]} (Ada/Hopper). Export INT8/INT4 "
            "for this GPU instead"
        )


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _gpu_meta(trt, config, gpu: Mapping[str, Any]) -> dict[str, Any]:
    """The GPU an engine is for: the visible one, plus the compute capabilities it targets when the
    builder records them (TensorRT-RTX; None there means its default set)."""
    if num := getattr(config, "num_compute_capabilities", 0):
        members = [str(config.get_compute_capability(i)).rsplit(".", 1)[-1] for i in range(num)]
        targets = [sm_of_member(m) for m in members if m.startswith("SM")]
        if "CURRENT" in members and gpu.get("visible"):
            targets.append(gpu["compute_capability"])
    else:
        targets = []
    if gpu.get("visible"):
        return dict(gpu) | ({"target_sm": targets or None} if trt.__name__ == "tensorrt_rtx" else {})
    return {"visible": False, "note": "AOT, no GPU", "target_sm": targets or None}


def build_component(
    trt,
    export_dir: Path,
    component: str,
    out_dir: Path,
    spec,
    manifest: Mapping[str, Any],
    settings: BuildSettings,
    gpu: Mapping[str, Any],
) -> BuildResult:
    """Parse, check, build and write one engine with its metadata and report."""
    onnx_path = export_dir / f"{component}.onnx"
    engine_path = out_dir / f"{component}.engine"
    builder = trt.Builder(_logger(trt))
    network, _parser = _parse(trt, builder, onnx_path)
    graph_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if graph_inputs != spec.input_names:
        raise EngineBuildError(
            f"{onnx_path.name} inputs {graph_inputs} differ from its IO spec {spec.input_names}; re-export"
        )
    report = {"network": network_report(network)}
    if "INT4" in report["network"]["qdq_dtypes"]:
        check_tensorrt_version(tensorrt_identity(trt), ["INT4 block-wise weights"])
    _refuse_fp8(component, report["network"], _target_sm(settings, gpu))
    config, applied, cache = _configure(trt, builder, spec, settings, gpu)
    monitor = _progress_monitor(trt)
    if monitor is not None:
        config.progress_monitor = monitor
    t0 = time.perf_counter()
    with _INTERRUPTS.watching():
        plan = builder.build_serialized_network(network, config)
    _INTERRUPTS.raise_pending()
    seconds = time.perf_counter() - t0
    if plan is None:
        raise EngineBuildError(f"{component}: TensorRT could not build the engine (its errors are logged above)")
    plan_bytes = bytes(plan)
    if gpu.get("visible"):
        try:
            report["engine"] = inspect_engine(trt, plan, _logger(trt))
        except (RuntimeError, AttributeError) as err:
            report["engine"] = {"source": "unavailable", "reason": str(err)}
    else:
        report["engine"] = {
            "source": "unavailable",
            "reason": (
                f"no CUDA GPU visible: the engine inspector needs a deserialized engine and {trt.__name__} "
                "deserializes only on a GPU; "
                "the layer precisions above come from the parsed network"
            ),
        }
    gpu_meta = _gpu_meta(trt, config, gpu)
    recipe = manifest.get("recipe") or {}
    meta = {
        "format": ENGINE_FORMAT,
        "version": ENGINE_VERSION,
        "component": component,
        "engine_file": engine_path.name,
        "engine_bytes": len(plan_bytes),
        "engine_sha256": hashlib.sha256(plan_bytes).hexdigest(),
        "tensorrt": tensorrt_identity(trt),
        "gpu": gpu_meta,
        "host": platform.machine(),
        "export": {
            "dir": str(export_dir.resolve()),
            "target": manifest.get("target"),
            "recipe_sha256": recipe.get("sha256"),
            "onnx_sha256": manifest["files"][onnx_path.name]["sha256"],
        },
        "iospec": spec.to_dict(),
        "settings": asdict(settings),
        "applied": applied,
        "build_seconds": round(seconds, 3),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "report_file": f"{engine_path.name}.report.json",
    }
    report.update(component=component, engine_bytes=len(plan_bytes), build_seconds=round(seconds, 3))
    files = {
        engine_path: plan_bytes,
        Path(f"{engine_path}.json"): _json_bytes(meta),
        Path(f"{engine_path}.report.json"): _json_bytes(report),
    }
    if cache is not None:
        files[Path(settings.timing_cache)] = bytes(config.get_timing_cache().serialize())
    atomic_files(files)
    log.info(
        "%s: %.1f MB engine in %.1f s; %s", component, len(plan_bytes) / 1e6, seconds, report["network"]["summary"]
    )
    return BuildResult(
        component,
        engine_path,
        Path(f"{engine_path}.json"),
        Path(f"{engine_path}.report.json"),
        len(plan_bytes),
        seconds,
    )


def build_engines(
    export_dir: str | os.PathLike,
    components: Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    workspace_gib: float | None = 4.0,
    timing_cache: str | os.PathLike | None = None,
    refit: bool = False,
    weight_streaming: bool = False,
    overwrite: bool = False,
    optimization_level: int | None = None,
    target_sm: str | None = None,
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
    tf32: bool = True,
    capturable: bool = True,
) -> dict[str, BuildResult]:
    """Build ``<component>.engine`` for each component of a verified export folder.

    ``components`` defaults to the manifest's; ``out_dir`` to the export folder. The export's hashes
    are checked first (an edited graph is refused). ``progress`` wraps the component iterable (tqdm).
    ``tf32`` / ``capturable``: see :class:`BuildSettings`.
    Raises EngineBuildError (a ValueError; ManifestError too), FileExistsError for existing engines without
    ``overwrite`` (with it, for engine files without their dgq metadata), OutputBusyError while another
    process builds into the same files, KeyboardInterrupt for Ctrl-C (the build is cancelled).
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir, verify=True)
    if manifest["target"] not in BUILDABLE_TARGETS:
        raise EngineBuildError(
            f"{export_dir} is a {manifest['target']!r} export, which runs in ONNX Runtime; TensorRT builds the "
            f"{' and '.join(repr(t) for t in BUILDABLE_TARGETS)} targets' graphs (dgq export --target tensorrt)"
        )
    if manifest.get("fused_attention"):
        raise EngineBuildError(
            f"{export_dir} was exported with fused attention (ONNX Runtime's contrib MultiHeadAttention), which "
            "TensorRT cannot parse; export again without --fused-attention to build engines"
        )
    specs = read_specs(export_dir)
    components = list(components or manifest["components"])
    unknown = [c for c in components if c not in manifest["components"] or c not in specs]
    if unknown:
        raise EngineBuildError(f"{export_dir} has no component(s) {unknown}; it exports {manifest['components']}")
    settings = BuildSettings(
        workspace_gib,
        None if timing_cache is None else str(timing_cache),
        refit,
        weight_streaming,
        optimization_level,
        target_sm,
        tf32,
        capturable,
    )
    trt = load_tensorrt()
    out = Path(out_dir) if out_dir is not None else export_dir
    created = not out.exists()
    try:
        with contextlib.ExitStack() as claims:
            # Every engine file is claimed before the first build: a second build into the same folder
            # fails now instead of replacing these engines, and an existing engine is refused (or, with
            # overwrite, recognised by its metadata) before any time is spent.
            existing = []
            for c in components:
                engine = out / f"{c}.engine"
                for path in (engine, Path(f"{engine}.json"), Path(f"{engine}.report.json")):
                    claims.enter_context(claim_output(path, overwrite=True))
                if engine.exists() or Path(f"{engine}.json").exists():
                    existing.append(engine)
            if existing and not overwrite:
                raise FileExistsError(f"{', '.join(map(str, existing))} already exist(s) (pass overwrite to rebuild)")
            foreign = [str(e) for e in existing if not is_engine_file(e)]
            if foreign:
                raise NotOwnedError(
                    f"{', '.join(foreign)} exist(s) without the dgq metadata (.engine.json) that marks an engine "
                    "dgq built; overwrite replaces only those, so move or delete them yourself"
                )
            gpu = gpu_info()
            log.info(
                "building %s with %s %s on %s",
                components,
                trt.__name__,
                trt.__version__,
                gpu.get("name", "no GPU (AOT)"),
            )
            results = {}
            for component in (progress or iter)(components):
                results[component] = build_component(
                    trt, export_dir, component, out, specs[component], manifest, settings, gpu
                )
            return results
    except BaseException:
        if created:  # an engine folder this call created is not left behind empty
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def is_engine_file(path: str | os.PathLike) -> bool:
    """True for an engine this project built: its ``.engine.json`` is dgq engine metadata naming it."""
    try:
        meta = json.loads(Path(f"{path}.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == ENGINE_FORMAT and meta.get("engine_file") == Path(path).name


def report_table(results: Mapping[str, BuildResult]) -> str:
    """The short table of :func:`runtime.engine_report.format_table` for built engines."""
    return format_table({c: json.loads(r.report.read_text()) for c, r in results.items()})
