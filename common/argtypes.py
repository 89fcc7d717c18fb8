"""Command-line value types that validate at parse time, with ranges that say why.

An argparse ``type=`` callable raising :class:`argparse.ArgumentTypeError` turns a bad value into
``dgq <command>: error: argument --steps: ...`` and exit status 2 before any model is loaded.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

# Pixel sizes: diffusers' SD pipelines need a multiple of 8 (the SD VAE's factor; the zoo's smaller
# VAEs divide it), and the largest is twice SDXL's native 1024 px: past it one image's activations
# outgrow the memory of any machine this runs on.
SIZE_MULTIPLE = 8
MAX_SIZE = 2048
# Sampler steps: the schedulers have 1000 training timesteps and refuse more inference steps.
MAX_STEPS = 1000


def integer(low: int, high: int | None = None, why: str = "") -> Callable[[str], int]:
    """An int in ``[low, high]`` (``high`` None: no upper bound); ``why`` ends the error message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"{value} is not {span}" + (f": {why}" if why else ""))
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def real(low: float, why: str = "", strict: bool = False) -> Callable[[str], float]:
    """A finite float ``>= low`` (``> low`` when ``strict``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            span = f"{'>' if strict else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"{text} is not a finite number {span}" + (f": {why}" if why else ""))
        return value

    parse.__name__ = "number"
    return parse


def image_size(text: str) -> int:
    """A pixel size: a positive multiple of :data:`SIZE_MULTIPLE` up to :data:`MAX_SIZE`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0 or value % SIZE_MULTIPLE or value > MAX_SIZE:
        raise argparse.ArgumentTypeError(
            f"{value} is not a positive multiple of {SIZE_MULTIPLE} up to {MAX_SIZE}: the VAE works on "
            f"{SIZE_MULTIPLE}-pixel blocks, and past {MAX_SIZE} px (twice SDXL's size) one image outgrows memory"
        )
    return value


steps = integer(1, MAX_STEPS, f"one step at least, and the schedulers have {MAX_STEPS} timesteps")
count = integer(1, why="zero would do nothing")
guidance = real(0.0, "classifier-free guidance scale; values up to 1 turn guidance off")


__all__ = ["MAX_SIZE", "MAX_STEPS", "SIZE_MULTIPLE", "count", "guidance", "image_size", "integer", "real", "steps"]
