"""What the reconcile function does at each wake-up of its schedule: adopt the lost chunks waiting, then continue
(or start, when due) the drift audit, each within the invocation's time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from telematics_reg.errors import LoginDeferredError
from telematics_reg.lifecycle.admin import AdminSessionUnavailableError
from telematics_reg.observability import logger
from telematics_reg.reconcile.adoption import ChunkAdopter, ChunkAdoption
from telematics_reg.reconcile.audit import AuditStep, DriftAudit


@dataclass(frozen=True)
class TickReport:
    adoptions: list[ChunkAdoption] = field(default_factory=list)
    audit: AuditStep | None = None

    def as_dict(self) -> dict[str, Any]:
        audit = self.audit
        return {
            "Adoptions": [a.as_dict() for a in self.adoptions],
            "Audit": {
                "Status": audit.status,
                "Detail": audit.detail,
                "Report": audit.report.as_dict() if audit.report is not None else None,
            }
            if audit is not None
            else None,
        }


class ReconcileOff:
    """What the function does when reconciliation cannot run (no admin account configured): says so at each
    wake-up, as an error, and does nothing else."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def tick(self, *, time_left: Callable[[], float] | None = None) -> TickReport:
        logger.error("reconciliation is off", extra={"reason": self.reason})
        return TickReport(audit=AuditStep("off", detail=self.reason))


class Reconciler:
    """Adoption first (a lost chunk's users wait for tokens), then the audit with the time left."""

    def __init__(self, *, adopter: ChunkAdopter, audit: DriftAudit) -> None:
        self.adopter = adopter
        self.audit = audit

    def tick(self, *, time_left: Callable[[], float] | None = None) -> TickReport:
        """One wake-up. An admin Login deferred by the fleet's budget ends it early: the next wake-up goes on."""
        adoptions: list[ChunkAdoption] = []
        try:
            adoptions = self.adopter.adopt_pending(time_left=time_left)
            step = self.audit.run(time_left=time_left)
        except (LoginDeferredError, AdminSessionUnavailableError) as exc:
            # No admin JWT now (the budget is spent, another worker renews the session, a Login's answer was lost):
            # the next wake-up goes on from the cursor; failing the invocation would only dead-letter the schedule.
            logger.warning("reconcile deferred: no admin session now", extra={"detail": str(exc)})
            return TickReport(adoptions, AuditStep("busy", detail=f"admin session unavailable: {exc}"))
        return TickReport(adoptions, step)
