"""A fresh set of in-memory fakes per generated input (Hypothesis runs many inputs per test), and a capture of
everything the service logs, to look for secrets in it."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterable, Iterator

from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

from local.fake_store import InMemoryTokenStore
from local.fakes import FakeUserService, InMemoryLoginBudget, RecordingDeadLetters, RecordingPublisher
from telematics_reg.credentials import StaticCredentials
from telematics_reg.intake import RegistrationIntake
from telematics_reg.models import InstanceCredentials
from telematics_reg.observability import SERVICE
from telematics_reg.refresh import TokenRefresher
from telematics_reg.registration import RegistrationService
from tests.unit.conftest import DEVICE_TOKEN_KEY, TIMING, FakeClock, World


def new_world(*, token_lifetime: int = 3600) -> World:
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


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(LambdaPowertoolsFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def captured_logs() -> Iterator[LogCapture]:
    """Every record of the service's loggers (at DEBUG) while the block runs, formatted as Lambda would."""
    capture = LogCapture()
    loggers = [logging.getLogger(SERVICE), logging.getLogger("telematics_reg")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.addHandler(capture)
    try:
        yield capture
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(capture)
            lg.setLevel(level)


def world_secrets(world: World) -> list[str]:
    """The InstanceKey and every token the fake upstream issued or the store holds."""
    found = [world.creds.instance_key.get_secret_value()]
    for record in world.store.users.values():
        found += [t for t in (record.access_token, record.refresh_token) if t]
    found += [u.refresh_token for u in world.upstream.users.values() if u.refresh_token]
    return found


def leaks(texts: Iterable[str], secrets: Iterable[str]) -> list[str]:
    """Which secrets (shown by their first characters) appear in any of ``texts``."""
    corpus = "\n".join(texts)
    return [secret[:6] + "..." for secret in secrets if secret and secret in corpus]
