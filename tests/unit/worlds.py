"""The in-memory worlds the unit and property-based tests run in: every fake the services need, wired like
production. Built fresh per test (the ``world`` fixture) or per generated input (``tests/fuzz``)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from local.fake_lifecycle import (
    InMemoryAdminSessionStore,
    InMemoryLifecycleRecords,
    RecordingDeadLetterEraser,
    StaticAdminCredentials,
)
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
from telematics_reg.lifecycle.admin import FleetAdminSession
from telematics_reg.lifecycle.intake import LifecycleIntake
from telematics_reg.lifecycle.service import LifecycleService
from telematics_reg.management_models import AdminCredentials
from telematics_reg.models import InstanceCredentials, RegistrationRequest
from telematics_reg.refresh import TokenRefresher
from telematics_reg.registration import RegistrationService
from telematics_reg.timing import LeaseTiming

#: The production defaults: a 180 s lease, calls up to 142.2 s (4 attempts, Retry-After up to 30 s), 10 s skew.
TIMING = LeaseTiming(lease_seconds=180, call_seconds=142.2, clock_skew_seconds=10)

# The DeviceToken key of every unit test's RegistrationService.
DEVICE_TOKEN_KEY = StaticDeviceTokenKey("unit-tests-device-token-key-0123456789abcdef")

#: The fleet's admin account in the fake upstream (the lifecycle's one admin session).
ADMIN = AdminCredentials(email="ops@example.com", password="pw")


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


def new_world(*, token_lifetime: int = 3600) -> World:
    """A fresh world: one instance (``default``), the fake upstream issuing tokens of ``token_lifetime`` seconds."""
    clock = FakeClock()
    creds = InstanceCredentials.model_validate({"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())})
    budget = InMemoryLoginBudget(per_minute=5, clock=clock)
    upstream = FakeUserService(instances=[creds], token_lifetime=token_lifetime, clock=clock, login_budget=budget)
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


@dataclass
class Lifecycle:
    """A world with the lifecycle flow wired in: a second instance (aliases ``eu`` and ``fleet-eu``), the fleet's
    admin session, and the lifecycle service and intake."""

    world: World
    eu: InstanceCredentials
    records: InMemoryLifecycleRecords
    sessions: InMemoryAdminSessionStore
    admin: FleetAdminSession
    eraser: RecordingDeadLetterEraser
    dead_letters: RecordingDeadLetters
    service: LifecycleService
    intake: LifecycleIntake

    def ms(self, offset_s: float = 0) -> int:
        return int((self.world.clock() + offset_s) * 1000)

    def send(self, detail_type: str, detail: dict[str, object], *, sent_ms: int | None = None, mid: str = "") -> str:
        now = datetime.fromtimestamp(self.world.clock(), UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        event = {"detail-type": detail_type, "source": "customer.app", "time": now, "detail": detail}
        return self.intake.handle(json.dumps(event), message_id=mid or str(uuid.uuid4()), first_sent_ms=sent_ms).status

    def register(self, client_id: str, occurred_ms: int | None = None) -> str:
        request = RegistrationRequest.model_validate({"ClientId": client_id, "FirstName": "Ada"})
        at = occurred_ms if occurred_ms is not None else self.ms()
        return self.world.intake.handle(
            request.model_dump(mode="json", by_alias=True, exclude_none=True),
            message_id=str(uuid.uuid4()),
            source="queue",
            occurred_at_ms=at,
        ).status


def new_lifecycle(world: World, *, unknown_user_seconds: int = 900) -> Lifecycle:
    """The lifecycle flow over ``world`` (which it changes: a second instance, the admin account upstream)."""
    eu = InstanceCredentials.model_validate({"InstanceId": str(uuid.uuid4()), "InstanceKey": str(uuid.uuid4())})
    world.upstream._instances[eu.instance_id] = eu.instance_key.get_secret_value()  # type: ignore[index]
    world.credentials._known["eu"] = eu
    world.credentials._known["fleet-eu"] = eu  # the alias the samples in events/ use
    world.upstream.admin = ADMIN
    records = InMemoryLifecycleRecords(world.store)
    sessions = InMemoryAdminSessionStore()
    admin = FleetAdminSession(
        upstream=world.upstream,
        store=sessions,
        credentials=StaticAdminCredentials(ADMIN),
        clock=world.clock,
        sleep=world.clock.sleep,
    )
    eraser = RecordingDeadLetterEraser()
    dead_letters = RecordingDeadLetters()
    service = LifecycleService(
        upstream=world.upstream,
        records=records,
        credentials=world.credentials,
        device_token_key=DEVICE_TOKEN_KEY,
        admin=admin,
        publisher=world.publisher,
        eraser=eraser,
        clock=world.clock,
    )
    intake = LifecycleIntake(
        service=service,
        dead_letters=dead_letters,
        publisher=world.publisher,
        unknown_user_seconds=unknown_user_seconds,
        clock=world.clock,
    )
    return Lifecycle(world, eu, records, sessions, admin, eraser, dead_letters, service, intake)
