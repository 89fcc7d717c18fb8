"""Sampler choice by name: ``--scheduler ddim|euler|dpm++|...`` or any diffusers scheduler class name.

A scheduler is swapped in with ``cls.from_config(old.config)``, diffusers' own way, so the model's
betas, prediction type and timestep spacing carry over; only schedulers diffusers lists as compatible
with the model's own (``scheduler.compatibles``) are accepted. A quantized model runs with any of
them: timesteps that were not calibrated take the nearest calibrated slot (:mod:`common.timesteps`).
"""

from __future__ import annotations

import argparse
import difflib
import inspect
from typing import Any

# Short names for the samplers users ask for; any diffusers scheduler class name works too.
ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpm++-sde": "DPMSolverSinglestepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def _diffusers_schedulers() -> dict[str, type]:
    import diffusers

    out = {}
    for name in dir(diffusers):
        if not name.endswith("Scheduler"):
            continue
        try:
            obj = getattr(diffusers, name)
        except (ImportError, AttributeError):  # a lazily imported class whose extra is missing
            continue
        if inspect.isclass(obj) and issubclass(obj, diffusers.SchedulerMixin):
            out[name] = obj
    return out


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class for an alias (:data:`ALIASES`) or a class name (any case).
    Raises ValueError naming the aliases and the closest class names."""
    key = name.strip()
    known = _diffusers_schedulers()
    target = ALIASES.get(key.lower(), key)
    by_lower = {n.lower(): n for n in known}
    if target.lower() in by_lower:
        return known[by_lower[target.lower()]]
    import diffusers

    close = difflib.get_close_matches(key, list(known) + list(ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown scheduler {name!r}: diffusers {diffusers.__version__} has no such scheduler{hint} "
        f"(short names: {', '.join(ALIASES)}; or a diffusers class name such as DDIMScheduler)"
    )


def argtype(text: str) -> str:
    """argparse ``type=``: a scheduler name diffusers has, checked before any model loads."""
    try:
        scheduler_class(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_argument(parser: argparse.ArgumentParser, what: str, default: str = "the model's own") -> None:
    """The ``--scheduler NAME`` option of every command; ``what`` says what it samples or is saved for."""
    parser.add_argument(
        "--scheduler",
        type=argtype,
        default=None,
        metavar="NAME",
        help=f"sampler {what}: {', '.join(ALIASES)} or a diffusers scheduler class name, built from the model's "
        f"scheduler config (its betas, prediction type and spacing kept); a quantized model runs any sampler "
        f"and step count, a timestep it was not calibrated at taking the nearest calibrated one's parameters "
        f"(default: {default})",
    )


def swap(scheduler: Any, name_or_class: str | type) -> Any:
    """A new scheduler of the named class with ``scheduler``'s config. Raises ValueError when diffusers
    does not list that class as compatible with ``scheduler``'s (e.g. a flow-matching sampler for an
    epsilon-prediction UNet)."""
    cls = scheduler_class(name_or_class) if isinstance(name_or_class, str) else name_or_class
    compatible = {c.__name__ for c in getattr(scheduler, "compatibles", [])} | {type(scheduler).__name__}
    if cls.__name__ not in compatible:
        raise ValueError(
            f"{cls.__name__} is not compatible with this model's {type(scheduler).__name__}; "
            f"compatible: {', '.join(sorted(compatible))}"
        )
    # Every value of the model's config counts as set: diffusers' from_config would otherwise give the
    # new class its own defaults for keys an in-memory scheduler marks as defaulted (e.g. Euler's
    # "linspace" spacing instead of the model's "leading"), where the same model loaded from a saved
    # folder (an export's scheduler/) keeps them. One rule for both paths.
    config = {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}
    return cls.from_config(config)


def use(pipe: Any, name: str | None) -> Any:
    """Give a diffusers pipeline the named scheduler (None: keep its own); returns the pipeline."""
    if name is not None:
        pipe.scheduler = swap(pipe.scheduler, name)
    return pipe


__all__ = ["ALIASES", "add_argument", "argtype", "scheduler_class", "swap", "use"]
