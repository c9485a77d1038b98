"""Queue function: registration and bulk messages from SQS, a batch at a time, failures reported per record
(flow 2). Records of a batch are registered concurrently, bounded by ``UPSTREAM_CONCURRENCY``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aws_lambda_powertools.utilities.batch import EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from telematics_reg.batching import ConcurrentBatchProcessor
from telematics_reg.intake import RegistrationIntake
from telematics_reg.observability import logger, metrics, tracer
from telematics_reg.wiring import ColdStart, build_queue_intake

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

    def record_handler(record: SQSRecord) -> str:
        sent = (record.raw_event.get("attributes") or {}).get("SentTimestamp")
        return intake.handle(
            record.body,
            message_id=record.message_id,
            source="queue",
            time_left=time_left,
            occurred_at_ms=int(sent) if sent else None,
        ).status

    processor = ConcurrentBatchProcessor(EventType.SQS, max_workers=concurrency)
    return dict(process_partial_response(event=event, record_handler=record_handler, processor=processor))


def warm() -> None:
    """Build this function's dependencies now, from its environment (a local runtime calls this at start)."""
    _intake.get()


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
@tracer.capture_lambda_handler(capture_response=False)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return handle_registration_batch(
        event,
        _intake.get(),
        concurrency=_intake.settings.upstream_concurrency,
        time_left=lambda: context.get_remaining_time_in_millis() / 1000,
    )
