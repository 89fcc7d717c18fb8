"""Which calibrated timestep slot a UNet call uses: the one rule shared by the simulator (``dgq``), the
runtime's ``step_index`` input and every exported graph (which take that index and read one slot's row).

A recipe holds one parameter set per calibrated timestep (its *slots*, by value, in calibration order).
A call at a calibrated timestep uses its own slot. Any other timestep (another step count, another
scheduler, Euler's fractional timesteps) uses the slot of the **nearest calibrated timestep by value**;
at an exact tie, the first of the two in calibration order. Nearest, rather than interpolating two
slots' ranges, because each slot has its own channel groups (the grouping is per layer and timestep),
and ranges of two different groupings do not mix; the graphs stay a table lookup.

A timestep further from every slot than the widest gap between two adjacent calibrated timesteps lies
outside the calibrated range (e.g. only t < 200 was calibrated and the sampler starts at 999): it is
still served by the nearest slot, and :class:`SlotTable` warns once.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)

# Two timestep values closer than this (relative, at least absolute 1e-4) are the same timestep: float32
# round trips of a scheduler's timesteps stay well inside it.
SAME_TIMESTEP_RTOL = 1e-4


def same_timestep(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) <= SAME_TIMESTEP_RTOL * max(1.0, abs(float(a)))


def nearest_slot(slots: Sequence[float], timestep: float) -> int:
    """Index of the calibrated slot a timestep uses: its own, else the nearest by value (ties: the first)."""
    if not slots:
        raise ValueError("no calibrated timestep slots")
    t = float(timestep)
    for i, s in enumerate(slots):
        if same_timestep(s, t):
            return i
    return min(range(len(slots)), key=lambda i: (abs(float(slots[i]) - t), i))


def widest_gap(slots: Sequence[float]) -> float:
    """The widest distance between adjacent calibrated timesteps (0 with one slot): how far a slot reaches."""
    values = sorted(float(s) for s in slots)
    return max((b - a for a, b in itertools.pairwise(values)), default=0.0)


class SlotTable:
    """Timestep value -> slot index by :func:`nearest_slot`, for one recipe or export (``what`` names it
    in messages). Logs once (INFO) that uncalibrated timesteps take the nearest slot, and warns once
    when a timestep lies outside the calibrated range by more than :func:`widest_gap`."""

    def __init__(self, slots: Sequence[float], what: str = "this recipe"):
        self.slots = [float(s) for s in slots]
        if not self.slots:
            raise ValueError(f"{what} has no calibrated timestep slots")
        self.what = what
        self.reach = widest_gap(self.slots)
        self._told = self._warned = False

    def is_calibrated(self, timestep: float) -> bool:
        return any(same_timestep(s, timestep) for s in self.slots)

    def is_far(self, timestep: float) -> bool:
        """True when ``timestep`` is further from every calibrated timestep than the widest gap between two."""
        t = float(timestep)
        distance = min(abs(s - t) for s in self.slots)
        return distance > self.reach and not self.is_calibrated(t)

    def index(self, timestep: float) -> int:
        i = nearest_slot(self.slots, timestep)
        if not self._told and not self.is_calibrated(timestep):
            self._told = True
            log.info(
                "timestep %g was not calibrated in %s: uncalibrated timesteps use the slot of the nearest "
                "calibrated timestep (here %g)",
                float(timestep),
                self.what,
                self.slots[i],
            )
        if not self._warned and self.is_far(timestep):
            self._warned = True
            log.warning(
                "timestep %g is outside the range %s was calibrated for (%g..%g, up to %g apart): it uses the "
                "parameters of timestep %g, and accuracy may suffer; calibrate with this scheduler and step count",
                float(timestep),
                self.what,
                min(self.slots),
                max(self.slots),
                self.reach,
                self.slots[i],
            )
        return i


__all__ = ["SAME_TIMESTEP_RTOL", "SlotTable", "nearest_slot", "same_timestep", "widest_gap"]
