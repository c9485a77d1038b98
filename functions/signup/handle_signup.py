"""Signup function: an EventBridge ``UserSignedUp`` event becomes one registered, stored user (flow 1).

Errors worth retrying propagate: Lambda retries the asynchronous invocation, then sends it to the on-failure
destination. Bad input is dead-lettered at once with its reason and the invocation succeeds.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from telematics_reg.intake import MessageResult, RegistrationIntake, event_time_ms
from telematics_reg.observability import logger, metrics
from telematics_reg.wiring import ColdStart, build_intake

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

# Built from this function's environment on its first invocation, reused while the container lives.
_intake = ColdStart(build_intake)


def handle_signup(event: dict[str, Any], intake: RegistrationIntake) -> dict[str, Any]:
    """Register the user an EventBridge event describes; returns what became of it."""
    # A direct invocation can pass any JSON, not just an EventBridge event: dead-letter it with a reason.
    detail = event.get("detail") if isinstance(event, dict) else event
    message_id = str(event.get("id", "")) if isinstance(event, dict) else ""
    result: MessageResult = intake.handle(
        # Kept as sent for the dead letter: a JSON text as is, any other JSON value as JSON (not a Python repr).
        detail if isinstance(detail, dict | str) else json.dumps(detail),
        message_id=message_id,
        source="signup",
        occurred_at_ms=event_time_ms(event.get("time")) if isinstance(event, dict) else None,
    )
    return {"status": result.status, "deviceToken": result.device_token, "reason": result.reason}


def warm() -> None:
    """Build this function's dependencies now, from its environment (a local runtime calls this at start)."""
    _intake.get()


@logger.inject_lambda_context(correlation_id_path="id", clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return handle_signup(event, _intake.get())
