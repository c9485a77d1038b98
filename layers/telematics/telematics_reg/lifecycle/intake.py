"""Where a delivered lifecycle message meets the service: parse, apply, and decide the message's fate.

A message on the lifecycle queue is either an EventBridge event the rule delivered (``detail-type`` one of the
five, ``detail`` the change) or an operator's message with an ``Action``. Every message ends as:

* applied (and announced), or dropped with its reason (``stale``, ``duplicate``, ``user_deleted``: announced as
  ``TelematicsLifecycleFailed`` with ``DeadLettered: false``);
* retried (the exception propagates: a batch item failure): the user's registration is in flight, another change
  or a refresh holds the user, the upstream or DynamoDB failed;
* dead-lettered with its reason: bad input (``invalid_fields``, ``unknown_action``, ``unknown_instance``, a time
  more than ``FUTURE_TOLERANCE_MS`` ahead of this function's clock, ...)
  before anything is looked up or sent upstream; ``unknown_user`` once a change has waited ``unknown_user_seconds``
  since its first delivery; ``upstream_rejected`` / ``not_found_upstream``. A dead letter says when its change
  occurred as it was ordered (``OccurredAt``, in the body of a message and in an attribute), not when it was
  dead-lettered, so a redriven change keeps its place in its user's order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit

from telematics_reg.dead_letters import DeadLetter, DeadLetterSink
from telematics_reg.errors import FieldError, InvalidMessageError
from telematics_reg.intake import event_time_ms
from telematics_reg.lifecycle.changes import FUTURE_TOLERANCE_MS, LifecycleChange, parse_change
from telematics_reg.lifecycle.events import LifecycleFailed
from telematics_reg.lifecycle.service import LifecycleRejectedError, LifecycleService, UserNotRegisteredError
from telematics_reg.observability import logger, metrics
from telematics_reg.occurred import stamp_occurred_at
from telematics_reg.outcomes import ErrorItem, EventPublisher


@dataclass(frozen=True)
class LifecycleResult:
    status: str  # "applied" | "dropped" | "dead_lettered"
    reason: str | None = None
    device_token: str | None = None


def _as_event(document: Mapping[str, Any]) -> tuple[str, Any, str | None] | None:
    """(detail-type, detail, time) when ``document`` is an EventBridge event."""
    if "detail-type" in document and "detail" in document:
        return str(document["detail-type"]), document["detail"], document.get("time")
    return None


class LifecycleIntake:
    """Turns one delivered message into an applied change, a drop, a retry, or a dead letter with its reason."""

    def __init__(
        self,
        *,
        service: LifecycleService,
        dead_letters: DeadLetterSink,
        publisher: EventPublisher,
        unknown_user_seconds: int = 900,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._service = service
        self._dead_letters = dead_letters
        self._publisher = publisher
        self._unknown_user_ms = unknown_user_seconds * 1000
        self._clock = clock

    def handle(
        self,
        body: str | bytes | Mapping[str, Any],
        *,
        message_id: str,
        first_sent_ms: int | None = None,
        detail_type: str | None = None,
        event_time: str | None = None,
    ) -> LifecycleResult:
        """Apply the change ``body`` holds. Raises only for failures worth retrying.

        ``first_sent_ms`` (the queue's ``SentTimestamp``) orders a change without ``OccurredAt`` and starts the
        ``unknown_user`` bound. ``detail_type``/``event_time`` are given when ``body`` is an event's ``detail``.
        """
        raw = body if isinstance(body, str | bytes) else json.dumps(body)
        now_ms = int(self._clock() * 1000)
        sent_ms = first_sent_ms if first_sent_ms is not None else now_ms
        fallback: int | None = None
        try:
            payload, detail_type, event_time = self._unwrap(body, detail_type, event_time)
            fallback = event_time_ms(event_time) or sent_ms
            change = parse_change(
                payload, detail_type=detail_type, fallback_ms=fallback, not_after_ms=now_ms + FUTURE_TOLERANCE_MS
            )
        except InvalidMessageError as exc:
            return self._dead_letter(raw, exc.reason, exc.errors, message_id, None, occurred_at_ms=fallback)
        if payload is body:
            # A message (not an event, whose own ``time`` stays in the body): a dead letter of it carries the time it
            # was ordered by in its body, so that however it is sent back it keeps its place in the user's order.
            raw = stamp_occurred_at(
                raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw, change.occurred_at
            )
        logger.thread_safe_append_keys(client_id=change.client_id, message_id=message_id)
        try:
            outcome = self._service.apply(change, message_id=message_id)
        except InvalidMessageError as exc:  # an Instance or ToInstance the credentials secret does not hold
            return self._dead_letter(raw, exc.reason, exc.errors, message_id, change)
        except LifecycleRejectedError as exc:
            return self._dead_letter(raw, exc.reason, exc.errors, message_id, change)
        except UserNotRegisteredError:
            if now_ms - sent_ms >= self._unknown_user_ms:
                problem = FieldError(
                    "ClientId", f"no registered user after {self._unknown_user_ms // 1000} s: register it, then redrive"
                )
                return self._dead_letter(raw, "unknown_user", [problem], message_id, change)
            metrics.add_metric("LifecycleWaits", MetricUnit.Count, 1)
            logger.info("change waits for its user's registration", extra={"action": change.action.value})
            raise
        except Exception as exc:
            metrics.add_metric("LifecycleRetries", MetricUnit.Count, 1)
            logger.warning("change will be retried", extra={"error": f"{type(exc).__name__}: {exc}"})
            raise
        finally:
            logger.thread_safe_remove_keys(["client_id", "message_id"])
        if outcome.status == "applied":
            metrics.add_metric(f"Lifecycle{change.action.value}", MetricUnit.Count, 1)
            metrics.add_metric("LifecycleApplied", MetricUnit.Count, 1)
            logger.info("change applied", extra={"action": change.action.value, "device_token": outcome.device_token})
            return LifecycleResult("applied", device_token=outcome.device_token)
        metrics.add_metric("LifecycleDropped", MetricUnit.Count, 1)
        logger.info(
            "change dropped",
            extra={"action": change.action.value, "reason": outcome.reason, "device_token": outcome.device_token},
        )
        self._announce(
            LifecycleFailed(
                action=change.action.value,
                instance=change.instance,
                client_id=change.client_id,
                device_token=outcome.device_token,
                occurred_at=change.occurred_at,
                applied_at=outcome.applied_at,
                message_id=message_id,
                reason=outcome.reason or "dropped",
                dead_lettered=False,
            )
        )
        return LifecycleResult("dropped", outcome.reason, outcome.device_token)

    @staticmethod
    def _unwrap(
        body: str | bytes | Mapping[str, Any], detail_type: str | None, event_time: str | None
    ) -> tuple[str | bytes | Mapping[str, Any], str | None, str | None]:
        """The change itself: an event's ``detail`` when the rule delivered the whole event to the queue."""
        if detail_type is not None:
            return body, detail_type, event_time
        document: Any = body
        if isinstance(body, str | bytes):
            try:
                document = json.loads(body)
            except (ValueError, RecursionError):
                return body, None, None  # parse_change reports it
        if isinstance(document, Mapping):
            event = _as_event(document)
            if event is not None:
                kind, detail, when = event
                if not isinstance(detail, Mapping):
                    raise InvalidMessageError("not_an_object", [FieldError("detail", "detail must be an object")])
                return detail, kind, when
        return body, None, None

    def _dead_letter(
        self,
        raw: str | bytes,
        reason: str,
        errors: list[FieldError],
        message_id: str,
        change: LifecycleChange | None,
        *,
        occurred_at_ms: int | None = None,
    ) -> LifecycleResult:
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        # If this send fails the exception propagates and the message is retried: it is never dropped.
        self._dead_letters.send(
            DeadLetter(
                body=text,
                reason=reason,
                source="lifecycle",
                errors=errors,
                original_message_id=message_id,
                occurred_at_ms=change.occurred_at if change is not None else occurred_at_ms,
            )
        )
        metrics.add_metric("LifecycleDeadLettered", MetricUnit.Count, 1)
        logger.warning(
            "change dead-lettered",
            extra={"reason": reason, "errors": [e.as_dict() for e in errors], "message_id": message_id},
        )
        self._announce(
            LifecycleFailed(
                action=change.action.value if change else None,
                instance=change.instance if change else None,
                client_id=change.client_id if change else None,
                occurred_at=change.occurred_at if change else None,
                message_id=message_id,
                reason=reason,
                dead_lettered=True,
                errors=[ErrorItem(key=e.key, message=e.message) for e in errors],
            )
        )
        return LifecycleResult("dead_lettered", reason)

    def _announce(self, event: LifecycleFailed) -> None:
        try:
            self._publisher.publish(event)
        except Exception:  # noqa: BLE001 - the dead letter (or the drop) stands; the event is a notification
            logger.exception("could not publish TelematicsLifecycleFailed")
