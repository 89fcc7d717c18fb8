"""Shared test setup: markers that skip cleanly without CUDA or TensorRT."""

from __future__ import annotations

import importlib.util

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _has_tensorrt() -> bool:
    from runtime.build import TENSORRT_MODULES

    return any(importlib.util.find_spec(m) is not None for m in TENSORRT_MODULES)


def pytest_configure(config):
    # The suite runs tiny models, where a second thread gains little, and an oversubscribed machine
    # (another job on the same 2 cores) makes OpenMP spin-waits up to 100x slower. One thread keeps
    # test time predictable.
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = None if _has_cuda() else pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    skip_trt = None if _has_tensorrt() else pytest.mark.skip(reason="needs the tensorrt or tensorrt_rtx module")
    for item in items:
        if skip_gpu and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if skip_trt and "trt" in item.keywords:
            item.add_marker(skip_trt)
