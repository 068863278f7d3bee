"""Learned render times: forgotten on demand, and never carried from one test to the next."""

from __future__ import annotations

import pytest

from imagecb_provider.triggers import task as trigger_module
from imagecb_provider.triggers.task import RenderTimes


def test_clear_forgets_every_connection():
    times = RenderTimes()
    times.observe("a", 3.0)
    times.observe("b", 5.0)
    times.clear()
    assert (times.estimate("a"), times.estimate("b")) == (None, None)
    times.observe("a", 7.0)  # and it learns again afterwards
    assert times.estimate("a") == 7.0


@pytest.mark.parametrize("seconds", [4.0, 40.0])
def test_each_test_starts_with_nothing_learned(seconds):
    """Run twice: the second run fails if what the first learned leaked into it."""
    assert trigger_module.RENDER_TIMES.estimate("imagecb_default") is None
    trigger_module.RENDER_TIMES.observe("imagecb_default", seconds)
    assert trigger_module.RENDER_TIMES.estimate("imagecb_default") == seconds
