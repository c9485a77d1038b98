from __future__ import annotations

from telematics_reg.errors import FieldError, InvalidMessageError, RateLimitedError, RetryableUpstreamError


def test_invalid_message_lists_every_field_error() -> None:
    error = InvalidMessageError(
        "invalid_fields", [FieldError("Gender", "unknown value"), FieldError("ClientId", "required")]
    )

    assert error.reason == "invalid_fields"
    assert str(error) == "invalid_fields: Gender: unknown value; ClientId: required"


def test_rate_limited_is_retryable_and_carries_retry_after() -> None:
    error = RateLimitedError("rate limited", status=429, retry_after=2.5, call="create")

    assert isinstance(error, RetryableUpstreamError)
    assert error.retry_after == 2.5
    assert str(error) == "rate limited (HTTP 429)"
