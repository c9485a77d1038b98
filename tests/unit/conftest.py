from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from local.fake_store import InMemoryTokenStore
from local.fakes import (
    FakeUserService,
    InMemoryLoginBudget,
    RecordingDeadLetters,
    RecordingPublisher,
    StaticDeviceTokenKey,
)
from telematics_reg.credentials import StaticCredentials
from telematics_reg.intake import RegistrationIntake
from telematics_reg.models import InstanceCredentials
from telematics_reg.refresh import TokenRefresher
from telematics_reg.registration import RegistrationService
from telematics_reg.timing import LeaseTiming

#: The production defaults: a 180 s lease, calls up to 142.2 s (4 attempts, Retry-After up to 30 s), 10 s skew.
TIMING = LeaseTiming(lease_seconds=180, call_seconds=142.2, clock_skew_seconds=10)

# The DeviceToken key of every unit test's RegistrationService.
DEVICE_TOKEN_KEY = StaticDeviceTokenKey("unit-tests-device-token-key-0123456789abcdef")


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@dataclass
class World:
    """Every fake the services need, wired like production."""

    clock: FakeClock
    creds: InstanceCredentials
    upstream: FakeUserService
    store: InMemoryTokenStore
    credentials: StaticCredentials
    publisher: RecordingPublisher
    dead_letters: RecordingDeadLetters
    budget: InMemoryLoginBudget
    service: RegistrationService
    intake: RegistrationIntake
    refresher: TokenRefresher


@pytest.fixture
def world() -> World:
    clock = FakeClock()
    creds = InstanceCredentials.model_validate({"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())})
    budget = InMemoryLoginBudget(per_minute=5, clock=clock)
    upstream = FakeUserService(instances=[creds], token_lifetime=3600, clock=clock, login_budget=budget)
    store = InMemoryTokenStore(shards=4)
    credentials = StaticCredentials({"default": creds})
    publisher = RecordingPublisher()
    dead_letters = RecordingDeadLetters()
    service = RegistrationService(
        upstream=upstream,
        store=store,
        credentials=credentials,
        device_token_key=DEVICE_TOKEN_KEY,
        publisher=publisher,
        clock=clock,
        sleep=clock.sleep,
    )
    refresher = TokenRefresher(
        upstream=upstream,
        store=store,
        credentials=credentials,
        publisher=publisher,
        margin_seconds=600,
        timing=TIMING,
        clock=clock,
        sleep=clock.sleep,
    )
    intake = RegistrationIntake(service=service, dead_letters=dead_letters, publisher=publisher)
    return World(
        clock, creds, upstream, store, credentials, publisher, dead_letters, budget, service, intake, refresher
    )
