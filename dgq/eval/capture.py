"""Record every call a pipeline makes to its UNet, then replay those exact inputs on another UNet.

Recording is a module forward hook (``register_forward_hook(with_kwargs=True)``) held only inside a
``with`` block: the UNet's code and ``forward`` stay untouched, so it works for any diffusers
pipeline and any UNet that is an ``nn.Module`` (float, simulated-quantized, or a module wrapping an
engine). Replaying calls the other UNet with the recorded positional and keyword arguments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn


@dataclass
class UNetCall:
    """One UNet call: its inputs (cloned) and the noise prediction it returned."""

    args: tuple
    kwargs: dict
    output: torch.Tensor

    @property
    def timestep(self) -> float:
        t = self.args[1] if len(self.args) > 1 else self.kwargs["timestep"]
        return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


def noise_prediction(output: Any) -> torch.Tensor:
    """The sample tensor of a UNet's return value: a tensor, a tuple (``return_dict=False``), or an
    object with ``.sample`` (``UNet2DConditionOutput``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the noise prediction in a UNet output of type {type(output).__name__}")


def _clone(value: Any, memo: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    # Pipelines pass the same prompt-embedding tensor at every step; clone it once (memo by id, the
    # original is kept alive in the memo so its id cannot be reused).
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = (value, value.detach().clone())
        return memo[id(value)][1]
    if isinstance(value, dict):
        return {k: _clone(v, memo) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v, memo) for v in value)
    return value


@contextlib.contextmanager
def record_unet_calls(unet: nn.Module) -> Iterator[list[UNetCall]]:
    """Yield a list that fills with one :class:`UNetCall` per forward of ``unet`` inside the block."""
    if not isinstance(unet, nn.Module):
        raise TypeError(
            f"recording UNet calls needs an nn.Module UNet (a forward hook), got {type(unet).__name__}; "
            "wrap a non-torch backend in an nn.Module or turn noise fidelity off"
        )
    calls: list[UNetCall] = []
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, args, kwargs, output):
        inputs = _clone((args, kwargs), memo)
        calls.append(UNetCall(inputs[0], inputs[1], noise_prediction(output).detach().cpu().clone()))

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


@torch.inference_mode()
def replay(unet: Any, call: UNetCall, device: str | torch.device | None = None) -> torch.Tensor:
    """Run ``unet`` (any callable with the diffusers UNet signature) on the inputs of ``call``,
    moved to ``device`` when given; returns its noise prediction on the CPU."""
    args, kwargs = (call.args, call.kwargs) if device is None else _to((call.args, call.kwargs), torch.device(device))
    return noise_prediction(unet(*args, **kwargs)).cpu()
