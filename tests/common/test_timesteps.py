"""The one rule for timesteps that were not calibrated: the nearest calibrated timestep's slot."""

from __future__ import annotations

import logging

import pytest

from common.timesteps import SlotTable, nearest_slot, widest_gap

# 25 DDIM steps of a 1000-step model ("leading" spacing, offset 1), in calibration (descending) order.
DDIM25 = [961.0 - 40 * i for i in range(25)]


def test_calibrated_timesteps_keep_their_slot():
    assert [nearest_slot(DDIM25, t) for t in DDIM25] == list(range(25))
    assert nearest_slot(DDIM25, 961.00001) == 0  # a float32 round trip is the same timestep


@pytest.mark.parametrize(
    "t,want",
    [(999.0, 0), (981.1, 0), (940.9, 1), (500.0, 12), (0.0, 24), (2.5, 24), (20.0, 24), (22.0, 23)],
)
def test_other_timesteps_take_the_nearest_by_value(t, want):
    assert nearest_slot(DDIM25, t) == want
    assert abs(DDIM25[want] - t) == min(abs(s - t) for s in DDIM25)


def test_a_tie_goes_to_the_first_slot_in_calibration_order():
    assert nearest_slot(DDIM25, 21.0) == 23  # 41 and 1 are both 20 away; 41 was calibrated first
    assert nearest_slot([1.0, 41.0], 21.0) == 0


def test_reach_is_the_widest_gap():
    assert widest_gap(DDIM25) == 40.0
    assert widest_gap([999.0, 500.0, 480.0]) == 499.0
    assert widest_gap([500.0]) == 0.0
    with pytest.raises(ValueError, match="no calibrated timestep slots"):
        SlotTable([])


def test_inside_the_range_is_quiet_far_outside_warns_once(caplog):
    table = SlotTable(DDIM25, "this export")
    with caplog.at_level(logging.INFO, logger="common.timesteps"):
        # 50 DDIM steps (t = 981 .. 1) and Euler's fractional timesteps stay within one gap: never far.
        assert [table.index(t) for t in (981.0, 940.0, 999.0, 1.0)] == [0, 1, 0, 24]
        assert not any(r.levelno >= logging.WARNING for r in caplog.records)
        assert sum("was not calibrated in this export" in r.message for r in caplog.records) == 1
    low = SlotTable([181.0 - 20 * i for i in range(10)])  # only t < 200 calibrated
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="common.timesteps"):
        assert [low.index(t) for t in (999.0, 800.0, 181.0)] == [0, 0, 0]
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1 and "timestep 999 is outside the range this recipe was calibrated for (1..181" in warnings[0]
    )
    assert low.is_far(202.0) and not low.is_far(200.0) and not low.is_far(181.0)
