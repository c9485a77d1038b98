"""Errors raised by the library. Every name ends in ``Error``; callers branch on the class, never on text."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final


@dataclass(frozen=True)
class FieldError:
    """One problem with one field, as the upstream's ``Errors[]`` item or our own validation."""

    key: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"Key": self.key, "Message": self.message}


class TelematicsError(Exception):
    """Base class of every error this library raises on purpose.

    Their texts are written never to carry a token, a refresh token or an InstanceKey, so they may be logged,
    returned to Lambda, and put in dead letters. Foreign exceptions (requests, botocore, ...) make no such
    promise: see :func:`describe_error`.
    """


class RetryLaterError(TelematicsError):
    """A failure from outside this library while handling a message, re-raised under a text that is safe to show
    (the message is retried as before). The original is not chained: its text may quote what it was given."""


_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]+")


def describe_error(exc: BaseException, *, limit: int = 500) -> str:
    """A one-line description of ``exc`` that is safe to log, publish or store.

    This library's own errors keep their text. A foreign exception keeps only its type, plus the AWS error code
    when it is a botocore ``ClientError``: its text may quote a header, a parameter or an item.

    Example
    -------
    >>> describe_error(TelematicsError("registration of c-1 is in progress"))
    'TelematicsError: registration of c-1 is in progress'
    >>> describe_error(ValueError("Invalid header value b'1b7cc25f-329e-4482-9dd1-0bb07c0c794b\\\\n'"))
    'ValueError'
    """
    kind = type(exc).__name__
    if isinstance(exc, TelematicsError):
        text = _CONTROL.sub(" ", str(exc)).strip()
        return f"{kind}: {text[:limit]}" if text else kind
    response = getattr(exc, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return f"{kind} ({code})" if isinstance(code, str) and code.isidentifier() else kind


# --- input -------------------------------------------------------------------------------------------------


class InvalidMessageError(TelematicsError):
    """A registration message that can never succeed: bad JSON, wrong types, missing or oversized fields.

    It is never sent upstream and never retried; it goes to the dead-letter queue with ``reason`` and
    ``errors``.
    """

    def __init__(self, reason: str, errors: list[FieldError] | None = None) -> None:
        self.reason = reason
        self.errors = errors or []
        detail = "; ".join(f"{e.key}: {e.message}" for e in self.errors)
        super().__init__(f"{reason}: {detail}" if detail else reason)


class UnknownInstanceError(InvalidMessageError):
    """The message names an instance alias that the credentials secret does not hold."""


# --- upstream ----------------------------------------------------------------------------------------------


@dataclass
class UpstreamError(TelematicsError):
    """An answer from the User Service that is not a success, or no answer at all."""

    message: str
    status: int | None = None
    errors: list[FieldError] = field(default_factory=list)
    call: str = ""

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        parts = [self.message]
        if self.status is not None:
            parts.append(f"(HTTP {self.status})")
        if self.errors:
            parts.append("; ".join(f"{e.key}: {e.message}" for e in self.errors))
        return " ".join(parts)


class RetryableUpstreamError(UpstreamError):
    """Safe and useful to try again later (after backoff)."""


class TransientUpstreamError(RetryableUpstreamError):
    """5xx, connection failure or timeout where the request provably did nothing (or was safe to repeat)."""


class RequestNotSentError(RetryableUpstreamError):
    """The client refused to build or send a request (say, a header value HTTP cannot carry): nothing reached the
    User Service, so trying again is safe, and it succeeds once the input or configuration is fixed. The text
    names the header or the kind of problem, never a value: the values are credentials."""


@dataclass
class RateLimitedError(RetryableUpstreamError):
    """HTTP 429. ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one."""

    retry_after: float | None = None


@dataclass
class LoginDeferredError(RetryableUpstreamError):
    """No Login may be made now: the fleet's Login budget for the sliding minute is spent, or a 429 on a Login opened
    a fleet-wide block (``blocked``). Nothing was sent. ``retry_at`` (epoch seconds) is when one may be possible."""

    retry_at: float = 0.0
    blocked: bool = False


class OutcomeUnknownError(UpstreamError):
    """The request may have been committed upstream but its answer was lost (timeout, dropped connection, 5xx
    after sending). Repeating a Create or CreateMany blindly could make a second user, so it is never retried
    as is: a Create with a known DeviceToken is recovered by Login; anything else is reported."""


class UnauthorizedError(UpstreamError):
    """HTTP 401: bad instance credentials, or a missing/expired/invalid access token."""


class ForbiddenError(UpstreamError):
    """HTTP 403: wrong token type."""


class NotFoundError(UpstreamError):
    """HTTP 404: no such route (an endpoint not offered) or no such user."""


class UpstreamValidationError(UpstreamError):
    """HTTP 400/422 other than a dead refresh token: the upstream rejected the request permanently; ``errors``
    holds its ``Errors[]``."""


class UserAlreadyExistsError(UpstreamValidationError):
    """Create with a ``CustomToken`` that is already some user's DeviceToken."""


class DeadRefreshTokenError(UpstreamError):
    """HTTP 400 on Refresh: the refresh token is used, revoked or unknown. Only Login can recover the user."""


@dataclass
class CreateManyIncompleteError(OutcomeUnknownError):
    """CreateMany was not offered and the one-Create-per-user fallback stopped part-way.

    ``completed`` holds the users that were created (store them: their tokens exist nowhere else) and
    ``cause`` the error that stopped the rest. It is an :class:`OutcomeUnknownError` so that a caller which
    ignores ``completed`` still never repeats the whole call blindly.
    """

    completed: list[Any] = field(default_factory=list, repr=False)
    cause: UpstreamError | None = None
