"""Refresh sweeper: on a schedule, queue a refresh job for every user whose token expires within the margin
(flow 3). Its cost grows with the users due, not with the table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from telematics_reg.observability import logger, metrics
from telematics_reg.refresh import Sweeper
from telematics_reg.wiring import ColdStart, build_sweeper

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

# Built from this function's environment on its first invocation, reused while the container lives.
_sweeper = ColdStart(build_sweeper)


def handle_sweep(sweeper: Sweeper) -> dict[str, Any]:
    """Run one sweep; returns its report."""
    return dict(sweeper.sweep().__dict__)


def warm() -> None:
    """Build this function's dependencies now, from its environment (a local runtime calls this at start)."""
    _sweeper.get()


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return handle_sweep(_sweeper.get())
