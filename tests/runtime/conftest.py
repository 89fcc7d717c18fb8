"""Fixtures of the runtime tests: stand-ins for TensorRT and torch.cuda (see trt_standins.py)."""

from __future__ import annotations

import sys
import types

import pytest

from runtime.runners import TensorRTRunner
from tests.runtime.trt_standins import FakeCuda, FakeNetwork, address_registry, make_tensorrt


@pytest.fixture
def standin(monkeypatch, tmp_path):
    """Stand-in CUDA, address registry and both TensorRT flavours in sys.modules."""
    cuda = FakeCuda().install(monkeypatch)
    modules = {m: make_tensorrt(m) for m in ("tensorrt", "tensorrt_rtx")}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    counter = iter(range(10_000))

    def runner(network: FakeNetwork, module: str = "tensorrt", **kwargs) -> TensorRTRunner:
        path = tmp_path / f"{network.spec.name}-{next(counter)}.engine"
        path.write_bytes(modules[module].plan_for(network))
        return TensorRTRunner(path, network.spec, module=module, **kwargs)

    with address_registry() as registry:
        yield types.SimpleNamespace(cuda=cuda, modules=modules, registry=registry, runner=runner)
