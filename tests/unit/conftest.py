from __future__ import annotations

import pytest

from tests.unit.worlds import DEVICE_TOKEN_KEY, TIMING, FakeClock, World, new_world

# What the unit tests import from here (``from .conftest import World``): the builders live in tests/unit/worlds.py.
__all__ = ["DEVICE_TOKEN_KEY", "TIMING", "FakeClock", "World", "world"]


@pytest.fixture
def world() -> World:
    return new_world()
