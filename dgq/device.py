"""Where the model runs: ``--device`` and ``--dtype`` for calibration, evaluation and export.

``--device`` is ``cpu``, ``cuda`` or ``cuda:N`` (default: ``cuda`` when torch sees a CUDA device, else
``cpu``). Under several processes (``torchrun`` / ``accelerate launch``) ``cuda`` means the GPU of the
process's local rank. ``--dtype`` is the model's dtype (float32, float16, bfloat16); DGQ's statistics
accumulate in float32 whatever it is, and recipes, exported graphs and the simulator's parameters stay
float32.

This module imports torch only inside functions, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any

from common.errors import DGQError
from dgq import distributed

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")
_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


class DeviceError(DGQError, ValueError):
    """A device or dtype this machine cannot give (no CUDA, a GPU index past the last one)."""


def device_spec(text: str) -> str:
    """argparse type of ``--device``: ``cpu``, ``cuda`` or ``cuda:N`` (checked against the machine later)."""
    m = _DEVICE_RE.match(text.strip().lower())
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N")
    return m.group(0)


def add_arguments(parser: argparse.ArgumentParser, what: str = "the pipeline") -> None:
    """``--device`` and ``--dtype`` for a command that runs ``what``."""
    parser.add_argument(
        "--device",
        type=device_spec,
        default=None,
        help=f"device of {what}: cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu; "
        "under torchrun/accelerate launch, cuda is each process's own GPU)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help=f"dtype of {what} (default float32); DGQ statistics accumulate in float32 whatever it is",
    )


def local_rank() -> int:
    """This process's rank on its machine as torchrun / accelerate launch set it (0 when not launched so)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def cuda_usable() -> bool:
    """This torch is built with CUDA and sees a device."""
    import torch

    return bool(torch.backends.cuda.is_built() and torch.cuda.is_available())


def resolve_device(spec: str | None = None) -> Any:
    """The ``torch.device`` for ``spec`` (None: cuda when available, else cpu); :class:`DeviceError` when
    this machine has no such device."""
    import torch

    spec = device_spec(spec) if spec is not None else ("cuda" if cuda_usable() else "cpu")
    m = _DEVICE_RE.match(spec)
    if m.group(1) == "cpu":
        return torch.device("cpu")
    if not cuda_usable():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DeviceError(
            f"--device {spec}: torch {torch.__version__.split('+')[0]} ({build}) sees no CUDA device "
            "(no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it); use --device cpu"
        )
    launched = distributed.launched()
    if m.group(2) is not None and launched:
        raise DeviceError(
            f"--device {spec} under several processes would put every process on one GPU; "
            "use --device cuda (each process takes the GPU of its local rank)"
        )
    count = torch.cuda.device_count()
    # Launched: the local rank's GPU, modulo the visible ones as accelerate picks it (a launcher that
    # shows each process one GPU puts every rank on its cuda:0).
    index = (
        int(m.group(2))
        if m.group(2) is not None
        else (local_rank() % count if launched else torch.cuda.current_device())
    )
    if index >= count:
        raise DeviceError(f"--device cuda:{index}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_dtype(name: str | None = None) -> Any:
    """``torch.float32`` / ``float16`` / ``bfloat16`` for ``name`` (None: float32)."""
    import torch

    name = name or "float32"
    if name not in DTYPES:
        raise DeviceError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def place(pipe: Any, device: Any, dtype: Any) -> Any:
    """``pipe`` moved to ``device`` and cast to ``dtype`` in place (every component); returns it."""
    import torch

    if device.type == "cpu" and dtype == torch.float16:
        log.warning("float16 on the CPU is slow and some ops lack kernels there; bfloat16 or float32 is usual")
    unet = getattr(pipe, "unet", None)
    if unet is not None and unet.dtype == dtype:
        return pipe.to(device)  # no cast (diffusers warns about casts with to())
    return pipe.to(device, dtype)


def describe(device: Any, dtype: Any) -> dict[str, str]:
    """What a recipe records of where it was calibrated: the device type and the model dtype."""
    return {"device": device.type, "dtype": str(dtype).removeprefix("torch.")}


def is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation: MemoryError, torch's CPU allocator, or a device out of memory."""
    text = str(err)
    return isinstance(err, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()
