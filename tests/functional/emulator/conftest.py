"""Fixtures of the emulator's own tests: one emulator per session (two instances), reset before each test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from local.emulator.testing import EmulatorHandle, running_emulator
from tests.functional.emulator.helpers import Api

INSTANCES = {
    "default": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())},
    "fleet-eu": {"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())},
}


@pytest.fixture(scope="session")
def shared_emulator() -> Iterator[EmulatorHandle]:
    with running_emulator(INSTANCES) as emulator:
        yield emulator


@pytest.fixture
def emulator(shared_emulator: EmulatorHandle) -> EmulatorHandle:
    """The session's emulator, reset: no users, tokens, counters or faults; config at its start values."""
    shared_emulator.reset()
    return shared_emulator


@pytest.fixture
def api(emulator: EmulatorHandle) -> Iterator[Api]:
    client = Api(emulator)
    yield client
    client.session.close()
