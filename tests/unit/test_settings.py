"""The settings that carry guarantees are bounded at start: a claim or a lease shorter than what it must outlive
is refused with an error that says which setting, why, and the least value that works."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from telematics_reg.settings import ServiceSettings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CLAIM_SECONDS", "REFRESH_LEASE_SECONDS", "FUNCTION_TIMEOUT_SECONDS", "CLOCK_SKEW_SECONDS"):
        monkeypatch.delenv(name, raising=False)


def test_the_defaults_hold_a_claim_past_the_function_and_a_lease_past_the_longest_call() -> None:
    settings = ServiceSettings()

    timing = settings.lease_timing
    assert settings.longest_upstream_call_seconds == 142.2  # 4 attempts x 13.05 s + 3 Retry-After pauses of 30 s
    assert settings.refresh_lease_seconds >= timing.needed_for_call
    assert settings.refresh_lease_seconds >= settings.function_timeout_seconds + settings.clock_skew_seconds
    assert settings.claim_seconds >= settings.function_timeout_seconds + settings.clock_skew_seconds


def test_a_claim_shorter_than_the_function_timeout_plus_skew_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAIM_SECONDS", "60")

    with pytest.raises(ValidationError, match=r"CLAIM_SECONDS=60 is too short.*= 70 s"):
        ServiceSettings()


def test_a_lease_shorter_than_the_longest_call_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFRESH_LEASE_SECONDS", "60")

    with pytest.raises(ValidationError, match=r"REFRESH_LEASE_SECONDS=60 is too short.*at least 162.2 s"):
        ServiceSettings()


def test_more_retries_need_a_longer_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_MAX_ATTEMPTS", "6")  # 6 x 13.05 + 5 x 30 = 228.3 s per call

    with pytest.raises(ValidationError, match="REFRESH_LEASE_SECONDS=180 is too short"):
        ServiceSettings()
    monkeypatch.setenv("REFRESH_LEASE_SECONDS", "250")
    assert ServiceSettings().lease_timing.needed_for_call == pytest.approx(248.3)


def test_a_longer_function_timeout_needs_longer_claims_and_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUNCTION_TIMEOUT_SECONDS", "300")

    with pytest.raises(ValidationError) as refused:
        ServiceSettings()

    assert "CLAIM_SECONDS=120 is too short" in str(refused.value)
