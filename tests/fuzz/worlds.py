"""A fresh set of in-memory fakes per generated input (Hypothesis runs many inputs per test), and a capture of
everything the service logs, to look for secrets in it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

from telematics_reg.observability import SERVICE
from tests.unit.worlds import Lifecycle, World, new_lifecycle, new_world

__all__ = ["Lifecycle", "LogCapture", "captured_logs", "leaks", "new_lifecycle", "new_world", "world_secrets"]


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
