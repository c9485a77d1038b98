"""Reconcile function (flow 6): on a schedule, adopt the users of lost CreateMany chunks, then continue or start the
drift audit, each within the invocation's time (the audit resumes at the next wake-up)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from telematics_reg.observability import logger, metrics
from telematics_reg.wiring import ColdStart, build_reconciler

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

    from telematics_reg.reconcile.service import ReconcileOff, Reconciler

# Built from this function's environment on its first invocation, reused while the container lives.
_reconciler = ColdStart(build_reconciler)


def handle_reconcile(
    reconciler: Reconciler | ReconcileOff, *, time_left: Callable[[], float] | None = None
) -> dict[str, Any]:
    """One wake-up; returns what it did (adoptions, and the audit's step and report so far)."""
    return reconciler.tick(time_left=time_left).as_dict()


def warm() -> None:
    """Build this function's dependencies now, from its environment (a local runtime calls this at start)."""
    _reconciler.get()


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return handle_reconcile(_reconciler.get(), time_left=lambda: context.get_remaining_time_in_millis() / 1000)
