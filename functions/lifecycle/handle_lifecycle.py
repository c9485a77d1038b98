"""Lifecycle function: profile and flag updates, deactivations, reactivations, deletions and moves from the
lifecycle queue (events the rule delivers, operators' messages), a batch at a time, failures reported per record
(flow 5). Records of a batch are applied concurrently, bounded by ``UPSTREAM_CONCURRENCY``; the per-user lease and
order marker keep one user's changes in order whatever runs at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from telematics_reg.batching import SqsMessage, process_sqs_batch
from telematics_reg.observability import logger, metrics
from telematics_reg.wiring import ColdStart, build_lifecycle_intake

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

    from telematics_reg.lifecycle.intake import LifecycleIntake

# Built from this function's environment on its first invocation, reused while the container lives (with it the
# admin session read from the table: a cold container does not log in).
_intake = ColdStart(build_lifecycle_intake)


def handle_lifecycle_batch(event: dict[str, Any], intake: LifecycleIntake, *, concurrency: int) -> dict[str, Any]:
    """Apply every change of an SQS batch; returns the partial batch response."""

    def record_handler(record: SqsMessage) -> str:
        sent = (record.raw.get("attributes") or {}).get("SentTimestamp")
        return intake.handle(
            record.body, message_id=record.message_id, first_sent_ms=int(sent) if sent else None
        ).status

    return dict(process_sqs_batch(event, record_handler, max_workers=concurrency))


def warm() -> None:
    """Build this function's dependencies now, from its environment (a local runtime calls this at start)."""
    _intake.get()


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return handle_lifecycle_batch(event, _intake.get(), concurrency=_intake.settings.upstream_concurrency)
