"""Suite-wide guard: no log line of the service, in any test, may carry a token or an InstanceKey.

Every record of the service's loggers is captured at DEBUG for the whole session (the service's own
loggers are turned up to DEBUG; third-party libraries keep their levels, as in Lambda) and scanned at the end
for anything shaped like an access token (a JWT) or a refresh token (base64 of 32 bytes), and for the
functional suite's InstanceKeys. A finding fails the run, naming the logger and the place.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest
from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter

from telematics_reg.observability import SERVICE

JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
REFRESH_TOKEN = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43}=(?![A-Za-z0-9+/=])")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(LambdaPowertoolsFormatter())
        self.lines: list[tuple[str, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        # Attached to the service's loggers and to the root: a record that propagates is captured once.
        if getattr(record, "_secret_guard_seen", False):
            return
        record._secret_guard_seen = True
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is still scanned raw
            text = f"{record.msg!r} {record.args!r} {record.__dict__!r}"
        self.lines.append((record.name, f"{record.pathname}:{record.lineno}", text))


def secrets_in(text: str, known: list[str]) -> list[str]:
    found = [m.group(0)[:12] + "..." for m in JWT.finditer(text)]
    found += [m.group(0)[:6] + "..." for m in REFRESH_TOKEN.finditer(text)]
    found += [k[:6] + "..." for k in known if k and k in text]
    return found


@pytest.fixture(scope="session", autouse=True)
def _no_secret_in_any_log_line() -> Iterator[_Capture]:
    capture = _Capture()
    service_loggers = [logging.getLogger(SERVICE), logging.getLogger("telematics_reg"), logging.getLogger("local")]
    saved = [(lg, lg.level) for lg in service_loggers]
    for lg in service_loggers:
        lg.setLevel(logging.DEBUG)
        lg.addHandler(capture)
    logging.getLogger().addHandler(capture)
    yield capture
    logging.getLogger().removeHandler(capture)
    for lg, level in saved:
        lg.removeHandler(capture)
        lg.setLevel(level)

    from tests.functional.conftest import INSTANCES, MALFORMED_INSTANCES  # noqa: PLC0415 - only for their keys

    # A malformed key is looked for without its stray character: a log line may quote the key with it escaped.
    keys = [creds["InstanceKey"].strip() for creds in (*INSTANCES.values(), *MALFORMED_INSTANCES.values())]
    leaks = [
        f"{name} at {where}: {', '.join(found)}"
        for name, where, text in capture.lines
        if (found := secrets_in(text, keys))
    ]
    assert not leaks, "secrets in log lines:\n" + "\n".join(leaks[:20])


@pytest.fixture(scope="session", autouse=True)
def _models_built() -> None:
    """Every model's validator built before any test uses the models from several threads (as each function's
    set-up does on Lambda: see telematics_reg.models.build_models)."""
    from telematics_reg.models import build_models  # noqa: PLC0415 - the fixture is the only user

    build_models()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say where a test ran the emulator with a Login limit laxer than the vendor's, and why."""
    from local.emulator.testing import login_limit_relaxations  # noqa: PLC0415 - read at the end of the run

    relaxed = sorted(set(login_limit_relaxations()))
    if relaxed:
        terminalreporter.section("emulator Login limit relaxed (the vendor's: 5 a minute per IP, then 1 h blocked)")
        for line in relaxed:
            terminalreporter.write_line(line)
