"""Queue function: registration and bulk messages from SQS, a batch at a time, failures reported per record
(flow 2). Records of a batch are registered concurrently, bounded by ``UPSTREAM_CONCURRENCY``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from telematics_reg.batching import SqsMessage, process_sqs_batch
from telematics_reg.intake import RegistrationIntake
from telematics_reg.observability import logger, metrics
from telematics_reg.wiring import ColdStart, build_queue_intake

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext


# Built from this function's environment on its first invocation, reused while the container lives.
_intake = ColdStart(build_queue_intake)


def handle_registration_batch(
    event: dict[str, Any],
    intake: RegistrationIntake,
    *,
    concurrency: int,
    time_left: Callable[[], float] | None = None,
) -> dict[str, Any]:
    """Register every record of an SQS batch; returns the partial batch response.

    ``time_left`` (seconds the invocation has left) lets a bulk stop before Lambda cuts it off: it is then sent
    back onto the queue to continue (its record handled) when it stored users, and reported failed otherwise.
    """

    def record_handler(record: SqsMessage) -> str:
        sent = (record.raw.get("attributes") or {}).get("SentTimestamp")
        return intake.handle(
            record.body,
            message_id=record.message_id,
            source="queue",
            time_left=time_left,
            occurred_at_ms=int(sent) if sent else None,
        ).status

    return dict(process_sqs_batch(event, record_handler, max_workers=concurrency))


def warm() -> None:
    """Build this function's dependencies now, from its environment (a local runtime calls this at start)."""
    _intake.get()


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return handle_registration_batch(
        event,
        _intake.get(),
        concurrency=_intake.settings.upstream_concurrency,
        time_left=lambda: context.get_remaining_time_in_millis() / 1000,
    )
