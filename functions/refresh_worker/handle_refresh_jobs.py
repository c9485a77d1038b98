"""Refresh worker: refresh jobs from SQS, each user refreshed under a lease and committed by version (flow 3).

Upstream trouble (429, 5xx) does not fail a record: the user gets a RetryAfter and the next sweep takes it, so
a 429 storm makes the sweep finish later instead of sending jobs to the dead-letter queue. Records fail (and
are retried by SQS) only when the store could not be written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from telematics_reg.batching import SqsMessage, process_sqs_batch
from telematics_reg.observability import logger, metrics
from telematics_reg.refresh import RefreshJob, TokenRefresher
from telematics_reg.wiring import ColdStart, build_refresher

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext


# Built from this function's environment on its first invocation, reused while the container lives.
_refresher = ColdStart(build_refresher)


def handle_refresh_batch(event: dict[str, Any], refresher: TokenRefresher, *, concurrency: int) -> dict[str, Any]:
    """Refresh the user of every job in an SQS batch; returns the partial batch response."""

    def record_handler(record: SqsMessage) -> str:
        # A malformed job raises ValueError: it fails, is retried and ends in the refresh DLQ by redrive.
        return refresher.refresh_job(RefreshJob.from_body(record.body)).value

    return dict(process_sqs_batch(event, record_handler, max_workers=concurrency))


def warm() -> None:
    """Build this function's dependencies now, from its environment (a local runtime calls this at start)."""
    _refresher.get()


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return handle_refresh_batch(event, _refresher.get(), concurrency=_refresher.settings.upstream_concurrency)
