"""Where a delivered message meets the registration service, for both entry points (signup events and the
queue): parse, register, and decide each message's fate.

Every message ends in exactly one of three places:

* stored (registered, or reported as the existing registration of its ClientId);
* retried (the exception propagates: a batch item failure, or a failed async invocation);
* the dead-letter queue at once, with its reason, when retrying can never help (bad input, an unknown
  instance, a permanent upstream rejection, a bulk chunk whose answer was lost).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit

from telematics_reg.dead_letters import DeadLetter, DeadLetterSink
from telematics_reg.errors import (
    FieldError,
    InvalidMessageError,
    RetryLaterError,
    TelematicsError,
    UpstreamValidationError,
    describe_error,
)
from telematics_reg.models import BulkRegistrationRequest, parse_registration_message
from telematics_reg.observability import logger, metrics
from telematics_reg.outcomes import ErrorItem, EventPublisher, RegistrationFailed, Source
from telematics_reg.registration import BulkIncompleteError, RegistrationService


@dataclass(frozen=True)
class MessageResult:
    """What became of one message (for the handler's response and for tests)."""

    status: str  # "registered" | "duplicate" | "bulk" | "dead_lettered"
    device_token: str | None = None
    reason: str | None = None
    stored: int = 0


class RegistrationIntake:
    """Turns one delivered message into a registration, a retry, or a dead letter with its reason."""

    def __init__(
        self, *, service: RegistrationService, dead_letters: DeadLetterSink, publisher: EventPublisher
    ) -> None:
        self._service = service
        self._dead_letters = dead_letters
        self._publisher = publisher

    def handle(self, body: str | bytes | dict[str, Any], *, message_id: str, source: Source) -> MessageResult:
        """Register what ``body`` asks for. Raises only for failures worth retrying."""
        raw = body if isinstance(body, (str, bytes)) else json.dumps(body)
        try:
            request = parse_registration_message(body)
        except InvalidMessageError as exc:
            return self._dead_letter(raw, exc.reason, exc.errors, message_id, source, None, None)

        if isinstance(request, BulkRegistrationRequest) and source == "signup":
            # A signup event is one user (DESIGN.md); bulk loads belong on the registration queue.
            problem = FieldError("Quantity", "bulk requests go on the registration queue, not in a signup event")
            return self._dead_letter(raw, "invalid_fields", [problem], message_id, source, request.instance, None)
        client_id = None if isinstance(request, BulkRegistrationRequest) else request.client_id
        logger.thread_safe_append_keys(client_id=client_id, message_id=message_id)
        foreign: str | None = None
        try:
            if isinstance(request, BulkRegistrationRequest):
                bulk = self._service.register_bulk(request, source=source, message_id=message_id)
                metrics.add_metric("BulkUsersRegistered", MetricUnit.Count, len(bulk.device_tokens))
                return MessageResult("bulk", stored=bulk.stored)
            outcome = self._service.register(request, source=source, message_id=message_id)
        except InvalidMessageError as exc:  # e.g. an instance alias the credentials secret does not hold
            return self._dead_letter(raw, exc.reason, exc.errors, message_id, source, request.instance, client_id)
        except UpstreamValidationError as exc:
            errors = exc.errors or [FieldError("Upstream", str(exc))]
            return self._dead_letter(raw, "upstream_rejected", errors, message_id, source, request.instance, client_id)
        except BulkIncompleteError as exc:
            return self._dead_letter(raw, exc.reason, exc.errors, message_id, source, request.instance, None)
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

    def _dead_letter(
        self,
        raw: str | bytes,
        reason: str,
        errors: list[FieldError],
        message_id: str,
        source: Source,
        instance: str | None,
        client_id: str | None,
    ) -> MessageResult:
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        # If this send fails the exception propagates and the message is retried: it is never dropped.
        self._dead_letters.send(
            DeadLetter(body=text, reason=reason, source=source, errors=errors, original_message_id=message_id)
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
