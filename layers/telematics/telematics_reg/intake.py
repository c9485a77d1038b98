"""Where a delivered message meets the registration service, for both entry points (signup events and the
queue): parse, register, and decide each message's fate.

Every message ends in exactly one of three places:

* stored (registered, or reported as the existing registration of its ClientId);
* retried (the exception propagates: a batch item failure, or a failed async invocation);
* the dead-letter queue at once, with its reason, when retrying can never help (bad input, an unknown
  instance, a permanent upstream rejection, a bulk chunk whose answer was lost, a ``RequestId`` reused for a
  bulk of another size).

A bulk without ``RequestId`` is given the message id as its ``RequestId`` here, before anything is called
upstream: SQS redelivers a message with the same id, and every dead letter of a bulk carries the id in its
body, so a redrive (a new message, a new id) continues the same bulk instead of making it again.

A bulk that runs short of invocation time after storing users is sent back onto its queue (the same body, so
the same ``RequestId``) and its message is reported handled: progress never spends one of the queue's receives.
A bulk that stops without storing anyone (a twin holds its chunk, the upstream fails) is retried as before, so
the DLQ still catches a bulk that cannot progress.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit

from telematics_reg.continuations import BulkContinuations
from telematics_reg.dead_letters import DeadLetter, DeadLetterSink
from telematics_reg.errors import (
    FieldError,
    InvalidMessageError,
    RetryLaterError,
    TelematicsError,
    UpstreamValidationError,
    describe_error,
)
from telematics_reg.models import BulkRegistrationRequest, RegistrationRequest, parse_registration_message
from telematics_reg.observability import logger, metrics
from telematics_reg.outcomes import ErrorItem, EventPublisher, RegistrationFailed, Source
from telematics_reg.registration import (
    BulkDeferredError,
    BulkIncompleteError,
    BulkRequestConflictError,
    RegistrationService,
    UserErasedError,
    stamp_request_id,
)


def event_time_ms(value: str | None) -> int | None:
    """An EventBridge ``time`` (``2026-01-31T12:00:00Z``) as epoch ms; ``None`` if absent or unreadable.

    Example
    -------
    >>> event_time_ms("1970-01-01T00:00:01Z")
    1000
    """
    if not value or not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return int((parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp() * 1000)


@dataclass(frozen=True)
class MessageResult:
    """What became of one message (for the handler's response and for tests)."""

    status: str  # "registered" | "duplicate" | "bulk" | "bulk_continued" | "dead_lettered" | "dropped"
    device_token: str | None = None
    reason: str | None = None
    stored: int = 0


class RegistrationIntake:
    """Turns one delivered message into a registration, a retry, or a dead letter with its reason."""

    def __init__(
        self,
        *,
        service: RegistrationService,
        dead_letters: DeadLetterSink,
        publisher: EventPublisher,
        continuations: BulkContinuations | None = None,
    ) -> None:
        """``continuations`` is the registration queue, for the queue function: a bulk that stopped part-way
        after storing users goes back there instead of being retried. Without it, every stop is retried."""
        self._service = service
        self._dead_letters = dead_letters
        self._publisher = publisher
        self._continuations = continuations

    def handle(
        self,
        body: str | bytes | dict[str, Any],
        *,
        message_id: str,
        source: Source,
        time_left: Callable[[], float] | None = None,
        occurred_at_ms: int | None = None,
    ) -> MessageResult:
        """Register what ``body`` asks for. Raises only for failures worth retrying.

        ``time_left`` gives the seconds the invocation has left (a bulk stops starting chunks when it is short).
        ``occurred_at_ms`` (the event's ``time``, the message's first send) orders a registration without
        ``OccurredAt`` against a deletion of its ClientId.
        """
        raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
        try:
            request = parse_registration_message(body)
        except InvalidMessageError as exc:
            return self._dead_letter(raw, exc.reason, exc.errors, message_id, source, None, None, occurred_at_ms)

        if isinstance(request, BulkRegistrationRequest) and source == "signup":
            # A signup event is one user (DESIGN.md); bulk loads belong on the registration queue.
            problem = FieldError("Quantity", "bulk requests go on the registration queue, not in a signup event")
            return self._dead_letter(
                raw, "invalid_fields", [problem], message_id, source, request.instance, None, occurred_at_ms
            )
        request, raw = _stamped(request, raw, message_id, occurred_at_ms)
        # When it was ordered (its OccurredAt, else the event's time or the first send): kept on a dead letter.
        when = request.occurred_at_ms if isinstance(request, RegistrationRequest) else occurred_at_ms
        client_id = None if isinstance(request, BulkRegistrationRequest) else request.client_id
        logger.thread_safe_append_keys(client_id=client_id, message_id=message_id)
        foreign: str | None = None
        try:
            if isinstance(request, BulkRegistrationRequest):
                bulk = self._service.register_bulk(request, source=source, message_id=message_id, time_left=time_left)
                metrics.add_metric("BulkUsersRegistered", MetricUnit.Count, len(bulk.device_tokens))
                return MessageResult("bulk", stored=bulk.stored)
            outcome = self._service.register(request, source=source, message_id=message_id)
        except InvalidMessageError as exc:  # e.g. an instance alias the credentials secret does not hold
            return self._dead_letter(raw, exc.reason, exc.errors, message_id, source, request.instance, client_id, when)
        except UpstreamValidationError as exc:
            errors = exc.errors or [FieldError("Upstream", str(exc))]
            return self._dead_letter(
                raw, "upstream_rejected", errors, message_id, source, request.instance, client_id, when
            )
        except (BulkIncompleteError, BulkRequestConflictError) as exc:
            return self._dead_letter(raw, exc.reason, exc.errors, message_id, source, request.instance, None, when)
        except UserErasedError as exc:
            # Occurred before the deletion of its user: dropped, not dead-lettered (a dead letter would keep the
            # erased user's profile), and announced with ids only.
            metrics.add_metric("RegistrationsAfterErasureDropped", MetricUnit.Count, 1)
            logger.info("registration dropped: its user was deleted after it occurred", extra={"detail": str(exc)})
            self._announce_dropped(request.instance, client_id, message_id, source, exc)
            return MessageResult("dropped", device_token=exc.device_token, reason=exc.reason)
        except BulkDeferredError as exc:
            # Not a failure: the bulk goes on in a later delivery, of a new message or of this one.
            metrics.add_metric("BulkDeferred", MetricUnit.Count, 1)
            metrics.add_metric("BulkUsersRegistered", MetricUnit.Count, exc.stored)
            text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
            if source == "queue" and self._continue_bulk(text, exc):
                return MessageResult("bulk_continued", stored=exc.stored)
            logger.info("bulk continues at the next delivery", extra={"detail": str(exc), "stored": exc.stored})
            raise
        except Exception as exc:
            # Left to be retried (batch item failure, or the async invocation's retry): counted for the alarm.
            metrics.add_metric("RegistrationRetries", MetricUnit.Count, 1)
            logger.warning("registration will be retried", extra={"error": describe_error(exc)})
            if isinstance(exc, TelematicsError):
                raise
            foreign = describe_error(exc)
        finally:
            logger.thread_safe_remove_keys(["client_id", "message_id"])
        if foreign is not None:
            # A foreign exception's text may quote what it was given (a header, a parameter). What propagates from
            # here becomes Lambda's errorMessage, the on-failure record and the X-Ray segment: a safe text only,
            # raised outside the except block so that no exception chain or context carries the original.
            raise RetryLaterError(f"registration will be retried: {foreign}")

        metrics.add_metric("DuplicatesSuppressed" if outcome.duplicate else "UsersRegistered", MetricUnit.Count, 1)
        logger.info(
            "registration stored",
            extra={"device_token": outcome.device_token, "client_id": client_id, "duplicate": outcome.duplicate},
        )
        status = "duplicate" if outcome.duplicate else "registered"
        return MessageResult(status, device_token=outcome.device_token)

    def _announce_dropped(
        self, instance: str, client_id: str | None, message_id: str, source: Source, exc: UserErasedError
    ) -> None:
        try:
            self._publisher.publish(
                RegistrationFailed(
                    instance=instance,
                    client_id=client_id,
                    message_id=message_id,
                    reason=exc.reason,
                    errors=[ErrorItem(key="ClientId", message="the user was deleted after this registration occurred")],
                    source=source,
                )
            )
        except Exception:  # noqa: BLE001 - nothing is lost: the registration is dropped on purpose
            logger.exception("could not publish TelematicsRegistrationFailed")

    def _continue_bulk(self, body: str, stopped: BulkDeferredError) -> bool:
        """Send a bulk that stopped part-way back onto its queue; False leaves its message to be retried.

        Only a delivery that stored users does: each new message follows at least one user stored, and each
        user is stored once, so a bulk makes at most ``Quantity`` of them, duplicates included. A delivery that
        stored nobody is retried (and dead-lettered after ``maxReceiveCount`` such tries). Re-sending is safe
        both ways the send can go::

            D1 (message m1): stores users 0..99, time short -> send m2 (same body, same RequestId) -> m1 handled
              send fails: m1 is reported failed and comes back (one receive spent), nothing is lost
              D1 cut off after the send, before its response: m1 comes back as well as m2; both continue the
              same RequestId, the chunk claims admit one caller per chunk, and each user is stored once
        """
        if self._continuations is None or stopped.stored <= 0:
            return False
        try:
            continuation = self._continuations.send(body)
        except Exception as exc:  # noqa: BLE001 - any failure to re-send: the message is retried instead
            logger.warning(
                "could not send the bulk back onto its queue: retried instead",
                extra={"error": type(exc).__name__, "stored": stopped.stored},
            )
            return False
        metrics.add_metric("BulkContinued", MetricUnit.Count, 1)
        logger.info(
            "bulk sent back onto its queue to continue",
            extra={"detail": str(stopped), "stored": stopped.stored, "continuation_message_id": continuation},
        )
        return True

    def _dead_letter(
        self,
        raw: str | bytes,
        reason: str,
        errors: list[FieldError],
        message_id: str,
        source: Source,
        instance: str | None,
        client_id: str | None,
        occurred_at_ms: int | None = None,
    ) -> MessageResult:
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        # If this send fails the exception propagates and the message is retried: it is never dropped.
        self._dead_letters.send(
            DeadLetter(
                body=text,
                reason=reason,
                source=source,
                errors=errors,
                original_message_id=message_id,
                occurred_at_ms=occurred_at_ms,
            )
        )
        metrics.add_metric("MessagesDeadLettered", MetricUnit.Count, 1)
        logger.warning(
            "message dead-lettered",
            extra={"reason": reason, "errors": [e.as_dict() for e in errors], "message_id": message_id},
        )
        try:
            self._publisher.publish(
                RegistrationFailed(
                    instance=instance,
                    client_id=client_id,
                    message_id=message_id,
                    reason=reason,
                    errors=[ErrorItem(key=e.key, message=e.message) for e in errors],
                    source=source,
                )
            )
        except Exception:  # noqa: BLE001 - the dead letter holds the message; the event is a notification
            logger.exception("could not publish TelematicsRegistrationFailed")
        return MessageResult("dead_lettered", reason=reason)


def _stamped(
    request: RegistrationRequest | BulkRegistrationRequest,
    raw: str | bytes,
    message_id: str,
    occurred_at_ms: int | None,
) -> tuple[RegistrationRequest | BulkRegistrationRequest, str | bytes]:
    """The request (and the body kept for a dead letter) with what a re-send must keep: a bulk's ``RequestId`` (the
    first message's id when it named none), and when a registration occurred (to order it against a deletion)."""
    if isinstance(request, BulkRegistrationRequest) and request.request_id is None:
        request = request.model_copy(update={"request_id": message_id})
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        raw = stamp_request_id(text, message_id)
    if isinstance(request, RegistrationRequest) and request.occurred_at is None and occurred_at_ms is not None:
        request = request.model_copy(update={"occurred_at": datetime.fromtimestamp(occurred_at_ms / 1000, UTC)})
    return request, raw
