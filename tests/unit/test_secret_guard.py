"""The suite-wide log guard (tests/conftest.py) must recognise what it looks for, or it proves nothing."""

from __future__ import annotations

import base64
import logging
import secrets

import jwt
import pytest

from telematics_reg.observability import SERVICE
from tests.conftest import secrets_in


def test_the_guard_recognises_a_jwt_a_refresh_token_and_a_known_key() -> None:
    token = jwt.encode({"sub": "x", "exp": 1}, "k" * 32, algorithm="HS256")
    refresh = base64.b64encode(secrets.token_bytes(32)).decode()

    assert secrets_in(f'{{"message": "x", "t": "{token}"}}', [])
    assert secrets_in(f"refresh={refresh}", [])
    assert secrets_in("key 1b7cc25f-329e-4482-9dd1-0bb07c0c794b", ["1b7cc25f-329e-4482-9dd1-0bb07c0c794b"])
    assert not secrets_in('{"DeviceToken": "3fa85f64-5717-4562-b3fc-2c963f66afa6", "status": 200}', [])


def test_the_guard_captures_the_service_logger_at_debug(request: pytest.FixtureRequest) -> None:
    capture = request.getfixturevalue("_no_secret_in_any_log_line")
    before = len(capture.lines)

    logging.getLogger(SERVICE).debug("guard check")

    assert len(capture.lines) == before + 1
    assert capture.lines[-1][0] == SERVICE
